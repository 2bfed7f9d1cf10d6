"""Decoding: latents -> uint8 frames on the host, split over the VAE's mesh, tiled when configured."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import NonFiniteError
from fastvideo_jax.models.vaes.parallel_decode import decode_on_mesh
from fastvideo_jax.parallel.distributed import to_host
from fastvideo_jax.parallel.memory import params_mesh
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["DecodingStage", "all_finite"]


@jax.jit
def all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _to_uint8(video: jax.Array) -> jax.Array:  # (B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8
    x = jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(x, (0, 2, 3, 4, 1)) * 255).astype(jnp.uint8)


class DecodingStage(PipelineStage):
    def __init__(self, vae: Any, *, tiled: bool = False):
        self.vae, self.tiled = vae, tiled

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Latents -> uint8 frames (B, F, H, W, 3). NaN or Inf in the latents or the decoded video is an error
        naming the stage, never a black video."""
        if not bool(all_finite(latents)):
            raise NonFiniteError("the denoised latents contain NaN or Inf: the transformer diverged (with bf16, "
                                 "try dit_precision='fp32' / --dit-precision fp32)")
        vae_dtype = to_dtype(self.vae.config.precision)
        z = self.vae.denormalize_latents(latents.astype(jnp.float32)).astype(vae_dtype)
        video = decode_on_mesh(self.vae, z, params_mesh(self.vae), tiled=self.tiled)  # split over the mesh
        if not bool(all_finite(video)):
            raise NonFiniteError(f"the VAE decoded NaN or Inf from finite latents (VAE precision "
                                 f"{self.vae.config.precision}; try vae_decode_precision='fp32')")
        return to_host(_to_uint8(video))

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        return batch.replace(frames=self.decode(batch.latents))
