"""HunyuanVideo pipeline presets (FastVideo's values): flow shift, per-component precision, text length."""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.pipelines.base import PipelineConfig


@dataclasses.dataclass(frozen=True)
class HunyuanConfig(PipelineConfig):
    """HunyuanVideo: flow shift 7, embedded guidance (no CFG batch), LLaMA and CLIP-L in fp16 and the VAE in fp16
    as the checkpoint ships them, 256 prompt tokens after the template crop."""

    flow_shift: float | None = 7.0
    dit_precision: str = "bf16"
    vae_decode_precision: str = "fp16"
    text_encoder_precisions: tuple[str, ...] = ("fp16", "fp16")
    text_len: int = 256
    clean_prompts: bool = False  # Diffusers' HunyuanVideoPipeline does not clean prompts


@dataclasses.dataclass(frozen=True)
class FastHunyuanConfig(HunyuanConfig):
    """FastHunyuan (6-step distilled): flow shift 17."""

    flow_shift: float | None = 17.0
