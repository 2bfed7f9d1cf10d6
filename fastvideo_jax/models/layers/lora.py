"""Low-rank adapters (LoRA) on a model's ``Linear`` layers, in Flax NNX.

An adapter adds ``strength * (scale * (x @ A) @ B + bias)`` to a ``Linear``'s output (``bias``: optional, PEFT's
``lora_B.bias`` times its scale or an original LoRA's ``diff_b``): ``A`` (in, r) and ``B`` (r, out) are
``LoRAParam`` variables (trainable; NOT ``nnx.Param``, so loaders, exporters and a full-weight optimizer never
see them: train only adapters with ``wrt=LORA_FILTER``), ``scale`` (alpha / rank, the adapter's own) and
``strength`` (the user's multiplier) are ``LoRAScale`` variables (state, so a new strength does not recompile).
A ``Linear`` inside scanned blocks has its kernel stacked (L, in, out) on the scan axis; its adapter is stacked
alike, A (L, in, r), B (L, r, out), scale and strength (L,), so ``nnx.scan`` slices it with the block. A stack
whose layers have different ranks is padded with zeros to the largest (exact); a layer without an adapter has
scale 0. Logical axes: A takes the kernel's input axis, B its output axis, the rank axis is replicated (None);
arrays are placed with the kernel's own sharding on those axes.

Merging (``merge_lora``) folds ``scale * strength * A @ B`` into the kernel (fp32 sum, highest precision, cast
to the kernel dtype) for adapter-free speed; it returns the original kernels as per-device host copies, and
``unmerge_lora`` puts those back bit for bit. Which layers get adapters for training: ``inject_lora`` with
target module names (suffixes of a layer's dotted path, e.g. ``to_q`` or ``ffn.fc_in``; a DiT's defaults are its
ArchConfig's ``lora_target_modules``, minus paths containing one of ``exclude_lora_layers``). Loading and saving
Diffusers/PEFT LoRA files: ``models/loader/lora_io.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fastvideo_jax.models.layers.linear import Linear
from fastvideo_jax.utils.nnx_vars import var_axes, var_value

F32 = jnp.float32

__all__ = [
    "LORA_FILTER", "LoRAAdapter", "LoRAParam", "LoRAScale", "LoRAWeights", "MergedKernels", "adapted_layers",
    "attach_lora", "inject_lora", "linear_layers", "lora_weights", "merge_lora", "remove_lora", "set_lora_strength",
    "target_layers", "unmerge_lora",
]


class LoRAParam(nnx.Variable):
    """A trainable adapter matrix (``lora_A`` (…, in, r) or ``lora_B`` (…, r, out))."""


class LoRAScale(nnx.Variable):
    """A non-trainable per-layer multiplier of an adapter's output (shape: the kernel's stack axes)."""


# The trainer's filter for adapter-only training: nnx.Optimizer(model, tx, wrt=LORA_FILTER), nnx.DiffState(0, ...).
LORA_FILTER = LoRAParam


@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """One layer's adapter on the host: A (…, in, r), B (…, r, out), scale (…) = alpha / rank per stacked layer
    (0 where a layer of a stack has none), optional bias (…, out) added as it is (not times ``scale``)."""

    A: np.ndarray
    B: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None


class LoRAAdapter(nnx.Module):
    def __init__(self, A: jax.Array, B: jax.Array, scale: jax.Array, strength: jax.Array, *, kernel_axes,
                 bias: jax.Array | None = None):
        lead = tuple(kernel_axes[:-2])
        with nnx.use_eager_sharding(False):  # already placed like the kernel (_place)
            self._init_vars(A, B, scale, strength, lead, kernel_axes)
            self.lora_bias = None if bias is None else LoRAParam(bias, out_sharding=(*lead, kernel_axes[-1]))
        self.merged = False  # static: a merged adapter adds nothing in the forward

    def _init_vars(self, A, B, scale, strength, lead, kernel_axes):
        self.lora_A = LoRAParam(A, out_sharding=(*lead, kernel_axes[-2], None))
        self.lora_B = LoRAParam(B, out_sharding=(*lead, None, kernel_axes[-1]))
        self.scale = LoRAScale(scale, out_sharding=lead)
        self.strength = LoRAScale(strength, out_sharding=lead)

    @property
    def rank(self) -> int:
        return int(var_value(self.lora_A).shape[-1])

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out), fp32
        a, b = self.lora_A[...], self.lora_B[...]
        h = jnp.dot(x.astype(a.dtype), a, preferred_element_type=F32)
        y = jnp.dot(h.astype(b.dtype), b, preferred_element_type=F32) * self.scale[...].astype(F32)
        if self.lora_bias is not None:
            y = y + self.lora_bias[...].astype(F32)
        return y * self.strength[...].astype(F32)


# ---- finding layers ---------------------------------------------------------------------------------------
def linear_layers(model: nnx.Module) -> dict[str, Linear]:
    """Every ``Linear`` of ``model`` by dotted module path (a scanned stack is one entry)."""
    return {".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def target_layers(model: nnx.Module, targets: Iterable[str] | None = None,
                  exclude: Iterable[str] | None = None) -> dict[str, Linear]:
    """The ``Linear`` layers whose dotted path ends with one of ``targets`` (default: the ArchConfig's
    ``lora_target_modules``) and contains none of ``exclude`` (default: ``exclude_lora_layers``)."""
    arch = getattr(getattr(model, "config", None), "arch_config", None)
    targets = tuple(getattr(arch, "lora_target_modules", ()) if targets is None else targets)
    exclude = tuple(getattr(arch, "exclude_lora_layers", ()) if exclude is None else exclude)
    if not targets:
        raise ValueError(f"{type(model).__name__}: no LoRA target modules given and its config names none")
    layers = {p: m for p, m in linear_layers(model).items()
              if any(_matches(p, t) for t in targets) and not any(e in p for e in exclude)}
    if not layers:
        raise ValueError(f"{type(model).__name__}: no Linear layer matches the LoRA targets {list(targets)}")
    return layers


def adapted_layers(model: nnx.Module) -> dict[str, Linear]:
    return {p: m for p, m in linear_layers(model).items() if m.lora is not None}


# ---- placing adapter arrays like their kernel -------------------------------------------------------------
def _sharding_like(kernel: jax.Array, dims: Sequence[int | None]) -> jax.sharding.Sharding:
    """On the kernel's devices, dimension i sharded as kernel dimension ``dims[i]`` (None: replicated)."""
    sharding = kernel.sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*(None if d is None else spec[d] for d in dims)))
    return jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))


