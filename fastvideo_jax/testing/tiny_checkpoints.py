"""Random-weight checkpoints in Diffusers layout, written by our own models (no torch needed).

A model is built from a preset with random parameters (numpy draws by parameter kind), its parameters exported through the reverse name
mapping, and saved as ``config.json`` + safetensors, exactly what ``save_pretrained`` of the PyTorch class
writes. The weights are random: such a checkpoint exercises every code path but generates noise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastvideo_jax.models.loader.component_loader import build_abstract, export_component
from fastvideo_jax.utils.nnx_vars import var_axes, var_value
from fastvideo_jax.models.loader.safetensors_io import save_safetensors


def _random_leaf(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Plausible random values by parameter kind (Flax layout: a kernel's last axis is its output)."""
    if name in ("scale", "gamma"):
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "kernel":
        fan_in = max(int(np.prod(shape[:-1])), 1)
        value = rng.uniform(-1.0, 1.0, shape) / np.sqrt(fan_in)
    elif name == "bias":
        value = 0.02 * rng.standard_normal(shape)
    else:  # embeddings, modulation tables, position embeddings
        value = rng.standard_normal(shape) / np.sqrt(max(shape[-1], 1))
    return value.astype(dtype)


def random_state(abstract: nnx.State, seed: int = 0) -> nnx.State:
    """Random values for an abstract state, drawn with numpy (no per-shape XLA compilations)."""
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        value = var_value(var)
        stacked = (var_axes(var) or (None,))[0] == "layers"
        name = str(path[-1])
        arr = _random_leaf(rng, name, tuple(value.shape[1:] if stacked else value.shape), np.dtype(value.dtype))
        if stacked:
            arr = np.stack([_random_leaf(rng, name, arr.shape, arr.dtype) for _ in range(value.shape[0])])
        flat.append((path, var.replace(jnp.asarray(arr))))
    return nnx.from_flat_state(flat)


