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
from fastvideo_jax.configs.pipelines.hunyuan import FastHunyuanConfig, HunyuanConfig
from fastvideo_jax.configs.pipelines.stepvideo import StepVideoT2VConfig, StepVideoT2VTurboConfig
from fastvideo_jax.configs.pipelines.wan import (
    FASTWAN_DMD_STEPS, FastWan21T2V480PConfig, FastWan22TI2V5BConfig, Wan22I2VA14BConfig, Wan22T2VA14BConfig,
    Wan22TI2V5BConfig, WanI2V480PConfig, WanI2V720PConfig, WanT2V480PConfig, WanT2V720PConfig, WanTinyConfig,
)
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT_ZH, SamplingParam
from fastvideo_jax.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["TINY_MODEL_IDS", "TINY_STEPVIDEO_ID", "TINY_WAN_ID", "TINY_WAN_I2V_ID", "ModelDefaults", "get_model_defaults", "register_model_defaults", "registered_models"]

TINY_WAN_ID = "tiny-wan"  # the built-in random-weight demo pipeline (fastvideo_jax.testing.tiny_pipeline)
TINY_WAN_I2V_ID = "tiny-wan-i2v"  # its image-to-video twin (WanImageToVideoPipeline, tiny CLIP vision tower)
TINY_STEPVIDEO_ID = "tiny-stepvideo"  # StepVideoPipeline with random weights (fastvideo_jax.testing.tiny_stepvideo)
TINY_MODEL_IDS = (TINY_WAN_ID, TINY_WAN_I2V_ID, TINY_STEPVIDEO_ID)  # written into the cache on first use


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """A model's presets and its signature: ``transformer/config.json`` fields (``dit``) and ``model_index.json``
    fields (``index``) that identify it. An entry with an ``index`` signature matches only when the caller
    gives the model index."""

    model_id: str
    pipeline: PipelineConfig
    sampling: SamplingParam
    dit: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    index: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def matches(self, transformer_config: Mapping[str, Any], model_index: Mapping[str, Any] | None = None) -> bool:
        if not self.dit or not all(transformer_config.get(k) == v for k, v in self.dit.items()):
            return False
        return not self.index or (model_index is not None
                                  and all(model_index.get(k) == v for k, v in self.index.items()))

    @property
    def specificity(self) -> int:
        return len(self.dit) + len(self.index)


_DEFAULTS: dict[str, ModelDefaults] = {}


def register_model_defaults(model_id: str, pipeline: PipelineConfig, sampling: SamplingParam,
                            dit: Mapping[str, Any] | None = None, index: Mapping[str, Any] | None = None) -> None:
    """Defaults for ``model_id``; ``dit`` (transformer config fields) and ``index`` (model_index.json fields) let
    a local copy or a converted directory of the same model find them by content."""
    _DEFAULTS[model_id] = ModelDefaults(model_id, pipeline, sampling, MappingProxyType(dict(dit or {})),
                                        MappingProxyType(dict(index or {})))


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
# Wan2.1 image-to-video. The 480P and 720P checkpoints have the same DiT: by content, 480P (as FastVideo's
# detector resolves a WanImageToVideoPipeline).
_I2V_14B = dict(in_channels=36, image_dim=1280, attention_head_dim=128, num_attention_heads=40, num_layers=40)
register_model_defaults(
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    WanI2V480PConfig(),
    SamplingParam(height=480, width=832, num_frames=81, num_inference_steps=40, guidance_scale=5.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT),
    dit=_I2V_14B,
)
register_model_defaults(
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    WanI2V720PConfig(),
    SamplingParam(height=720, width=1280, num_frames=81, num_inference_steps=40, guidance_scale=5.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT),
)

# Wan2.2. TI2V-5B: its own DiT shape (48 channels). A14B: each expert has the 14B shape, so the T2V model is told
# from Wan2.1 T2V-14B by its model index (boundary_ratio); the I2V experts' 36 channels without a CLIP branch
# are unique. FastVideo's A14B presets leave the size at its generic 720x1280x125; these use Wan's 81 frames.
_TI2V_5B = dict(in_channels=48, attention_head_dim=128, num_attention_heads=24, num_layers=30)
register_model_defaults(
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    Wan22TI2V5BConfig(),
    SamplingParam(height=704, width=1280, num_frames=121, fps=24, num_inference_steps=50, guidance_scale=5.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT_ZH),
    dit=_TI2V_5B,
)
register_model_defaults(
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    Wan22T2VA14BConfig(),
    SamplingParam(height=720, width=1280, num_frames=81, fps=16, num_inference_steps=40, guidance_scale=4.0,
                  guidance_scale_2=3.0, negative_prompt=WAN_NEGATIVE_PROMPT_ZH),
    dit=dict(_T2V, num_attention_heads=40, num_layers=40), index=dict(boundary_ratio=0.875),
)
register_model_defaults(
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    Wan22I2VA14BConfig(),
    SamplingParam(height=720, width=1280, num_frames=81, fps=16, num_inference_steps=40, guidance_scale=3.5,
                  guidance_scale_2=3.5, negative_prompt=WAN_NEGATIVE_PROMPT_ZH),
    dit=dict(in_channels=36, image_dim=None, attention_head_dim=128, num_attention_heads=40, num_layers=40),
)

