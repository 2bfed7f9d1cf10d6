"""LoRA files <-> a DiT's adapters: Diffusers/PEFT safetensors in, out; original (non-Diffusers) Wan LoRAs in.

Read (``read_lora``): keys ``transformer.<module>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r) as
diffusers' ``save_lora_weights`` writes them (also without the ``transformer.`` prefix, or under PEFT's
``base_model.model.``), or the original layout ``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight``
(or ``lora_A``/``lora_B``) with an optional ``.alpha`` per module, or kohya/musubi-tuner's ``lora_unet_...``
names (mapped by rows of the same table). A name goes through the DiT's
``lora_param_names_mapping`` (original -> Diffusers names) and then its ``param_names_mapping`` (Diffusers ->
ours) to a ``Linear`` (a scanned stack's layer: ``blocks.<i>.``). Scale per module: ``alpha / rank`` with the
file's ``.alpha``, else the ``lora_alpha`` (and ``alpha_pattern``; ``alpha / sqrt(rank)`` under ``use_rslora``)
of the PEFT config diffusers stores in the safetensors metadata (``lora_adapter_metadata``), else 1 (diffusers'
convention: alpha = rank). Everything is checked before anything is returned: names that map to no layer
(another architecture's LoRA), shapes that do not fit, A without B, parts we do not support (full ``diff``
weights, DoRA) are one ``CheckpointError`` listing the names. Biases: PEFT's ``lora_B.bias`` (``lora_bias=True``)
is scaled like the low-rank product; an original LoRA's ``diff_b`` is added as it is (diffusers reads both so).

Write (``save_lora``): the attached adapters under diffusers' names, ``transformer.`` prefix, PyTorch layout,
with each module's ``alpha / rank`` folded into ``lora_B`` (and ``lora_B.bias`` written as it is added: so any
reader gets the same result whether or not it reads alpha metadata) and, when all ranks agree, PEFT metadata ``r = lora_alpha = rank`` (scale 1) as diffusers
writes it: ``WanPipeline.load_lora_weights(dir)`` reads it. Written to a temporary file and renamed (all or
nothing).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flax import nnx

from converters import NameMapper
from fastvideo_jax.errors import CheckpointError, OutputPathError
from fastvideo_jax.models.layers.lora import (
    LoRAWeights, MergedKernels, adapted_layers, attach_lora, linear_layers, lora_weights, merge_lora,
)
from fastvideo_jax.models.loader.safetensors_io import SafetensorsFile, require_float, save_safetensors
from fastvideo_jax.utils.nnx_vars import var_value

__all__ = ["LORA_WEIGHT_NAME", "check_lora_for_component", "load_lora", "lora_file", "read_lora", "save_lora"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name in a LoRA folder
_METADATA_KEY = "lora_adapter_metadata"
_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
_KINDS = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_down.weight", "A"), (".lora_up.weight", "B"),
          (".alpha", "alpha"), (".lora_B.bias", "bias"), (".diff_b", "diff_b"))
_UNSUPPORTED = {".diff": "full weight delta (diff)", ".dora_scale": "DoRA (dora_scale)",
                ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)"}
_SHOWN = 20


def lora_file(path: str | os.PathLike) -> Path:
    """A LoRA ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors`` (or one file)."""
    p = Path(path)
    if p.is_dir():
        if (p / LORA_WEIGHT_NAME).is_file():
            return p / LORA_WEIGHT_NAME
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{p}: a LoRA folder needs {LORA_WEIGHT_NAME} or exactly one .safetensors file "
                                  f"(found {[f.name for f in files]})")
        return files[0]
    if not p.is_file():
        raise CheckpointError(f"{p}: no such LoRA file or folder")
    return p


@dataclass
class _Slot:
    path: str
    layer: int | None
    keys: dict[str, str] = field(default_factory=dict)  # kind -> file key
    module: str = ""  # the module's name in the file (prefix stripped), for alpha_pattern


def _split_key(key: str) -> tuple[str, str | None, str | None]:
    """(module name without prefix, kind or None, unsupported-kind description or None)."""
    name = key
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    for suffix, why in _UNSUPPORTED.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], None, why
    for suffix, kind in _KINDS:
        if name.endswith(suffix):
            return name[: -len(suffix)], kind, None
    return name, None, None


def _resolve(name: str, layers: dict, scanned: tuple[str, ...]) -> tuple[str, int | None] | None:
    """Our dotted module name (``blocks.3.to_q``) -> (layer path, index in its stack or None)."""
    for prefix in scanned:
        if name.startswith(prefix + "."):
            idx, _, rest = name[len(prefix) + 1:].partition(".")
            linear = layers.get(f"{prefix}.{rest}")
            if not (idx.isdigit() and linear is not None):
                return None
            kernel = var_value(linear.kernel)
            return (f"{prefix}.{rest}", int(idx)) if kernel.ndim == 3 and int(idx) < kernel.shape[0] else None
    linear = layers.get(name)
    return (name, None) if linear is not None and var_value(linear.kernel).ndim == 2 else None


def _fail(file: Path, what: str, names: list[str]) -> CheckpointError:
    shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    return CheckpointError(f"{file}: {what}: {shown}")


def _peft_config(metadata: dict[str, str], file: Path) -> dict:
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: metadata {_METADATA_KEY!r} is not JSON ({e})") from None
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    config = prefixed or config
    if config.get("use_dora"):
        raise CheckpointError(f"{file}: a DoRA adapter (use_dora) is not supported")
    return config


def _alpha(config: dict, module: str) -> float | None:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return None if config.get("lora_alpha") is None else float(config["lora_alpha"])


def read_lora(path: str | os.PathLike, model: nnx.Module) -> dict[str, LoRAWeights]:
    """The adapters of a LoRA file for ``model`` (a loaded or abstract DiT), by our layer path, stacked like the
    kernels; ``CheckpointError`` naming every tensor that does not fit, before any data is read."""
    file = lora_file(path)
    st = SafetensorsFile(file)
    if not st.keys():
        raise CheckpointError(f"{file}: holds no tensors")
    arch = model.config.arch_config
    lora_map, param_map = NameMapper(arch.lora_param_names_mapping), NameMapper(arch.param_names_mapping)
    layers = linear_layers(model)
    slots: dict[tuple[str, int | None], _Slot] = {}
    unmatched, unsupported, duplicate = [], [], []
    for key in st.keys():
        module, kind, why = _split_key(key)
        if why is not None:
            unsupported.append(f"{key} ({why})")
            continue
        ours = param_map(lora_map(module + ".weight").name)
        where = None if kind is None or ours.part is not None else _resolve(
            ours.name.removesuffix(".weight"), layers, arch.scanned_prefixes)
        if where is None:
            unmatched.append(key)
            continue
        slot = slots.setdefault(where, _Slot(*where, module=module))
        if kind in slot.keys:
            duplicate.append(key)
        slot.keys[kind] = key
    name = type(model).__name__
    if unmatched:
        raise _fail(file, f"{len(unmatched)} of {len(st.keys())} LoRA tensors match no layer of {name} (a LoRA for "
                    "another model or architecture?)", unmatched)
    if unsupported:
        raise _fail(file, "LoRA parts not supported", unsupported)
    if duplicate:
        raise _fail(file, "tensors that map to a layer already given", duplicate)
    _check_shapes(file, st, slots, layers)
    return _gather(file, st, slots, layers, _peft_config(st.metadata, file))


def _check_shapes(file: Path, st: SafetensorsFile, slots: dict, layers: dict) -> None:
    bad = []
    for slot in slots.values():
        if "A" not in slot.keys or "B" not in slot.keys:
            bad.append(f"{next(iter(slot.keys.values()))} (no {'lora_B' if 'A' in slot.keys else 'lora_A'} for it)")
            continue
        *_, n_in, n_out = var_value(layers[slot.path].kernel).shape
        a, b = st.tensors[slot.keys["A"]].shape, st.tensors[slot.keys["B"]].shape
        if len(a) != 2 or len(b) != 2 or a[1] != n_in or b[0] != n_out or a[0] != b[1]:
            bad.append(f"{slot.keys['A']} {list(a)} / lora_B {list(b)} (the layer is {n_in} -> {n_out}: expects "
                       f"[r, {n_in}] / [{n_out}, r])")
        if "alpha" in slot.keys and math.prod(st.tensors[slot.keys["alpha"]].shape) != 1:
            bad.append(f"{slot.keys['alpha']} (alpha must be one number)")
        for kind in ("bias", "diff_b"):
            if kind in slot.keys and st.tensors[slot.keys[kind]].shape != (n_out,):
                bad.append(f"{slot.keys[kind]} {list(st.tensors[slot.keys[kind]].shape)} (expects [{n_out}])")
        if "bias" in slot.keys and "diff_b" in slot.keys:
            bad.append(f"{slot.keys['diff_b']} (the layer also has {slot.keys['bias']})")
        for key in slot.keys.values():
            require_float(st.tensors[key], key)
    if bad:
        raise _fail(file, "LoRA tensors whose shapes do not fit the model", bad)


def _gather(file: Path, st: SafetensorsFile, slots: dict, layers: dict, config: dict) -> dict[str, LoRAWeights]:
    by_path: dict[str, list[_Slot]] = {}
    for slot in slots.values():
        by_path.setdefault(slot.path, []).append(slot)
    rslora = bool(config.get("use_rslora"))
    out = {}
    for path, group in by_path.items():
        kernel = var_value(layers[path].kernel)
        *lead, n_in, n_out = kernel.shape
        rank = max(st.tensors[s.keys["A"]].shape[0] for s in group)
        A = np.zeros((*lead, n_in, rank), np.float32)
        B = np.zeros((*lead, rank, n_out), np.float32)
        scale = np.zeros(lead, np.float32)
        biased = any("bias" in s.keys or "diff_b" in s.keys for s in group)
        bias = np.zeros((*lead, n_out), np.float32) if biased else None
        for s in group:
            a, b = st.get(s.keys["A"]).astype(np.float32), st.get(s.keys["B"]).astype(np.float32)
            r = a.shape[0]
            if "alpha" in s.keys:
                alpha = float(st.get(s.keys["alpha"]).astype(np.float64).reshape(()))
            else:
                alpha = _alpha(config, s.module)
            at = () if s.layer is None else (s.layer,)
            A[(*at, slice(None), slice(0, r))] = a.T
            B[(*at, slice(0, r))] = b.T
            scale[at] = 1.0 if alpha is None else alpha / (math.sqrt(r) if rslora else r)
            if "bias" in s.keys:  # PEFT: lora_B's bias is scaled with its weight
                bias[at] = st.get(s.keys["bias"]).astype(np.float32) * scale[at]
            elif "diff_b" in s.keys:  # a raw bias delta
                bias[at] = st.get(s.keys["diff_b"]).astype(np.float32)
        out[path] = LoRAWeights(A, B, scale, bias)
    return out


def check_lora_for_component(path: str | os.PathLike, component_dir: str | os.PathLike, **overrides) -> None:
    """``read_lora`` against the DiT of ``component_dir`` (with the config ``overrides`` the loader will apply)
    built abstractly (no weight is read, nothing is allocated), so a LoRA that does not fit is refused before a
    model loads."""
    from fastvideo_jax.models.loader.component_loader import read_config
    from fastvideo_jax.models.registry import resolve_model_cls

    raw = read_config(component_dir)
    model_cls, _ = resolve_model_cls(raw, str(Path(component_dir) / "config.json"))
    config = model_cls.config_class().update_model_arch(raw)
    if overrides:
        config = config.update_model_config(**overrides)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    read_lora(path, abstract)


def load_lora(model: nnx.Module, path: str | os.PathLike, *, strength: float = 1.0, merge: bool = True,
              dtype=None) -> MergedKernels | None:
    """Read a LoRA file (checked in full first) and attach it to ``model``; ``merge``: fold it into the kernels
    (returns what ``unmerge_lora`` needs to restore them), else keep the adapters separate (returns None)."""
    weights = read_lora(path, model)
    taken = sorted(adapted_layers(model))
    if taken:
        raise ValueError(f"{type(model).__name__} already carries LoRA adapters ({taken[:3]}...): remove them first")
    attach_lora(model, weights, strength=strength, dtype=dtype)
    return merge_lora(model) if merge else None


# ---- writing ---------------------------------------------------------------------------------------------
def _export_name(path: str, layer: int | None, scanned: tuple[str, ...], reverse: NameMapper) -> str:
    if layer is not None:
        prefix = next(p for p in scanned if path.startswith(p + "."))
        path = f"{prefix}.{layer}.{path[len(prefix) + 1:]}"
    mapped = reverse(path + ".weight")
    if mapped.split is not None or mapped.part is not None:
        raise ValueError(f"{path}: a split/merged parameter has no single diffusers LoRA name")
    return mapped.name.removesuffix(".weight")


def save_lora(model: nnx.Module, path: str | os.PathLike, *, dtype=np.float32) -> Path:
    """Write ``model``'s adapters as a diffusers LoRA: ``path`` is a ``.safetensors`` file or a folder (then
    ``pytorch_lora_weights.safetensors`` inside it). Returns the file written."""
    arch = model.config.arch_config
    weights = lora_weights(model)
    if not weights:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapter to save")
    reverse, forward = NameMapper(arch.reverse_param_names_mapping), NameMapper(arch.param_names_mapping)
    layers = linear_layers(model)
    tensors, ranks, modules = {}, set(), []
    for layer_path, w in weights.items():
        rows = [None] if w.scale.ndim == 0 else range(w.scale.shape[0])
        for layer in rows:
            at = () if layer is None else (layer,)
            if float(w.scale[at]) == 0.0:
                continue  # no adapter on this layer of the stack
            module = _export_name(layer_path, layer, arch.scanned_prefixes, reverse)
            if _resolve(forward(module + ".weight").name.removesuffix(".weight"), layers,
                        arch.scanned_prefixes) != (layer_path, layer):
                raise ValueError(f"{layer_path}[{layer}] exports as {module!r}, which does not load back: the DiT's "
                                 "reverse_param_names_mapping and param_names_mapping disagree")
            a = np.asarray(w.A[at], np.float32)
            b = np.asarray(w.B[at], np.float32) * np.float32(w.scale[at])
            tensors[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
            tensors[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(b.T).astype(dtype)
            if w.bias is not None:  # scale 1 in the file: the bias goes as it is added
                tensors[f"transformer.{module}.lora_B.bias"] = np.asarray(w.bias[at], np.float32).astype(dtype)
            ranks.add(a.shape[-1])
            modules.append(module)
    metadata = {"format": "pt"}
    if len(ranks) == 1:
        (r,) = ranks
        config = {"r": r, "lora_alpha": r, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
                  "use_dora": False, "use_rslora": False,
                  "lora_bias": any(k.endswith(".lora_B.bias") for k in tensors)}
        metadata[_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in config.items()}, indent=2,
                                             sort_keys=True)
    return _write(Path(path), tensors, metadata)


def _write(path: Path, tensors: dict, metadata: dict) -> Path:
    target = path / LORA_WEIGHT_NAME if path.suffix != ".safetensors" else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".lora-", suffix=".tmp")
        os.close(fd)
        try:
            save_safetensors(tmp, tensors, metadata)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise OutputPathError(f"{target}: cannot write the LoRA file ({e.strerror or e})") from None
    return target
