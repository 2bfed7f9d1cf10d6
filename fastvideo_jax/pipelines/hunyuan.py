"""HunyuanVideo text-to-video (``HunyuanVideoPipeline``): LLaMA (template, skip-layer state) + CLIP-L (pooled)
prompt encoding -> embedded guidance -> flow-match Euler over HunyuanVideo's sigmas -> VAE decode.

Guidance is embedded in the DiT (``guidance = guidance_scale x 1000`` per sample, one forward per step, no CFG
batch), as Diffusers' pipeline does without ``true_cfg_scale``; a negative prompt is refused rather than ignored.
The shared stages do the rest: the DiT gets its keyword inputs (``encoder_hidden_states``,
``encoder_attention_mask``, ``pooled_projections``, ``guidance``) from the batch's conditioning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy
from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.hunyuan import HunyuanConfig
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.hunyuan_prompt import (
    DEFAULT_PROMPT_TEMPLATE,
    encode_hunyuan_prompts,
    template_crop_start,
)
from fastvideo_jax.pipelines.base import ComposedPipeline
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages import (
    DecodingStage,
    DenoisingStage,
    InputValidationStage,
    LatentPreparationStage,
    PipelineStage,
    TimestepPreparationStage,
)

__all__ = ["HunyuanVideoPipeline", "HunyuanTextEncodingStage", "EmbeddedGuidanceStage", "hunyuan_sigmas"]

# Layers before the last whose hidden state HunyuanVideo takes from the LLaMA encoder (Diffusers' default).
HIDDEN_STATE_SKIP_LAYER = 2


def hunyuan_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted sigmas Diffusers' HunyuanVideoPipeline passes its scheduler: linspace(1, 0, n + 1)[:-1]."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


class HunyuanTextEncodingStage(PipelineStage):
    """LLaMA prompt embeddings and mask + CLIP-L pooled embeddings -> the DiT's ``encoder_hidden_states``,
    ``encoder_attention_mask`` and ``pooled_projections``. The template's crop is counted with this tokenizer
    (95 tokens for llava-llama-3's, Diffusers' fixed default)."""

    def __init__(self, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any, *, text_len: int,
                 dtype: Any, prompt_template: Mapping[str, Any] = DEFAULT_PROMPT_TEMPLATE):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.text_len, self.dtype = text_len, dtype
        template = prompt_template["template"]
        self.prompt_template = {"template": template, "crop_start": template_crop_start(tokenizer, template)}

    def encode(self, prompts: list[str], num_videos_per_prompt: int = 1):
        return encode_hunyuan_prompts(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                                      prompts, prompt_template=self.prompt_template,
                                      max_sequence_length=self.text_len,
                                      num_hidden_layers_to_skip=HIDDEN_STATE_SKIP_LAYER,
                                      num_videos_per_prompt=num_videos_per_prompt, dtype=self.dtype)

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        embeds, mask, pooled = self.encode([batch.param.prompt], batch.batch_size)
        return batch.replace(conditioning={**batch.conditioning, "encoder_hidden_states": embeds,
                                           "encoder_attention_mask": mask, "pooled_projections": pooled})


class EmbeddedGuidanceStage(PipelineStage):
    """``guidance_scale x 1000`` per sample in the DiT's dtype, as the DiT's ``guidance`` input (runtime data: a
    new scale does not recompile the step)."""

    def __init__(self, dtype: Any):
        self.dtype = dtype

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        g = jnp.full((batch.batch_size,), batch.param.guidance_scale, self.dtype) * jnp.asarray(1000.0, self.dtype)
        return batch.replace(conditioning={**batch.conditioning, "guidance": g})


class HunyuanVideoPipeline(ComposedPipeline):
    _required_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae",
                            "scheduler")

    def __init__(self, components: Mapping[str, Any], config: PipelineConfig, *,
                 mask_strategy: MaskStrategy | None = None):
        """``mask_strategy``: FastVideo's sliding-tile windows per (step, layer, head) for a sliding-tile DiT, its
        layers the dual-stream blocks then the single-stream ones (FastVideo's numbering)."""
        components = dict(components)
        scheduler = components.get("scheduler")
        if scheduler is not None and config.flow_shift is not None:
            components["scheduler"] = dataclasses.replace(scheduler, shift=float(config.flow_shift))
        self.mask_strategy = mask_strategy
        super().__init__(components, config)

    @classmethod
    def default_config(cls) -> tuple[PipelineConfig, SamplingParam]:
        return HunyuanConfig(), SamplingParam(height=720, width=1280, num_frames=129, num_inference_steps=50,
                                              guidance_scale=6.0, fps=24)

    def initial_batch(self, param: SamplingParam, latents: Any | None = None, image: Any | None = None
                      ) -> ForwardBatch:
        if param.negative_prompt:
            raise UserError("HunyuanVideo uses embedded guidance (guidance_scale goes into the DiT): a "
                            "negative_prompt would be ignored, so it is refused; leave it empty")
        return super().initial_batch(param, latents, image).replace(do_cfg=False)

    def create_stages(self) -> list[PipelineStage]:
        c, dit, vae = self.config, self.transformer, self.vae
        dit_arch, vae_arch = dit.config.arch_config, vae.config.arch_config
        dtype = to_dtype(dit.config.precision)
        return [
            InputValidationStage(dit_arch, vae_arch),
            HunyuanTextEncodingStage(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                                     text_len=c.text_len, dtype=dtype),
            EmbeddedGuidanceStage(dtype),
            TimestepPreparationStage(self.scheduler, sigmas=hunyuan_sigmas),
            LatentPreparationStage(dit_arch.in_channels, vae_arch.temporal_compression_ratio,
                                   vae_arch.spatial_compression_ratio),
            DenoisingStage(dit, self.scheduler, mask_strategy=self.mask_strategy),
            DecodingStage(vae, tiled=c.vae_tiling),
        ]
