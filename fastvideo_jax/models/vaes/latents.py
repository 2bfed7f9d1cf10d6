"""What every VAE does the same way with its latents: a draw from the diagonal Gaussian posterior, and, for VAEs
whose DiT latents are the VAE latents times one ``scaling_factor`` (HunyuanVideo, StepVideo), that scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gaussian_sample", "ScaledLatents"]


def gaussian_sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * noise."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


class ScaledLatents:
    """``normalize_latents`` / ``denormalize_latents`` by ``config.arch_config.scaling_factor`` (in fp32, cast
    back), as diffusers' pipelines scale these VAEs' latents."""

    def normalize_latents(self, z: jax.Array) -> jax.Array:
        """z * scaling_factor: VAE latents (the posterior mean) -> DiT latents."""
        return (z.astype(jnp.float32) * self.config.arch_config.scaling_factor).astype(z.dtype)

    def denormalize_latents(self, z: jax.Array) -> jax.Array:
        """z / scaling_factor: DiT latents -> VAE latents (before ``decode``)."""
        return (z.astype(jnp.float32) / self.config.arch_config.scaling_factor).astype(z.dtype)

    sample = staticmethod(gaussian_sample)
