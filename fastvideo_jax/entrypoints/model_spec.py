"""What a pipeline directory is, learned without reading a weight: its path, configs, defaults and geometry.

``ModelSpec.open`` checks everything that can fail cheaply (overrides, the model path, ``model_index.json``,
each component's folder and class, the scheduler class) and picks the model's defaults from its DiT config.
``check_request`` then rejects a request the model cannot run (sizes, frame counts, a token grid larger than
the DiT's RoPE table) before minutes go into loading weights.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import TINY_WAN_ID, get_model_defaults
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.loader.component_loader import read_config
from fastvideo_jax.models.loader.pipeline_loader import check_components, read_model_index, resolve_model_path
from fastvideo_jax.models.registry import resolve_model_cls

__all__ = ["ModelSpec", "check_request", "SUPPORTED_PIPELINES", "NEEDED_COMPONENTS"]

SUPPORTED_PIPELINES = frozenset({"WanPipeline"})
NEEDED_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: Path
    config: PipelineConfig
    defaults: SamplingParam
    dit_arch: Any
    vae_arch: Any

    @classmethod
    def open(cls, model: str | Path, *, pipeline_config: PipelineConfig | None = None, **overrides: Any) -> "ModelSpec":
        """``model``: a pipeline directory, a Hugging Face repo id (through the hub cache) or ``"tiny-wan"``.
        ``overrides`` replace PipelineConfig fields and are checked before the model is looked up."""
        (pipeline_config or PipelineConfig()).replace(**overrides).validate()
        if str(model) == TINY_WAN_ID:
            from fastvideo_jax.testing.tiny_pipeline import ensure_tiny_wan  # written on first use

            path = ensure_tiny_wan()
        else:
            path = resolve_model_path(model)
        index = read_model_index(path)
        pipeline_class = read_config(path, "model_index.json").get("_class_name")
        if pipeline_class not in SUPPORTED_PIPELINES:
            raise CheckpointError(f"{path}: pipeline {pipeline_class!r} is not supported yet "
                                  f"(supported: {sorted(SUPPORTED_PIPELINES)})")
        missing = [n for n in NEEDED_COMPONENTS if n not in index or index[n][0] is None]
        if missing:
            raise CheckpointError(f"{path}/model_index.json: missing components {missing}")
        configs = check_components(path, list(NEEDED_COMPONENTS))
        defaults_config, sampling = get_model_defaults(model, configs["transformer"])
        config = (pipeline_config or defaults_config).replace(**overrides).validate()
        return cls(path, config, sampling, _arch(configs["transformer"]), _arch(configs["vae"]))

    def sampling_param(self, **overrides: Any) -> SamplingParam:
        """This model's defaults with ``overrides`` (None keeps a default), checked against the model."""
        param = self.defaults.replace(**overrides)
        check_request(param, self.dit_arch, self.vae_arch)
        return param


def check_request(param: SamplingParam, dit_arch: Any, vae_arch: Any) -> None:
    """``UserError`` for a request this model cannot run: field types and ranges, sizes that do not divide
    into latents and patches, and a token grid longer on some axis than the DiT's RoPE table."""
    spatial, temporal = vae_arch.spatial_compression_ratio, vae_arch.temporal_compression_ratio
    pt, ph, pw = dit_arch.patch_size
    param.validate(spatial, ph, temporal)
    frames = (param.num_frames - 1) // temporal + 1
    if frames % pt:
        raise UserError(f"num_frames={param.num_frames} gives {frames} latent frames, not a multiple of the "
                        f"patch's {pt}")
    grid = (frames // pt, param.height // spatial // ph, param.width // spatial // pw)
    limit = dit_arch.rope_max_seq_len
    if max(grid) > limit:
        axes = ", ".join(f"{name} {n}" for name, n in zip(("frames", "height", "width"), grid) if n > limit)
        raise UserError(
            f"{param.height}x{param.width} with {param.num_frames} frames is too large for this model: its RoPE "
            f"table covers {limit} tokens per axis, the request needs {axes} (at most "
            f"{limit * spatial * ph}x{limit * spatial * pw} pixels, {(limit * pt - 1) * temporal + 1} frames)"
        )


def _arch(raw: dict[str, Any]) -> Any:
    """A component's architecture config from its config.json (unused-key warnings are the loader's to give)."""
    model_cls, _ = resolve_model_cls(raw)
    base = logging.getLogger("fastvideo_jax.configs.models.base")
    level = base.level
    base.setLevel(logging.ERROR)
    try:
        return model_cls.config_class().update_model_arch(raw).arch_config
    finally:
        base.setLevel(level)
