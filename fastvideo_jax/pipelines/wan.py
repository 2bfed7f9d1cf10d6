"""Wan2.1 text-to-video (``WanPipeline``): validation -> text encoding -> timesteps -> latents -> denoising (CFG)
-> VAE decode -> uint8 frames, built from the shared stages."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy
from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.wan import WanT2V480PConfig
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, SamplingParam
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.pipelines.base import ComposedPipeline
from fastvideo_jax.pipelines.stages import (
    DecodingStage,
    DenoisingStage,
    InputValidationStage,
    LatentPreparationStage,
    PipelineStage,
    TextEncodingStage,
    TimestepPreparationStage,
)

__all__ = ["WanPipeline"]


class WanPipeline(ComposedPipeline):
    _required_components = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")

    def __init__(self, components: Mapping[str, Any], config: PipelineConfig, *,
                 mask_strategy: MaskStrategy | None = None):
        components = dict(components)
        scheduler = components.get("scheduler")
        if scheduler is not None and config.flow_shift is not None:
            components["scheduler"] = dataclasses.replace(scheduler, shift=float(config.flow_shift))
        self.mask_strategy = mask_strategy
        super().__init__(components, config)

    @classmethod
    def default_config(cls) -> tuple[PipelineConfig, SamplingParam]:
        return WanT2V480PConfig(), SamplingParam(negative_prompt=WAN_NEGATIVE_PROMPT)

    def create_stages(self) -> list[PipelineStage]:
        c, dit, vae = self.config, self.transformer, self.vae
        dit_arch = dit.config.arch_config
        vae_arch = vae.config.arch_config if vae is not None else None
        return [
            InputValidationStage(dit_arch, vae_arch),
            TextEncodingStage(self.tokenizer, self.text_encoder, text_len=c.text_len, clean=c.clean_prompts,
                              dtype=to_dtype(dit.config.precision), offload=c.text_encoder_offload),
            TimestepPreparationStage(self.scheduler),
            LatentPreparationStage(dit_arch.num_channels_latents,
                                   *((vae_arch.temporal_compression_ratio, vae_arch.spatial_compression_ratio)
                                     if vae_arch is not None else (4, 8))),
            DenoisingStage(dit, self.scheduler, mask_strategy=self.mask_strategy),
            DecodingStage(vae, tiled=c.vae_tiling),
        ]

    # ---- the stages one at a time (benchmarks time them separately) -------------------------------------
    @property
    def mesh(self):
        return self.stage(DenoisingStage).mesh

    def encode_text(self, prompts: list[str], negative: list[str] | None) -> jax.Array:
        return self.stage(TextEncodingStage).encode(prompts, negative)

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        return self.stage(LatentPreparationStage).latent_shape(batch, num_frames, height, width)

    def prepare_latents(self, shape: tuple[int, ...], seed: int, latents: Any | None = None) -> jax.Array:
        return self.stage(LatentPreparationStage).prepare(shape, seed, latents)

    def denoise(self, latents: jax.Array, context: jax.Array, num_steps: int, guidance: float,
                progress: bool = True) -> jax.Array:
        """``context`` (B or 2B, Lt, D): [cond; uncond] rows when it has twice the latents' batch (CFG)."""
        tables = self.stage(TimestepPreparationStage).tables(num_steps)
        return self.stage(DenoisingStage).denoise(latents, {"encoder_hidden_states": context}, tables, num_steps,
                                                  guidance, do_cfg=context.shape[0] == 2 * latents.shape[0],
                                                  progress=progress)

    def decode(self, latents: jax.Array) -> np.ndarray:
        return self.stage(DecodingStage).decode(latents)
