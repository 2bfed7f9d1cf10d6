"""Defaults per model: a PipelineConfig preset and SamplingParam defaults, found by model id or by what the
checkpoint contains (its DiT's ``config.json``), never by the folder's name."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.wan import WanT2V480PConfig, WanT2V720PConfig, WanTinyConfig
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, SamplingParam

logger = logging.getLogger(__name__)

__all__ = ["TINY_WAN_ID", "ModelDefaults", "get_model_defaults", "register_model_defaults", "registered_models"]

TINY_WAN_ID = "tiny-wan"  # the built-in random-weight demo pipeline (fastvideo_jax.testing.tiny_pipeline)


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """A model's presets and its signature: ``transformer/config.json`` fields that identify it."""

    model_id: str
    pipeline: PipelineConfig
    sampling: SamplingParam
    dit: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def matches(self, transformer_config: Mapping[str, Any]) -> bool:
        return bool(self.dit) and all(transformer_config.get(k) == v for k, v in self.dit.items())


_DEFAULTS: dict[str, ModelDefaults] = {}
_FALLBACK = ModelDefaults("(unknown Wan model)", WanT2V480PConfig(), SamplingParam(negative_prompt=WAN_NEGATIVE_PROMPT))


def register_model_defaults(model_id: str, pipeline: PipelineConfig, sampling: SamplingParam,
                            dit: Mapping[str, Any] | None = None) -> None:
    """Defaults for ``model_id``; ``dit`` (transformer config fields) lets a local copy or a converted
    directory of the same model find them by content."""
    _DEFAULTS[model_id] = ModelDefaults(model_id, pipeline, sampling, MappingProxyType(dict(dit or {})))


def registered_models() -> tuple[ModelDefaults, ...]:
    return tuple(_DEFAULTS.values())


_T2V = dict(in_channels=16, attention_head_dim=128)
register_model_defaults(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    WanT2V480PConfig(),
    SamplingParam(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=3.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT),
    dit=dict(_T2V, num_attention_heads=12, num_layers=30),
)
register_model_defaults(
    "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    WanT2V720PConfig(),
    SamplingParam(height=720, width=1280, num_frames=81, num_inference_steps=50, guidance_scale=5.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT),
    dit=dict(_T2V, num_attention_heads=40, num_layers=40),
)
register_model_defaults(
    TINY_WAN_ID,
    WanTinyConfig(),
    SamplingParam(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, fps=8),
    dit=dict(in_channels=16, attention_head_dim=12, num_attention_heads=2, num_layers=2),
)


def find_model_defaults(model: str | Path, transformer_config: Mapping[str, Any] | None = None) -> ModelDefaults:
    """The registered id ``model``; else the entry whose DiT signature ``transformer_config`` matches; else
    Wan 480p defaults (logged)."""
    text = str(model).rstrip("/")
    if text in _DEFAULTS:
        return _DEFAULTS[text]
    for entry in _DEFAULTS.values():
        if transformer_config is not None and entry.matches(transformer_config):
            return entry
    logger.warning("%s: no registered defaults match its transformer config; using Wan 480p defaults", text)
    return _FALLBACK


def get_model_defaults(model: str | Path, transformer_config: Mapping[str, Any] | None = None
                       ) -> tuple[PipelineConfig, SamplingParam]:
    entry = find_model_defaults(model, transformer_config)
    return entry.pipeline, entry.sampling
