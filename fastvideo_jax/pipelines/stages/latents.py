"""Latent preparation: the latent grid of the request and its initial noise (or latents the caller gives)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["LatentPreparationStage"]


@functools.partial(jax.jit, static_argnums=(0,))
def _initial_latents(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


class LatentPreparationStage(PipelineStage):
    """(B, C, F', H', W') with C the DiT's latent channels and F', H', W' the VAE's compression of the request;
    noise from ``param.seed`` unless the batch already holds latents (checked against the shape)."""

    def __init__(self, num_channels: int, temporal_compression: int, spatial_compression: int):
        self.num_channels = num_channels
        self.temporal, self.spatial = temporal_compression, spatial_compression

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        t, s = self.temporal, self.spatial
        return (batch, self.num_channels, (num_frames - 1) // t + 1, height // s, width // s)

    def prepare(self, shape: tuple[int, ...], seed: int, latents: Any | None = None) -> jax.Array:
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}; this request needs {shape}")
            return latents
        return _initial_latents(shape, jnp.asarray(seed, jnp.uint32))

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.param
        shape = self.latent_shape(batch.batch_size, p.num_frames, p.height, p.width)
        return batch.replace(latents=self.prepare(shape, p.seed, batch.latents))
