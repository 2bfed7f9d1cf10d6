"""Random-weight checkpoints in Diffusers layout, written by our own models (no torch needed).

A model is built from a preset with random initialisation, its parameters exported through the reverse name
mapping, and saved as ``config.json`` + safetensors, exactly what ``save_pretrained`` of the PyTorch class
writes. The weights are random: such a checkpoint exercises every code path but generates noise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from fastvideo_jax.models.loader.component_loader import export_component
from fastvideo_jax.models.loader.safetensors_io import save_safetensors


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
    with nnx.use_eager_sharding(False):
        model = model_cls(config, rngs=nnx.Rngs(seed))
    tensors = export_component(model)
    del model
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / weights_name, tensors, metadata={"format": "pt"})
    key = "architectures" if weights_name == "model.safetensors" else "_class_name"
    body = {key: [class_name] if key == "architectures" else class_name, **config.arch_config.to_dict(),
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