def write_random_component(
    directory: str | Path,
    model_cls: type,
    class_name: str,
    arch: Mapping[str, Any],
    *,
    weights_name: str = "diffusion_pytorch_model.safetensors",
    precision: str = "fp32",
    seed: int = 0,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Build ``model_cls`` from config.json fields ``arch`` with random weights and save it to ``directory``."""
    directory = Path(directory)
    config = model_cls.config_class().update_model_arch(dict(arch)).update_model_config(precision=precision)
    graphdef, abstract = build_abstract(model_cls, config)
    model = nnx.merge(graphdef, random_state(abstract, seed))
    tensors = export_component(model)
    del model
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / weights_name, tensors, metadata={"format": "pt"})
    key = "architectures" if weights_name == "model.safetensors" else "_class_name"
    body = {**config.arch_config.to_dict(), key: [class_name] if key == "architectures" else class_name,
            **(extra_config or {})}
    (directory / "config.json").write_text(json.dumps(body, indent=2))
    return directory


def write_random_dit(directory: str | Path, preset: str = "tiny", precision: str = "fp32", seed: int = 0) -> Path:
    """A random ``WanTransformer3DModel`` checkpoint of a preset (``tiny``, ``wan2.1-t2v-1.3b``, ...)."""
    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
    from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel

    with jax.default_device(jax.devices("cpu")[0]):
        return write_random_component(
            directory, WanTransformer3DModel, "WanTransformer3DModel", WAN_PRESETS[preset], precision=precision, seed=seed
        )


def write_random_hunyuan_dit(directory: str | Path, preset: str = "tiny", precision: str = "fp32",
                             seed: int = 0) -> Path:
    """A random ``HunyuanVideoTransformer3DModel`` checkpoint of a preset (``tiny``, ``hunyuanvideo``)."""
    from fastvideo_jax.configs.models.dits.hunyuanvideo import HUNYUAN_PRESETS
    from fastvideo_jax.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel

    with jax.default_device(jax.devices("cpu")[0]):
        return write_random_component(directory, HunyuanVideoTransformer3DModel, "HunyuanVideoTransformer3DModel",
                                      HUNYUAN_PRESETS[preset], precision=precision, seed=seed)


def write_random_vae(directory: str | Path, preset: str = "tiny", precision: str = "fp32", seed: int = 0) -> Path:
    """A random ``AutoencoderKLWan`` checkpoint of a preset: ``tiny`` (Wan2.1 layout, 16 channels, 4x8x8),
    ``tiny-wan2.2`` (Wan2.2 layout: 48 channels, 4x16x16, residual stages, 2x2 patchify), ``wan2.1``, ..."""
    from fastvideo_jax.configs.models.vaes.wanvae import WAN_VAE_PRESETS
    from fastvideo_jax.models.vaes.wanvae import AutoencoderKLWan

    if preset not in WAN_VAE_PRESETS:
        raise KeyError(f"unknown Wan VAE preset {preset!r}; presets: {sorted(WAN_VAE_PRESETS)}")
    with jax.default_device(jax.devices("cpu")[0]):
        return write_random_component(
            directory, AutoencoderKLWan, "AutoencoderKLWan", WAN_VAE_PRESETS[preset], precision=precision, seed=seed
        )


def write_random_llama(directory: str | Path, preset: str = "tiny", precision: str = "fp32", seed: int = 0,
                       **overrides: Any) -> Path:
    """A random ``LlamaModel`` text-encoder checkpoint (Transformers layout, ``model.safetensors``) of a preset
    (``tiny``: GQA 6/2 heads, 3 layers; ``llava-llama-3-8b``), config.json fields replaced by ``overrides``
    (e.g. ``vocab_size`` to fit a tokenizer)."""
    from fastvideo_jax.configs.models.encoders.llama import LLAMA_PRESETS
    from fastvideo_jax.models.encoders.llama import LlamaModel

    if preset not in LLAMA_PRESETS:
        raise KeyError(f"unknown LLaMA preset {preset!r}; presets: {sorted(LLAMA_PRESETS)}")
    with jax.default_device(jax.devices("cpu")[0]):
        return write_random_component(
            directory, LlamaModel, "LlamaModel", {**LLAMA_PRESETS[preset], **overrides},
            weights_name="model.safetensors", precision=precision, seed=seed, extra_config={"model_type": "llama"})


def write_random_hunyuan_vae(directory: str | Path, preset: str = "tiny", precision: str = "fp32",
                             seed: int = 0) -> Path:
    """A random ``AutoencoderKLHunyuanVideo`` checkpoint of a preset: ``tiny`` (3 stages, 16 latent channels,
    4x8x8) or ``hunyuanvideo`` (the released layout)."""
    from fastvideo_jax.configs.models.vaes.hunyuanvae import HUNYUAN_VAE_PRESETS
    from fastvideo_jax.models.vaes.hunyuanvae import AutoencoderKLHunyuanVideo

    if preset not in HUNYUAN_VAE_PRESETS:
        raise KeyError(f"unknown Hunyuan VAE preset {preset!r}; presets: {sorted(HUNYUAN_VAE_PRESETS)}")
    with jax.default_device(jax.devices("cpu")[0]):
        return write_random_component(directory, AutoencoderKLHunyuanVideo, "AutoencoderKLHunyuanVideo",
                                      HUNYUAN_VAE_PRESETS[preset], precision=precision, seed=seed)


def write_random_stepvideo_dit(directory: str | Path, preset: str = "tiny", precision: str = "fp32",
                               seed: int = 0) -> Path:
    """A random ``StepVideoModel`` checkpoint of a preset (``tiny``: 2 layers, 2 heads x 128, 8 channels, text
    widths 48 (LLM) and 24 (CLIP); ``stepvideo-t2v``: the released 30B layout)."""
    from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS
    from fastvideo_jax.models.dits.stepvideo import StepVideoModel

    if preset not in STEPVIDEO_PRESETS:
        raise KeyError(f"unknown StepVideo DiT preset {preset!r}; presets: {sorted(STEPVIDEO_PRESETS)}")
    with jax.default_device(jax.devices("cpu")[0]):
        return write_random_component(directory, StepVideoModel, "StepVideoModel", STEPVIDEO_PRESETS[preset],
                                      precision=precision, seed=seed)


def write_random_stepvideo_vae(directory: str | Path, preset: str = "tiny", precision: str = "fp32",
                               seed: int = 0) -> Path:
    """A random ``AutoencoderKLStepvideo`` checkpoint of a preset (``tiny``: 4 latent channels, 32-64 wide;
    ``stepvideo``: the release's 499M layout) under the release's tensor names."""
    from fastvideo_jax.configs.models.vaes.stepvideovae import STEPVIDEO_VAE_PRESETS
    from fastvideo_jax.models.vaes.stepvideovae import AutoencoderKLStepvideo

    if preset not in STEPVIDEO_VAE_PRESETS:
        raise KeyError(f"unknown StepVideo VAE preset {preset!r}; presets: {sorted(STEPVIDEO_VAE_PRESETS)}")
    with jax.default_device(jax.devices("cpu")[0]):
        return write_random_component(directory, AutoencoderKLStepvideo, "AutoencoderKLStepvideo",
                                      STEPVIDEO_VAE_PRESETS[preset], precision=precision, seed=seed)
