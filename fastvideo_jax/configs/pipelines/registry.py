"""Defaults per model id: a PipelineConfig preset and SamplingParam defaults, found by id or short name."""

from __future__ import annotations

from pathlib import Path

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.wan import WanT2V480PConfig, WanT2V720PConfig, WanTinyConfig
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, SamplingParam

_DEFAULTS: dict[str, tuple[PipelineConfig, SamplingParam]] = {}


def register_model_defaults(model_id: str, pipeline: PipelineConfig, sampling: SamplingParam) -> None:
    _DEFAULTS[model_id] = (pipeline, sampling)


register_model_defaults(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    WanT2V480PConfig(),
    SamplingParam(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=3.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT),
)
register_model_defaults(
    "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    WanT2V720PConfig(),
    SamplingParam(height=720, width=1280, num_frames=81, num_inference_steps=50, guidance_scale=5.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT),
)
register_model_defaults(
    "tiny-wan",
    WanTinyConfig(),
    SamplingParam(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, fps=8),
)


def get_model_defaults(model: str | Path) -> tuple[PipelineConfig, SamplingParam]:
    """Exact id, then the last path component (a local copy of a known repo), else Wan 480p defaults."""
    text = str(model).rstrip("/")
    if text in _DEFAULTS:
        return _DEFAULTS[text]
    short = Path(text).name.lower()
    for model_id, value in _DEFAULTS.items():
        if model_id.split("/")[-1].lower() == short:
            return value
    return WanT2V480PConfig(), SamplingParam(negative_prompt=WAN_NEGATIVE_PROMPT)