def _place(kernel: jax.Array, value: np.ndarray | jax.Array, dims: Sequence[int | None]) -> jax.Array:
    return jax.device_put(value, _sharding_like(kernel, dims))


def _make_adapter(linear: Linear, A, B, scale, strength: float, bias=None) -> LoRAAdapter:
    kernel = var_value(linear.kernel)
    lead = kernel.ndim - 2
    stack = tuple(range(lead))
    axes = var_axes(linear.kernel) or (None,) * kernel.ndim
    return LoRAAdapter(
        _place(kernel, A, (*stack, lead, None)), _place(kernel, B, (*stack, None, lead + 1)),
        _place(kernel, np.asarray(scale, np.float32), stack),
        _place(kernel, np.full(kernel.shape[:lead], strength, np.float32), stack),
        kernel_axes=tuple(axes), bias=None if bias is None else _place(kernel, bias, (*stack, lead + 1)),
    )


def inject_lora(model: nnx.Module, rank: int, alpha: float | None = None, *, rngs: nnx.Rngs,
                targets: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                param_dtype=None) -> list[str]:
    """Fresh trainable adapters (A: PEFT's Kaiming-uniform, bound 1/sqrt(in); B: zeros, so the model is
    unchanged) of ``rank`` and ``alpha`` (default: rank, i.e. scale 1) on the target layers. ``param_dtype``:
    the adapters' dtype (default: each kernel's; fp32 for mixed-precision training). Returns the layer paths."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    layers = target_layers(model, targets, exclude)
    taken = [p for p, m in layers.items() if m.lora is not None]
    if taken:
        raise ValueError(f"layers {taken} already carry a LoRA adapter; remove_lora first")
    scale = (rank if alpha is None else alpha) / rank
    for path, linear in layers.items():
        kernel = var_value(linear.kernel)
        *lead, n_in, n_out = kernel.shape
        dtype = param_dtype or kernel.dtype
        stack = tuple(range(len(lead)))
        A = _uniform(rngs.params(), (*lead, n_in, rank), dtype, 1.0 / math.sqrt(n_in),
                     _sharding_like(kernel, (*stack, len(lead), None)))  # built in place on its shards
        B = jax.jit(lambda: jnp.zeros((*lead, rank, n_out), dtype),
                    out_shardings=_sharding_like(kernel, (*stack, None, len(lead) + 1)))()
        linear.lora = nnx.data(_make_adapter(linear, A, B, np.full(lead, scale, np.float32), 1.0))
    return list(layers)


def _uniform(key, shape, dtype, bound, sharding):
    return jax.jit(lambda k: jax.random.uniform(k, shape, F32, -bound, bound).astype(dtype),
                   out_shardings=sharding)(key)


def attach_lora(model: nnx.Module, weights: Mapping[str, LoRAWeights], *, strength: float = 1.0,
                dtype=None) -> None:
    """Adapters with the given host weights on the layers named by path (checked: shapes fit, no adapter there
    yet; nothing is attached unless all fit). ``dtype``: the adapters' (default: each kernel's)."""
    layers = linear_layers(model)
    problems = []
    for path, w in weights.items():
        linear = layers.get(path)
        if linear is None:
            problems.append(f"{path}: no such Linear layer")
            continue
        kernel = var_value(linear.kernel)
        *lead, n_in, n_out = kernel.shape
        r = w.A.shape[-1]
        if (w.A.shape != (*lead, n_in, r) or w.B.shape != (*lead, r, n_out) or w.scale.shape != tuple(lead)
                or (w.bias is not None and w.bias.shape != (*lead, n_out))):
            problems.append(f"{path}: adapter A {w.A.shape}, B {w.B.shape}, scale {w.scale.shape} do not fit the "
                            f"kernel {tuple(kernel.shape)}")
        elif linear.lora is not None:
            problems.append(f"{path}: already carries a LoRA adapter")
    if problems:
        raise ValueError("cannot attach LoRA adapters: " + "; ".join(problems))
    for path, w in weights.items():
        linear = layers[path]
        dt = dtype or var_value(linear.kernel).dtype
        bias = None if w.bias is None else w.bias.astype(dt)
        linear.lora = nnx.data(_make_adapter(linear, w.A.astype(dt), w.B.astype(dt), w.scale, strength, bias))


def lora_weights(model: nnx.Module) -> dict[str, LoRAWeights]:
    """Every attached adapter's host weights by layer path (adapters are small: gathered whole)."""
    out = {}
    for path, linear in adapted_layers(model).items():
        a = linear.lora
        host = [None if v is None else np.asarray(jax.device_get(v[...]))
                for v in (a.lora_A, a.lora_B, a.scale, a.lora_bias)]
        out[path] = LoRAWeights(*host)
    return out


