"""Pure-functional DMD few-step sampler (FastVideo's ``DmdDenoisingStage``, used by the FastWan checkpoints).

The rule, per step ``i`` over a fixed list of timesteps ``t_0 > t_1 > ... > t_{n-1}`` (e.g. 1000, 757, 522):

* the DiT is conditioned on ``t_i`` itself and predicts the flow ``v``;
* ``x0 = x - sigma(t_i) * v`` (the clean-latent prediction);
* the next input is ``(1 - sigma(t_{i+1})) * x0 + sigma(t_{i+1}) * noise_i`` with fresh Gaussian noise, and the
  last step returns ``x0``. There is no classifier-free guidance.

``sigma(t)`` is FastVideo's lookup: the sigma of the entry nearest to ``t`` in the float32 *training* table of
a flow-matching Euler scheduler with ``shift`` (``sigmas = shift*s / (1 + (shift-1)*s)`` for
``s = 1000/1000 ... 1/1000``, timesteps ``= sigmas * 1000``). FastVideo's DMD stage builds that scheduler with
``shift=8.0`` whatever the pipeline's flow shift, so 8.0 is the default here (the FastWan presets say so too).

Same interface as the other schedulers (``set_timesteps``, ``init_state``, ``timestep``, ``step``); the noise
key lives in the state (``init_state(..., key=seed or key)``) and step ``i`` draws ``normal(fold_in(key, i))``,
so the whole loop is reproducible from the seed and the step jits once with a traced step index. The last
step's sigma is 0, so its re-noise is an exact no-op: no branch in the traced step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.configs.pipelines.base import check_dmd_steps
from fastvideo_jax.errors import UserError
from fastvideo_jax.schedulers._common import host_table

__all__ = ["DmdScheduler", "DmdState", "DmdTables", "training_table"]


class DmdTables(NamedTuple):
    """The schedule of one DMD run (a pytree of arrays)."""

    timesteps: jax.Array  # (n,) float32: the DiT's conditioning timesteps, the fixed list itself
    sigmas: jax.Array  # (n + 1,) float32: sigma(t_i) from the training table, then 0


class DmdState(NamedTuple):
    step_index: jax.Array  # () int32
    key: jax.Array  # () typed PRNG key; step i re-noises with normal(fold_in(key, i))


def training_table(shift: float, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, sigmas)`` (float32, decreasing) of a flow-matching Euler scheduler's training schedule, as
    its constructor builds them (float32 arithmetic throughout, as FastVideo's and diffusers' torch code)."""
    n = num_train_timesteps
    s = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    sigmas = (np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s)).astype(np.float32)
    return (sigmas * np.float32(n)).astype(np.float32), sigmas


@dataclasses.dataclass(frozen=True)
class DmdScheduler:
    """FastWan's DMD sampler. Usage::

        sched = DmdScheduler(denoising_steps=(1000, 757, 522), shift=8.0)
        tables = sched.set_timesteps(3)              # must equal len(denoising_steps)
        state = sched.init_state(tables, latents.shape, key=seed)
        for _ in range(3):
            v = model(x, sched.timestep(tables, state))
            x, state = jax.jit(sched.step)(tables, state, v, x)
    """

    denoising_steps: tuple[int, ...] = (1000, 757, 522)
    shift: float = 8.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "denoising_steps", tuple(self.denoising_steps))
        check_dmd_steps(self.denoising_steps, num_train_timesteps=self.num_train_timesteps)
        if not float(self.shift) > 0:
            raise UserError(f"the DMD scheduler's shift must be > 0, got {self.shift}")

    def set_timesteps(self, num_inference_steps: int) -> DmdTables:
        """The fixed schedule; ``num_inference_steps`` must be its length (DMD checkpoints are distilled for
        exactly these timesteps)."""
        steps = self.denoising_steps
        if num_inference_steps != len(steps):
            raise UserError(f"num_inference_steps={num_inference_steps}: this DMD model samples exactly "
                            f"{len(steps)} steps (dmd_denoising_steps={steps})")
        table_t, table_s = training_table(self.shift, self.num_train_timesteps)
        nearest = np.abs(table_t.astype(np.float64)[None, :] - np.asarray(steps, np.float64)[:, None]).argmin(1)
        sigmas = np.concatenate([table_s[nearest], np.zeros(1, np.float32)])
        return DmdTables(host_table(steps, np.float32), host_table(sigmas, np.float32))

    def init_state(self, tables: DmdTables, sample_shape: tuple[int, ...] | None = None, dtype: Any = None,
                   begin_index: int = 0, *, key: Any = None) -> DmdState:
        """Fresh state holding the re-noise key: ``key`` is a seed (int) or a typed key (``jax.random.key``).
        It may be the key the initial latents were drawn from: steps draw from ``fold_in(key, i)``."""
        del tables, sample_shape, dtype
        if key is None:
            raise ValueError("DmdScheduler.init_state needs key= (a seed or jax.random.key): DMD re-noises with "
                             "fresh noise at every step")
        if isinstance(key, (int, np.integer)):
            key = jax.random.key(int(key))
        elif not jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
            raise TypeError(f"key must be an int seed or a typed key from jax.random.key, got {key!r}")
        return DmdState(jnp.asarray(begin_index, jnp.int32), key)

    @staticmethod
    def timestep(tables: DmdTables, state: DmdState) -> jax.Array:
        """The timestep the DiT is conditioned on at the current step (the list value, e.g. 757.0)."""
        return tables.timesteps[state.step_index]

    @staticmethod
    def step(tables: DmdTables, state: DmdState, model_output: jax.Array,
             sample: jax.Array) -> tuple[jax.Array, DmdState]:
        """One DMD step: x0 from the flow prediction, re-noised to the next timestep (x0 itself after the last
        step). Jittable; computes in float32 and returns ``model_output.dtype``."""
        i = state.step_index
        sigma, sigma_next = tables.sigmas[i], tables.sigmas[i + 1]
        x0 = sample.astype(jnp.float32) - sigma * model_output.astype(jnp.float32)
        noise = jax.random.normal(jax.random.fold_in(state.key, i), sample.shape, jnp.float32)
        prev = (1.0 - sigma_next) * x0 + sigma_next * noise
        return prev.astype(model_output.dtype), DmdState(i + 1, state.key)
