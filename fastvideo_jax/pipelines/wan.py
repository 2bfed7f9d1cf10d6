"""Wan text-to-video (``WanPipeline``): validation -> text encoding -> timesteps -> latents -> denoising (CFG)
-> VAE decode -> uint8 frames, built from the shared stages.

One class serves the whole ``WanPipeline`` family, as diffusers' does, by its PipelineConfig:
* Wan2.1 T2V: one DiT.
* Wan2.2 TI2V-5B (``expand_timesteps``, 48-channel VAE): per-token timesteps; given an image, its VAE latent is
  the clean first latent frame (image-to-video), else text-to-video.
* Wan2.2 T2V-A14B (``transformer_2`` + ``boundary_ratio``): the high-noise expert, then the low-noise one with
  ``guidance_scale_2``; ``expert_offload`` keeps only the active expert on the devices.
* FastWan (``dmd_denoising_steps``, ``WanDMDPipeline`` in its model index): few-step DMD sampling, no CFG.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy
from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.wan import FASTWAN_DMD_SHIFT, FastWan21T2V480PConfig, WanT2V480PConfig
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, SamplingParam
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import CheckpointError
from fastvideo_jax.pipelines.base import ComposedPipeline
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages import (
    DecodingStage,
    DenoisingStage,
    FirstFrameLatentStage,
    InputValidationStage,
    LatentPreparationStage,
    PipelineStage,
    TextEncodingStage,
    TimestepPreparationStage,
)
from fastvideo_jax.schedulers.dmd import DmdScheduler

__all__ = ["WanDMDPipeline", "WanPipeline"]

logger = logging.getLogger(__name__)


class WanPipeline(ComposedPipeline):
    _required_components = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    _optional_components = ("transformer_2",)

    def __init__(self, components: Mapping[str, Any], config: PipelineConfig, *,
                 mask_strategy: MaskStrategy | None = None):
        components = dict(components)
        self.check_config(config, [n for n, c in components.items() if c is not None])
        scheduler = components.get("scheduler")
        if scheduler is not None and config.dmd_denoising_steps is not None:
            components["scheduler"] = DmdScheduler(
                config.dmd_denoising_steps, shift=float(config.flow_shift or FASTWAN_DMD_SHIFT),
                num_train_timesteps=getattr(scheduler, "num_train_timesteps", 1000))
        elif scheduler is not None and config.flow_shift is not None:
            components["scheduler"] = dataclasses.replace(scheduler, shift=float(config.flow_shift))
        self.mask_strategy = mask_strategy
        super().__init__(components, config)

    @classmethod
    def check_config(cls, config: PipelineConfig, components: Sequence[str]) -> None:
        """Two experts need both ``transformer_2`` and ``boundary_ratio``; ``CheckpointError`` otherwise (checked
        before any weight is read)."""
        has_2 = "transformer_2" in components
        if has_2 and config.boundary_ratio is None:
            raise CheckpointError("this pipeline has a transformer_2 (Wan2.2 A14B's low-noise expert) but no "
                                  "boundary_ratio (in model_index.json or the pipeline config) says when it runs")
        if not has_2 and config.boundary_ratio is not None:
            raise CheckpointError(f"boundary_ratio={config.boundary_ratio} needs a transformer_2 (the low-noise "
                                  f"expert), and this pipeline has none")

    @classmethod
    def image_input(cls, config: PipelineConfig) -> str:
        """TI2V (``expand_timesteps``) takes an optional first frame; the rest is text-to-video."""
        return "optional" if config.expand_timesteps else "none"

    @classmethod
    def default_config(cls) -> tuple[PipelineConfig, SamplingParam]:
        return WanT2V480PConfig(), SamplingParam(negative_prompt=WAN_NEGATIVE_PROMPT)

    def create_stages(self) -> list[PipelineStage]:
        c, dit, vae = self.config, self.transformer, self.vae
        dit_arch = dit.config.arch_config
        vae_arch = vae.config.arch_config
        return [
            InputValidationStage(dit_arch, vae_arch, c),
            TextEncodingStage(self.tokenizer, self.text_encoder, text_len=c.text_len, clean=c.clean_prompts,
                              dtype=to_dtype(dit.config.precision), offload=c.text_encoder_offload),
            TimestepPreparationStage(self.scheduler),
            LatentPreparationStage(dit_arch.num_channels_latents,
                                   *((vae_arch.temporal_compression_ratio, vae_arch.spatial_compression_ratio)
                                     if vae_arch is not None else (4, 8))),
            FirstFrameLatentStage(vae),
            DenoisingStage(dit, self.scheduler, mask_strategy=self.mask_strategy, transformer_2=self.transformer_2,
                           boundary_ratio=c.boundary_ratio, expert_offload=c.expert_offload,
                           expand_timesteps=c.expand_timesteps),
            DecodingStage(vae, tiled=c.vae_tiling),
        ]

    def initial_batch(self, param: SamplingParam, latents: Any | None = None, image: Any | None = None) -> ForwardBatch:
        """The image (TI2V image-to-video) is read and checked here (``check_image``), before any stage runs."""
        image = self.check_image(image, self.config)
        do_cfg = param.guidance_scale > 1.0
        if self.config.dmd_denoising_steps is not None and do_cfg:
            logger.warning("guidance_scale=%s ignored: DMD sampling (dmd_denoising_steps) runs without "
                           "classifier-free guidance", param.guidance_scale)
            do_cfg = False
        return ForwardBatch(param=param, do_cfg=do_cfg, latents=latents, image=image)

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
                progress: bool = True, teacache_thresh: float = 0.0) -> jax.Array:
        """``context`` (B or 2B, Lt, D): [cond; uncond] rows when it has twice the latents' batch (CFG).
        ``teacache_thresh`` > 0: under TeaCache (``last_teacache`` reports what it skipped)."""
        tables = self.stage(TimestepPreparationStage).tables(num_steps)
        return self.stage(DenoisingStage).denoise(latents, {"encoder_hidden_states": context}, tables, num_steps,
                                                  guidance, do_cfg=context.shape[0] == 2 * latents.shape[0],
                                                  progress=progress, teacache_thresh=teacache_thresh)

    @property
    def last_teacache(self) -> dict | None:
        return self.stage(DenoisingStage).last_teacache

    def decode(self, latents: jax.Array) -> np.ndarray:
        return self.stage(DecodingStage).decode(latents)


class WanDMDPipeline(WanPipeline):
    """FastWan2.1's model index names this class: ``WanPipeline`` with few-step DMD sampling (its presets set
    ``dmd_denoising_steps``)."""

    @classmethod
    def default_config(cls) -> tuple[PipelineConfig, SamplingParam]:
        return FastWan21T2V480PConfig(), SamplingParam(height=448, width=832, num_frames=61, num_inference_steps=3,
                                                       guidance_scale=1.0, negative_prompt=WAN_NEGATIVE_PROMPT)