def set_lora_strength(model: nnx.Module, strength: float) -> None:
    """The user multiplier of every adapter (unmerged adapters only: a merged one is baked into its kernel)."""
    layers = adapted_layers(model)
    merged = [p for p, m in layers.items() if m.lora.merged]
    if merged:
        raise ValueError(f"LoRA adapters on {merged[:3]}... are merged: unmerge before changing the strength")
    for linear in layers.values():
        s = linear.lora.strength
        _set(s, jnp.full_like(s[...], strength))


def remove_lora(model: nnx.Module) -> list[str]:
    """Detach every (unmerged) adapter; returns the layer paths."""
    layers = adapted_layers(model)
    merged = [p for p, m in layers.items() if m.lora.merged]
    if merged:
        raise ValueError(f"LoRA adapters on {merged[:3]}... are merged: unmerge_lora before removing them")
    for linear in layers.values():
        linear.lora = nnx.static(None)  # as built: the graph (and the compile cache key) of a plain model
    return list(layers)


# ---- merge / unmerge --------------------------------------------------------------------------------------
def _set(var: nnx.Variable, value) -> None:
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


@jax.jit
def _merged(kernel, a, b, s):  # kernel (..., in, out) + s (...) * a (..., in, r) @ b (..., r, out)
    delta = jnp.einsum("...ir,...ro->...io", a.astype(F32), b.astype(F32), precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(F32) + delta * s[..., None, None]).astype(kernel.dtype)


