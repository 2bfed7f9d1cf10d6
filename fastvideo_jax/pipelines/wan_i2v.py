"""Wan2.1 image-to-video (``WanImageToVideoPipeline``): ``WanPipeline``'s stages with the image conditioning
of diffusers' ``WanImageToVideoPipeline`` added: CLIP vision features of the image into the DiT's image
embedder (when the DiT has one, ``image_dim``), and the VAE-encoded first frame with its frame mask
concatenated to the noisy latents on channels (16 + 4 + 16 = 36 DiT input channels for Wan2.1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.wan import WanI2V480PConfig
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, SamplingParam
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import CheckpointError
from fastvideo_jax.pipelines.stages import (
    FirstFrameLatentStage,
    LatentPreparationStage,
    PipelineStage,
    TextEncodingStage,
)
from fastvideo_jax.pipelines.stages.image import ImageEncodingStage, ImageVAEEncodingStage
from fastvideo_jax.pipelines.wan import WanPipeline

__all__ = ["WanImageToVideoPipeline"]


class WanImageToVideoPipeline(WanPipeline):
    _optional_components = (*WanPipeline._optional_components, "image_encoder", "image_processor")

    def __init__(self, components: Mapping[str, Any], config: PipelineConfig, **kwargs: Any):
        _check_i2v(components)
        super().__init__(components, config, **kwargs)

    @classmethod
    def default_config(cls) -> tuple[PipelineConfig, SamplingParam]:
        return WanI2V480PConfig(), SamplingParam(height=480, width=832, num_frames=81, num_inference_steps=40,
                                                 guidance_scale=5.0, negative_prompt=WAN_NEGATIVE_PROMPT)

    @classmethod
    def check_config(cls, config: PipelineConfig, components: Sequence[str]) -> None:
        """Before any weight is read: WanPipeline's expert checks, no TI2V per-token timesteps here, and the CLIP
        image encoder and its processor together or neither."""
        super().check_config(config, components)
        if config.expand_timesteps:
            raise CheckpointError("expand_timesteps (Wan2.2 TI2V) is WanPipeline's image-to-video mode, not "
                                  "WanImageToVideoPipeline's")
        clip = [c for c in ("image_encoder", "image_processor") if c in components]
        if len(clip) == 1:
            raise CheckpointError(f"WanImageToVideoPipeline: {clip[0]} without "
                                  f"{({'image_encoder', 'image_processor'} - set(clip)).pop()} (the CLIP image branch "
                                  "needs both)")

    @classmethod
    def image_input(cls, config: PipelineConfig) -> str:
        return "required"

    def create_stages(self) -> list[PipelineStage]:
        stages: list[PipelineStage] = []
        dtype = to_dtype(self.transformer.config.precision)
        for stage in super().create_stages():
            if isinstance(stage, FirstFrameLatentStage):  # TI2V's clean first frame; here the image is a condition
                continue
            stages.append(stage)
            if isinstance(stage, TextEncodingStage) and self.image_encoder is not None:
                stages.append(ImageEncodingStage(self.image_processor, self.image_encoder, dtype=dtype))
            elif isinstance(stage, LatentPreparationStage):
                stages.append(ImageVAEEncodingStage(self.vae, tiled=self.config.vae_tiling))
        return stages


def _check_i2v(components: Mapping[str, Any]) -> None:
    """The DiTs take 2 * z + temporal input channels (noisy latents, mask, image latents); the DiT has an image
    embedder exactly when the pipeline has a CLIP image encoder and processor, of the encoder's width."""
    dit, vae = components.get("transformer"), components.get("vae")
    if dit is None or vae is None:
        return  # ComposedPipeline names the missing components
    arch, vae_arch = dit.config.arch_config, vae.config.arch_config
    want = 2 * vae_arch.z_dim + vae_arch.temporal_compression_ratio
    for name in ("transformer", "transformer_2"):
        expert = components.get(name)
        if expert is not None and expert.config.arch_config.in_channels != want:
            raise CheckpointError(
                f"WanImageToVideoPipeline: the {name} takes {expert.config.arch_config.in_channels} input channels; "
                f"image-to-video with this VAE needs {want} (latents {vae_arch.z_dim} + mask "
                f"{vae_arch.temporal_compression_ratio} + image latents {vae_arch.z_dim})")
    has_clip = components.get("image_encoder") is not None
    if (arch.image_dim is not None) != has_clip or has_clip != (components.get("image_processor") is not None):
        raise CheckpointError(
            "WanImageToVideoPipeline: a transformer with image_dim needs image_encoder and image_processor, one "
            f"without needs neither (transformer image_dim={arch.image_dim}, image_encoder "
            f"{'given' if has_clip else 'absent'}, image_processor "
            f"{'given' if components.get('image_processor') is not None else 'absent'})")
    enc_dim = components["image_encoder"].config.arch_config.hidden_size if has_clip else None
    if has_clip and enc_dim != arch.image_dim:
        raise CheckpointError(f"WanImageToVideoPipeline: the image encoder's hidden size {enc_dim} is not the "
                              f"transformer's image_dim {arch.image_dim}")
