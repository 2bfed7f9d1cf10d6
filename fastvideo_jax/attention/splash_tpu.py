"""TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) for (B, L, N, E) inputs.

* Any lengths: q and k/v are zero-padded to block multiples; padded (and ``kv_mask``-ed) keys get kv segment
  id 1 while every query has segment id 0, so they are never attended. Padded query rows are sliced off.
* Batch: the kernel is per example (heads, seq, dim); it is vmapped over the batch.
* Heads sharded over a mesh axis with ``jax.shard_map`` when a mesh is given, batch optionally over data axes.
  Kernels are built per distinct head mask (single-mask kernels broadcast over any number of heads), so the
  replicated mask info is small and per-head masks (sliding-tile windows) keep splash's grid shrinking.
* Block sizes: :class:`SplashConfig`, a validated frozen dataclass. Splash applies no softmax scale, so q is
  scaled (in fp32, one rounding) before the kernel. Head dims that are not multiples of 128 are zero-padded
  (exact: zero q/k columns add nothing to the logits, zero v columns are sliced off).
* ``interpret=True`` runs the Pallas kernels in interpret mode (CPU tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fastvideo_jax.attention._common import ScopedValue, platform, round_up

NUM_LANES = 128
SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class SplashConfig:
    """Splash ``BlockSizes`` plus padding and execution options; validated on construction.

    Backward blocks default to the forward ones. ``pad_multiple`` (None = the lcm of the blocks on each axis)
    fixes the multiple sequences are padded to; every block must then divide the padded lengths.
    """

    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    block_kv_dkv_compute: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    use_fused_bwd_kernel: bool = False
    pad_multiple: int | None = None
    pad_head_dim: bool = True
    max_head_dim: int = 256
    interpret: bool = False

    def __post_init__(self):
        fill = {
            "block_kv_compute": self.block_kv,
            "block_q_dkv": self.block_q,
            "block_kv_dkv": self.block_kv,
            "block_q_dq": None if self.use_fused_bwd_kernel else self.block_q,
            "block_kv_dq": None if self.use_fused_bwd_kernel else self.block_kv,
        }
        for name, default in fill.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.block_kv_dkv_compute is None:
            object.__setattr__(self, "block_kv_dkv_compute", self.block_kv_dkv)
        if self.use_fused_bwd_kernel and (self.block_q_dq is not None or self.block_kv_dq is not None):
            raise ValueError("SplashConfig: dq blocks are not used with use_fused_bwd_kernel=True")
        for name in ("block_q", "block_q_dkv", "block_q_dq"):
            b = getattr(self, name)
            if b is not None and (b <= 0 or b % SUBLANES):
                raise ValueError(f"SplashConfig.{name}={b} must be a positive multiple of {SUBLANES}")
        for name in ("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq"):
            b = getattr(self, name)
            if b is not None and (b <= 0 or b % NUM_LANES):
                raise ValueError(f"SplashConfig.{name}={b} must be a positive multiple of {NUM_LANES}")
        if self.block_kv % self.block_kv_compute:
            raise ValueError(f"SplashConfig: block_kv={self.block_kv} must be a multiple of "
                             f"block_kv_compute={self.block_kv_compute}")
        if self.block_kv_dkv % self.block_kv_dkv_compute:
            raise ValueError(f"SplashConfig: block_kv_dkv={self.block_kv_dkv} must be a multiple of "
                             f"block_kv_dkv_compute={self.block_kv_dkv_compute}")
        if self.pad_multiple is not None and self.pad_multiple <= 0:
            raise ValueError(f"SplashConfig.pad_multiple={self.pad_multiple} must be positive")

    @property
    def q_blocks(self) -> tuple[int, ...]:
        return tuple(b for b in (self.block_q, self.block_q_dkv, self.block_q_dq) if b is not None)

    @property
    def kv_blocks(self) -> tuple[int, ...]:
        return tuple(b for b in (self.block_kv, self.block_kv_dkv, self.block_kv_dq) if b is not None)

    def padded_lengths(self, q_len: int, kv_len: int) -> tuple[int, int]:
        if self.pad_multiple is not None:
            return round_up(q_len, self.pad_multiple), round_up(kv_len, self.pad_multiple)
        return round_up(q_len, math.lcm(*self.q_blocks)), round_up(kv_len, math.lcm(*self.kv_blocks))

    def padded_head_dim(self, head_dim: int) -> int:
        return round_up(head_dim, NUM_LANES) if self.pad_head_dim else head_dim

    def validate(self, q_len_padded: int, kv_len_padded: int, head_dim: int) -> None:
        """Raise ValueError if the kernel cannot run these (padded) shapes."""
        if head_dim <= 0 or head_dim > self.max_head_dim or head_dim % SUBLANES:
            raise ValueError(f"splash: head dim {head_dim} unsupported (a multiple of {SUBLANES}, at most "
                             f"{self.max_head_dim})")
        if not self.pad_head_dim and head_dim % NUM_LANES and not self.interpret:
            raise ValueError(f"splash: head dim {head_dim} is not a multiple of {NUM_LANES}; set pad_head_dim=True")
        for name in ("block_q", "block_q_dkv", "block_q_dq"):
            b = getattr(self, name)
            if b is not None and q_len_padded % b:
                raise ValueError(f"splash: {name}={b} does not divide the padded q length {q_len_padded}")
        for name in ("block_kv", "block_kv_dkv", "block_kv_dq"):
            b = getattr(self, name)
            if b is not None and kv_len_padded % b:
                raise ValueError(f"splash: {name}={b} does not divide the padded kv length {kv_len_padded}")

    def block_sizes(self):
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak

        return sak.BlockSizes(
            block_q=self.block_q, block_kv=self.block_kv, block_kv_compute=self.block_kv_compute,
            block_q_dkv=self.block_q_dkv, block_kv_dkv=self.block_kv_dkv,
            block_kv_dkv_compute=self.block_kv_dkv_compute,
            block_q_dq=self.block_q_dq, block_kv_dq=self.block_kv_dq,
            use_fused_bwd_kernel=self.use_fused_bwd_kernel,
        )


# (config, (mesh, head_axis, batch_axes) or None) used by the registered SPLASH_TPU backend; a jit cache key.
_SCOPE = ScopedValue((SplashConfig(), None))


def current_config() -> SplashConfig:
    return _SCOPE.current()[0]


def current_mesh():
    """(mesh, head_axis, batch_axes) set by :func:`config_scope`, or None."""
    return _SCOPE.current()[1]


@contextlib.contextmanager
def config_scope(config: SplashConfig, mesh=None, head_axis: str = "tensor", batch_axes=("data", "fsdp")):
    """Config (and optional mesh) used by the registered SPLASH_TPU backend inside the ``with`` block.

    Both are part of the jit cache key (see ``ScopedValue``): a jitted caller retraces when they change."""
    with _SCOPE.scope((config, None if mesh is None else (mesh, head_axis, tuple(batch_axes)))):
        yield config


def check_splash(q, k, v, kv_mask=None, config: SplashConfig | None = None) -> str | None:
    config = config or current_config()
    if not config.interpret and platform() != "tpu":
        return f"needs a TPU or interpret=True (platform is {platform()})"
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        return f"needs fp32/bf16 inputs (got {q.dtype})"
    try:
        lq, lk = config.padded_lengths(q.shape[1], k.shape[1])
        config.validate(lq, lk, config.padded_head_dim(q.shape[-1]))
    except ValueError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _make_kernel(mask, block_sizes, interpret: bool):
    """A splash kernel for ONE head mask; splash broadcasts single-mask info over any number of q heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam

    # Built outside any trace so the cached kernel holds concrete mask-info arrays.
    with jax.ensure_compile_time_eval():
        return sak.make_splash_mha(sam.MultiHeadMask((mask,)), block_sizes=block_sizes, head_shards=1,
                                   q_seq_shards=1, interpret=interpret)