@jax.jit
def _merged_bias(bias, lora_bias, strength):  # bias (..., out) + strength (...) * lora_bias (..., out)
    return (bias.astype(F32) + lora_bias.astype(F32) * strength[..., None]).astype(bias.dtype)


@dataclasses.dataclass
class _HostKernel:
    shape: tuple[int, ...]
    sharding: jax.sharding.Sharding
    shards: list[tuple[np.ndarray, list]]  # (host copy, devices holding that block)

    @classmethod
    def of(cls, arr: jax.Array) -> "_HostKernel":
        blocks: dict[tuple, tuple[np.ndarray, list]] = {}
        for shard in arr.addressable_shards:  # one host copy per distinct block, not per device
            key = tuple((s.start, s.stop) for s in shard.index)
            if key not in blocks:
                blocks[key] = (np.asarray(shard.data), [])
            blocks[key][1].append(shard.device)
        return cls(tuple(arr.shape), arr.sharding, list(blocks.values()))

    def restore(self) -> jax.Array:
        arrays = [jax.device_put(host, d) for host, devices in self.shards for d in devices]
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


@dataclasses.dataclass
class MergedKernels:
    """The original kernels (and biases, for adapters with one) of the layers ``merge_lora`` changed, as
    per-device host copies: ``unmerge_lora`` restores them exactly."""

    kernels: dict[str, _HostKernel] = dataclasses.field(default_factory=dict)
    biases: dict[str, _HostKernel] = dataclasses.field(default_factory=dict)


def merge_lora(model: nnx.Module) -> MergedKernels:
    """Fold every unmerged adapter (times its strength) into its kernel; the forward then skips adapters."""
    layers = {p: m for p, m in adapted_layers(model).items() if not m.lora.merged}
    no_bias = [p for p, m in layers.items() if m.lora.lora_bias is not None and m.bias is None]
    if no_bias:
        raise ValueError(f"LoRA adapters with a bias cannot merge into layers without one: {no_bias}; keep them "
                         "separate (merge=False)")
    saved = MergedKernels()
    for path, linear in layers.items():
        a = linear.lora
        kernel = var_value(linear.kernel)
        saved.kernels[path] = _HostKernel.of(kernel)
        new = _merged(kernel, a.lora_A[...], a.lora_B[...], a.scale[...] * a.strength[...])
        _set(linear.kernel, jax.device_put(new, kernel.sharding))
        if a.lora_bias is not None:
            bias = var_value(linear.bias)
            saved.biases[path] = _HostKernel.of(bias)
            _set(linear.bias, jax.device_put(_merged_bias(bias, a.lora_bias[...], a.strength[...]), bias.sharding))
        a.merged = True
    return saved


def unmerge_lora(model: nnx.Module, saved: MergedKernels) -> None:
    """Put back the kernels ``merge_lora`` saved (bit for bit) and mark their adapters unmerged."""
    layers = adapted_layers(model)
    missing = [p for p, m in layers.items() if m.lora.merged and p not in saved.kernels]
    if missing:
        raise ValueError(f"merged LoRA layers {missing[:3]} have no saved kernel in this MergedKernels")
    for path, host in saved.kernels.items():
        linear = layers.get(path)
        if linear is None or not linear.lora.merged:
            continue
        _set(linear.kernel, host.restore())
        if path in saved.biases:
            _set(linear.bias, saved.biases[path].restore())
        linear.lora.merged = False
    saved.kernels.clear()
    saved.biases.clear()