# FastWan (DMD, few steps, no CFG: guidance_scale 1.0; FastVideo's presets list 3.0 / 5.0 and 50 steps, which
# its DMD stage ignores). FastWan2.1 checkpoints say WanDMDPipeline in their model index; FastWan2.2's DiT is
# TI2V-5B's, so by content it resolves to Wan2.2-TI2V-5B.
_DMD_STEPS = len(FASTWAN_DMD_STEPS)
for _id in ("FastVideo/FastWan2.1-T2V-1.3B-Diffusers", "FastVideo/FastWan2.1-T2V-14B-480P-Diffusers"):
    _heads, _layers = (12, 30) if "1.3B" in _id else (40, 40)
    register_model_defaults(
        _id,
        FastWan21T2V480PConfig(),
        SamplingParam(height=448, width=832, num_frames=61, fps=16, num_inference_steps=_DMD_STEPS,
                      guidance_scale=1.0, negative_prompt=WAN_NEGATIVE_PROMPT),
        dit=dict(_T2V, num_attention_heads=_heads, num_layers=_layers), index=dict(_class_name="WanDMDPipeline"),
    )
for _id in ("FastVideo/FastWan2.2-TI2V-5B-Diffusers", "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers"):
    register_model_defaults(
        _id,
        FastWan22TI2V5BConfig(),
        SamplingParam(height=704, width=1280, num_frames=121, fps=24, num_inference_steps=_DMD_STEPS,
                      guidance_scale=1.0, negative_prompt=WAN_NEGATIVE_PROMPT_ZH),
    )

register_model_defaults(
    TINY_WAN_ID,
    WanTinyConfig(),
    SamplingParam(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, fps=8),
    dit=dict(in_channels=16, attention_head_dim=12, num_attention_heads=2, num_layers=2),
)
register_model_defaults(
    TINY_WAN_I2V_ID,
    WanTinyConfig(),
    SamplingParam(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, fps=8),
    dit=dict(in_channels=36, image_dim=24, attention_head_dim=12, num_attention_heads=2, num_layers=2),
)


_HUNYUAN_DIT = dict(in_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40)
_HUNYUAN_SAMPLING = SamplingParam(height=720, width=1280, num_frames=129, num_inference_steps=50, guidance_scale=6.0,
                                  fps=24)
register_model_defaults("hunyuanvideo-community/HunyuanVideo", HunyuanConfig(), _HUNYUAN_SAMPLING, dit=_HUNYUAN_DIT,
                        index=dict(_class_name="HunyuanVideoPipeline"))
# Same DiT shape as HunyuanVideo: found by its id only (a local copy by content gets HunyuanVideo's defaults).
register_model_defaults("FastVideo/FastHunyuan-diffusers", FastHunyuanConfig(),
                        dataclasses.replace(_HUNYUAN_SAMPLING, num_inference_steps=6))

# StepVideo-T2V: the release's 544x992, 204 frames (12 VAE chunks of 17), 25 fps; T2V 50 steps CFG 9 shift 13 (the
# 30-50 step range's top, FastVideo's default), Turbo 15 steps CFG 5 shift 17 (10-15 steps). The Turbo DiT has
# the T2V's shape: found by its id only.
_STEPVIDEO_DIT = dict(in_channels=64, num_attention_heads=48, attention_head_dim=128, num_layers=48)
_STEPVIDEO_SAMPLING = SamplingParam(height=544, width=992, num_frames=204, num_inference_steps=50, guidance_scale=9.0,
                                    fps=25)
for _id in ("stepfun-ai/stepvideo-t2v", "FastVideo/stepvideo-t2v-diffusers"):
    register_model_defaults(_id, StepVideoT2VConfig(), _STEPVIDEO_SAMPLING, dit=_STEPVIDEO_DIT,
                            index=dict(_class_name="StepVideoPipeline"))
register_model_defaults("stepfun-ai/stepvideo-t2v-turbo", StepVideoT2VTurboConfig(),
                        dataclasses.replace(_STEPVIDEO_SAMPLING, num_inference_steps=15, guidance_scale=5.0))

register_model_defaults(
    TINY_STEPVIDEO_ID,
    StepVideoT2VConfig(dit_precision="fp32", vae_decode_precision="fp32", text_encoder_precisions=("fp32", "fp32"),
                       text_len=32, clip_len=16),
    SamplingParam(height=32, width=32, num_frames=17, num_inference_steps=3, guidance_scale=9.0, fps=8),
)


def find_model_defaults(model: str | Path, transformer_config: Mapping[str, Any] | None = None,
                        model_index: Mapping[str, Any] | None = None) -> ModelDefaults | None:
    """The registered id ``model``; else, of the entries whose signature ``transformer_config`` (and
    ``model_index``, when given) matches, the most specific (the first registered on a tie); else None."""
    text = str(model).rstrip("/")
    if text in _DEFAULTS:
        return _DEFAULTS[text]
    if transformer_config is not None:
        found = [e for e in _DEFAULTS.values() if e.matches(transformer_config, model_index)]
        if found:
            return max(found, key=lambda e: e.specificity)  # max keeps the first of equals
    return None


def get_model_defaults(model: str | Path, transformer_config: Mapping[str, Any] | None = None,
                       model_index: Mapping[str, Any] | None = None, *,
                       fallback: tuple[PipelineConfig, SamplingParam] | None = None,
                       family: str = "this pipeline") -> tuple[PipelineConfig, SamplingParam]:
    """A registered model's presets (by id, else by its DiT config and model_index.json); else ``fallback``, the
    pipeline family's generic defaults (logged); with neither, a ``UserError`` (never another family's defaults
    silently)."""
    entry = find_model_defaults(model, transformer_config, model_index)
    if entry is not None:
        return entry.pipeline, entry.sampling
    if fallback is None:
        raise UserError(f"{model}: no registered presets match it and {family} has no generic defaults; "
                        f"register them with register_model_defaults (registered: {sorted(_DEFAULTS)})")
    logger.warning("%s: no registered defaults match its transformer config; using %s's generic defaults",
                   str(model).rstrip("/"), family)
    return fallback
