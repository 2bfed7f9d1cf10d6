"""The Wan flow-matching objective, as FastVideo 0.1.7 finetunes Wan (``training/training_pipeline.py``).

Per sample: ``u`` from the weighting scheme (``uniform`` by default; ``logit_normal``: sigmoid of a normal;
``mode``: SD3's mode density), the index ``floor(u * 1000)`` into the training schedule of a
``FlowMatchEulerDiscreteScheduler`` (``timesteps[i]``, ``sigmas[i]``: ``s = (1000 - i) / 1000``, shifted
``shift * s / (1 + (shift - 1) * s)``, ``t = 1000 * sigma``), then

    noisy = (1 - sigma) * latents + sigma * noise,    target = noise - latents,
    loss = mean((model(noisy, t, text) - target) ** 2)     (in fp32)

(``precondition_outputs``: the prediction becomes ``noisy - sigma * pred`` and the target the latents.)

Flow shift: FastVideo's ``train()`` replaces the pipeline's flow-shifted scheduler with a default
``FlowMatchEulerDiscreteScheduler()`` before the first step, so its Wan finetunes train with shift 1.0 (uniform
sigmas) whatever ``--flow_shift`` says; ``flow_shift`` here defaults to that and can be set. Two deliberate
differences: FastVideo casts the timestep to bf16 before the DiT (999 -> 1000); we pass it in fp32. And the
target is formed from fp32 latents and noise (FastVideo forms it in bf16).
``cfg_rate``: the probability that a sample's text is dropped (zero embeddings), FastVideo's
``training_cfg_rate`` (default 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.errors import UserError

__all__ = ["FlowMatchObjective", "NoisedBatch", "WEIGHTING_SCHEMES"]

F32 = jnp.float32
WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")


class NoisedBatch(NamedTuple):
    """The DiT's training input for one batch, and what the loss needs."""

    noisy: jax.Array  # (B, C, F, H, W) fp32
    timesteps: jax.Array  # (B,) fp32, in [0, num_train_timesteps]
    sigmas: jax.Array  # (B,) fp32
    noise: jax.Array  # (B, C, F, H, W) fp32
    context: jax.Array  # (B, L, E): the text embeddings, dropped (zeros) with probability cfg_rate


@dataclasses.dataclass(frozen=True)
class FlowMatchObjective:
    num_train_timesteps: int = 1000
    flow_shift: float = 1.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    cfg_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"weighting_scheme {self.weighting_scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise UserError(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        if not (math.isfinite(self.flow_shift) and self.flow_shift > 0):
            raise UserError(f"flow_shift must be finite and > 0, got {self.flow_shift}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0 and math.isfinite(self.logit_mean)):
            raise UserError(f"logit_mean/logit_std must be finite with logit_std > 0, got "
                            f"{self.logit_mean}/{self.logit_std}")
        if not 0.0 <= self.cfg_rate <= 1.0:
            raise UserError(f"cfg_rate is a probability in [0, 1], got {self.cfg_rate}")

    def schedule(self) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas), each (N,) float32, index 0 the noisiest: a default-constructed diffusers
        ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``'s training tables."""
        n = self.num_train_timesteps
        s = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        shift = np.float32(self.flow_shift)
        sigmas = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
        return (sigmas * np.float32(n)).astype(np.float32), sigmas

    def sample_u(self, key: jax.Array, batch: int) -> jax.Array:
        """(B,) in [0, 1) from the weighting scheme's density."""
        if self.weighting_scheme == "logit_normal":
            return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (batch,), F32))
        u = jax.random.uniform(key, (batch,), F32)
        if self.weighting_scheme == "mode":
            return 1 - u - self.mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1 + u)
        return u

    def sample_indices(self, key: jax.Array, batch: int) -> jax.Array:
        """(B,) int32 schedule indices ``floor(u * N)`` (kept inside the table: a logit-normal u may round to 1)."""
        n = self.num_train_timesteps
        return jnp.clip(jnp.floor(self.sample_u(key, batch) * n), 0, n - 1).astype(jnp.int32)

    def noise_batch(self, key: jax.Array, latents: jax.Array, context: jax.Array) -> NoisedBatch:
        """Draw noise, timesteps and text dropout for normalised ``latents`` (B, C, F, H, W)."""
        k_noise, k_t, k_cfg = jax.random.split(key, 3)
        latents = latents.astype(F32)
        noise = jax.random.normal(k_noise, latents.shape, F32)
        indices = self.sample_indices(k_t, latents.shape[0])
        if self.cfg_rate > 0:
            keep = jax.random.uniform(k_cfg, (latents.shape[0],)) >= self.cfg_rate
            context = jnp.where(keep[:, None, None], context, jnp.zeros_like(context))
        return self.noise_at(latents, noise, indices, context)

    def noise_at(self, latents: jax.Array, noise: jax.Array, indices: jax.Array, context: jax.Array) -> NoisedBatch:
        """The training input for given noise and schedule ``indices`` (B,) (the reference tests use this)."""
        timesteps, sigmas = (jnp.asarray(a)[indices] for a in self.schedule())
        sigma = sigmas.reshape((-1,) + (1,) * (latents.ndim - 1))
        noisy = (1.0 - sigma) * latents.astype(F32) + sigma * noise.astype(F32)
        return NoisedBatch(noisy, timesteps, sigmas, noise.astype(F32), context)

    def loss(self, prediction: jax.Array, latents: jax.Array, noised: NoisedBatch) -> jax.Array:
        """Mean squared error (fp32) between the DiT's prediction and the flow-matching target."""
        prediction = prediction.astype(F32)
        latents = latents.astype(F32)
        if self.precondition_outputs:
            sigma = noised.sigmas.reshape((-1,) + (1,) * (latents.ndim - 1))
            prediction, target = noised.noisy - prediction * sigma, latents
        else:
            target = noised.noise - latents
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ")
        return jnp.mean((prediction - target) ** 2)