def _batch_spec(mesh, batch_axes, batch: int):
    axes = tuple(a for a in batch_axes if a in mesh.shape and mesh.shape[a] > 1)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def _run_heads(q, k, v, kv_segment, head_masks, config: SplashConfig):
    """Splash over (B, n, L, E) with one mask per head: heads sharing a mask run in one kernel call.

    One single-mask kernel per distinct mask keeps splash's grid shrinking (only non-empty kv blocks are
    visited) and its host-side mask processing cached per mask; a multi-mask MultiHeadMask would do neither.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak

    q_seg = jnp.zeros((q.shape[2],), jnp.int32)
    block_sizes = config.block_sizes()

    def call(kernel, q, k, v):
        if kv_segment is None:
            return jax.vmap(lambda a, b, c: kernel(a, b, c))(q, k, v)
        return jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sak.SegmentIds(q=q_seg, kv=s)))(
            q, k, v, kv_segment)

    groups: dict = {}
    for h, m in enumerate(head_masks):
        groups.setdefault(m, []).append(h)
    if len(groups) == 1:
        return call(_make_kernel(head_masks[0], block_sizes, config.interpret), q, k, v)
    outs, order = [], []
    for mask, idx in groups.items():
        sel = np.asarray(idx)
        outs.append(call(_make_kernel(mask, block_sizes, config.interpret), q[:, sel], k[:, sel], v[:, sel]))
        order.extend(idx)
    return jnp.concatenate(outs, axis=1)[:, np.argsort(order)]


def splash_masked(
    q: jax.Array,  # (B, N, Lq, E), already scaled and padded
    k: jax.Array,  # (B, N, Lk, E)
    v: jax.Array,
    kv_segment: jax.Array | None,  # (B, Lk) int32: 0 = attend, 1 = never attended; None = all valid
    head_masks,  # tuple of N hashable splash masks over (Lq, Lk), one per head
    config: SplashConfig,
    mesh=None,
    head_axis: str = "tensor",
    batch_axes=("data", "fsdp"),
) -> jax.Array:  # (B, N, Lq, E)
    """Splash on padded (B, N, L, E) inputs with static per-head masks, optionally head-sharded over a mesh.

    With a mesh, heads are split over ``head_axis`` with ``jax.shard_map``; when shards hold different masks,
    each device selects its own static head grouping with ``lax.switch`` on its shard index.
    """
    B, N, Lq, E = q.shape
    config.validate(Lq, k.shape[2], E)
    head_masks = tuple(head_masks)
    if len(head_masks) != N:
        raise ValueError(f"splash: {len(head_masks)} head masks for {N} heads")
    shards = mesh.shape[head_axis] if mesh is not None and head_axis in mesh.shape else 1
    if N % shards:
        raise ValueError(f"splash: {N} heads do not divide over mesh axis {head_axis!r} of size {shards}")
    if mesh is None:
        return _run_heads(q, k, v, kv_segment, head_masks, config)

    local = N // shards
    per_shard = [head_masks[s * local:(s + 1) * local] for s in range(shards)]

    def body(q, k, v, seg):
        if len(set(per_shard)) == 1:
            return _run_heads(q, k, v, seg, per_shard[0], config)
        branches = [functools.partial(lambda m, q, k, v, seg: _run_heads(q, k, v, seg, m, config), m)
                    for m in per_shard]
        return jax.lax.switch(jax.lax.axis_index(head_axis), branches, q, k, v, seg)

    bspec = _batch_spec(mesh, batch_axes, B)
    qkv_spec = P(bspec, head_axis if shards > 1 else None, None, None)
    if kv_segment is None:
        fn = jax.shard_map(lambda a, b, c: body(a, b, c, None), mesh=mesh, in_specs=(qkv_spec,) * 3,
                           out_specs=qkv_spec, check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec,) * 3 + (P(bspec, None),), out_specs=qkv_spec,
                       check_vma=False)
    return fn(q, k, v, kv_segment)


def splash_attention(
    q: jax.Array,  # (B, Lq, N, E)
    k: jax.Array,  # (B, Lk, N, E)
    v: jax.Array,
    kv_mask: jax.Array | None = None,  # (B, Lk) bool
    scale: float | None = None,
    *,
    config: SplashConfig | None = None,
    mesh=None,
    head_axis: str = "tensor",
    batch_axes=("data", "fsdp"),
) -> jax.Array:
    """Dense attention on TPU splash; any lengths, optional key mask, optional head sharding."""
    config = config or current_config()
    if mesh is None and current_mesh() is not None:
        mesh, head_axis, batch_axes = current_mesh()
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    lq, lk = config.padded_lengths(Lq, Lk)
    Ep = config.padded_head_dim(E)
    config.validate(lq, lk, Ep)
    scale = E ** -0.5 if scale is None else float(scale)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def prep(x, L):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, L - x.shape[2]), (0, Ep - E)))

    qp, kp, vp = prep(qs, lq), prep(k, lk), prep(v, lk)
    kv_segment = None
    if kv_mask is not None or lk != Lk:
        valid = jnp.ones((B, Lk), bool) if kv_mask is None else kv_mask.astype(bool)
        kv_segment = jnp.pad(jnp.where(valid, 0, 1).astype(jnp.int32), ((0, 0), (0, lk - Lk)), constant_values=1)
    out = splash_masked(qp, kp, vp, kv_segment, (_full_mask(lq, lk),) * N, config, mesh, head_axis, batch_axes)
    return jnp.swapaxes(out[:, :, :Lq, :E], 1, 2).astype(q.dtype)


@functools.lru_cache(maxsize=64)
def _full_mask(lq: int, lk: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam

    return sam.FullMask((lq, lk))


__all__ = ["SplashConfig", "check_splash", "config_scope", "current_config",
           "splash_attention", "splash_masked"]
