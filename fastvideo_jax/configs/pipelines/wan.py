"""Wan2.1 pipeline presets (FastVideo's values): flow shift and per-component precision."""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.pipelines.base import PipelineConfig


@dataclasses.dataclass(frozen=True)
class WanT2V480PConfig(PipelineConfig):
    flow_shift: float | None = 3.0
    dit_precision: str = "bf16"
    vae_decode_precision: str = "bf16"
    text_encoder_precisions: tuple[str, ...] = ("fp32",)


@dataclasses.dataclass(frozen=True)
class WanT2V720PConfig(WanT2V480PConfig):
    flow_shift: float | None = 5.0


@dataclasses.dataclass(frozen=True)
class WanTinyConfig(WanT2V480PConfig):
    """The random-weight tiny checkpoint: everything fp32 (it runs on CPU in seconds), short text."""

    dit_precision: str = "fp32"
    vae_decode_precision: str = "fp32"
    text_len: int = 32
