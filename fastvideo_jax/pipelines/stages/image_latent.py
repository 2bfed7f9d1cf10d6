"""First-frame latent (Wan2.2 TI2V image-to-video): the request's image, resized to the video's size as
diffusers' ``VideoProcessor.preprocess`` does (Pillow Lanczos to exactly (height, width), then [0, 255] ->
[-1, 1]), VAE-encoded as a one-frame video (the posterior mean) and normalised into the DiT's latent space."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.models.encoders.image_processor import load_rgb, pillow_resize
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["FirstFrameLatentStage", "image_to_pixels"]

_LANCZOS = 1  # PIL.Image.Resampling.LANCZOS, diffusers' VaeImageProcessor default


def image_to_pixels(image: Any, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1] from a path, a PIL.Image or a uint8 (H, W, 3) array."""
    rgb = load_rgb(image)
    if rgb.shape[:2] != (height, width):
        rgb = pillow_resize(rgb, height, width, resample=_LANCZOS)
    x = rgb.astype(np.float32) / np.float32(255.0)
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None]


class FirstFrameLatentStage(PipelineStage):
    """``batch.image`` (when given) -> ``batch.first_frame_latent`` (B, C, 1, H/s, W/s): the clean latent the
    denoising stage keeps as the first latent frame."""

    def __init__(self, vae: Any):
        self.vae = vae

    def encode(self, image: Any, batch: int, height: int, width: int) -> jnp.ndarray:
        pixels = jnp.asarray(image_to_pixels(image, height, width)[:, :, None])  # (1, 3, 1, H, W)
        z = self.vae.encode(pixels.astype(to_dtype(self.vae.config.precision)))
        z = self.vae.normalize_latents(z.astype(jnp.float32))
        return jnp.repeat(z, batch, axis=0)

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        if batch.image is None:
            return batch
        p = batch.param
        return batch.replace(first_frame_latent=self.encode(batch.image, batch.batch_size, p.height, p.width))
