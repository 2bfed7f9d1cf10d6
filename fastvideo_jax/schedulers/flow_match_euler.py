"""Pure-functional flow-matching Euler scheduler (diffusers ``FlowMatchEulerDiscreteScheduler``).

Tables (timesteps, sigmas) are built once in NumPy from a Python ``int`` step count; ``step`` is a
pure function of ``(tables, state, model_output, sample)`` and can run under ``jax.jit`` with a
traced step index.  Only the video-model configuration is supported: static ``shift``,
optional ``shift_terminal``, no dynamic shifting, no karras/exponential/beta sigmas, no
``invert_sigmas`` and deterministic sampling.  Anything else is refused with a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.schedulers._common import ConfigRules, host_table, resolve_config, stretch_to_terminal

_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
    shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False,
)

_RULES: ConfigRules = {
    "num_train_timesteps": (lambda v: isinstance(v, int) and v > 0, "a positive int"),
    "shift": (lambda v: float(v) > 0, "a positive float"),
    "use_dynamic_shifting": (lambda v: v is False, "False"),
    "invert_sigmas": (lambda v: v is False, "False"),
    "shift_terminal": (lambda v: not v or 0 < float(v) < 1, "None or a float in (0, 1)"),
    "use_karras_sigmas": (lambda v: v is False, "False"),
    "use_exponential_sigmas": (lambda v: v is False, "False"),
    "use_beta_sigmas": (lambda v: v is False, "False"),
    "time_shift_type": (lambda v: v in ("exponential", "linear"), "'exponential' or 'linear'"),
    "stochastic_sampling": (lambda v: v is False, "False"),
}


class EulerTables(NamedTuple):
    """Immutable schedule for one ``num_inference_steps`` (a pytree of arrays)."""

    timesteps: jax.Array  # (n,) float32, the values the model is conditioned on
    sigmas: jax.Array  # (n + 1,) float32, ends with 0


class EulerState(NamedTuple):
    """Functional scheduler state: only the (traced) step index."""

    step_index: jax.Array  # () int32


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerScheduler:
    """Deterministic flow-matching Euler sampler, numerically identical to diffusers.

    Usage::

        sched = FlowMatchEulerScheduler(shift=5.0)
        tables = sched.set_timesteps(50)
        state = sched.init_state(tables)
        for _ in range(50):
            v = model(x, sched.timestep(tables, state))
            x, state = jax.jit(sched.step)(tables, state, v, x)
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    shift_terminal: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchEulerScheduler:
        """Build from a diffusers ``scheduler_config.json`` dict (missing keys: diffusers defaults)."""
        cfg = resolve_config(cls.__name__, _DIFFUSERS_DEFAULTS, config, _RULES)
        return cls(num_train_timesteps=int(cfg["num_train_timesteps"]), shift=float(cfg["shift"]),
                   shift_terminal=float(cfg["shift_terminal"]) if cfg["shift_terminal"] else None)

    def _train_sigma_range(self) -> tuple[float, float]:
        """``(sigma_max, sigma_min)`` of diffusers' float32 training schedule (shifted once)."""
        n = self.num_train_timesteps
        t = np.linspace(1, n, n, dtype=np.float32)[::-1]
        s = t / np.float32(n)
        shift = np.float32(self.shift)
        s = shift * s / (np.float32(1.0) + np.float32(self.shift - 1) * s)
        return float(s[0]), float(s[-1])

    def set_timesteps(self, num_inference_steps: int) -> EulerTables:
        """Schedule for ``num_inference_steps`` steps, as diffusers' ``set_timesteps(n)``.

        diffusers spaces the steps between the *already shifted* training sigmas and then shifts
        again (float64 NumPy), before rounding to float32; this is reproduced exactly.
        """
        n_train = self.num_train_timesteps
        sigma_max, sigma_min = self._train_sigma_range()
        t = np.linspace(sigma_max * n_train, sigma_min * n_train, int(num_inference_steps))
        s = t / n_train
        s = self.shift * s / (1 + (self.shift - 1) * s)
        if self.shift_terminal:
            s = stretch_to_terminal(s, self.shift_terminal)
        s32 = s.astype(np.float32)
        timesteps = s32 * np.float32(n_train)
        sigmas = np.concatenate([s32, np.zeros(1, np.float32)])
        return EulerTables(host_table(timesteps), host_table(sigmas))

    def set_sigmas(self, sigmas: Any) -> EulerTables:
        """Schedule from explicit unshifted ``sigmas`` (one per step), as diffusers' ``set_timesteps(sigmas=...)``
        (HunyuanVideo passes ``linspace(1, 0, n + 1)[:-1]``): shifted in float32, timesteps = sigmas x train steps."""
        s = np.asarray(sigmas, np.float64).astype(np.float32)
        if s.ndim != 1 or not len(s) or not np.all(np.isfinite(s)) or s.min() < 0 or s.max() > 1:
            raise ValueError(f"sigmas must be a non-empty 1-D sequence in [0, 1], got {np.asarray(sigmas)!r}")
        s = (self.shift * s / (1 + (self.shift - 1) * s)).astype(np.float32)
        if self.shift_terminal:
            s = stretch_to_terminal(s, self.shift_terminal).astype(np.float32)
        timesteps = s * np.float32(self.num_train_timesteps)
        return EulerTables(host_table(timesteps), host_table(np.concatenate([s, np.zeros(1, np.float32)])))

    def init_state(self, tables: EulerTables, sample_shape: tuple[int, ...] | None = None,
                   dtype: Any = None, begin_index: int = 0, *, key: Any = None) -> EulerState:
        """Fresh state; ``sample_shape``/``dtype``/``key`` are accepted for API symmetry and unused."""
        del tables, sample_shape, dtype, key
        return EulerState(jnp.asarray(begin_index, jnp.int32))

    @staticmethod
    def timestep(tables: EulerTables, state: EulerState) -> jax.Array:
        """Timestep to condition the model on at the current step."""
        return tables.timesteps[state.step_index]

    @staticmethod
    def step(tables: EulerTables, state: EulerState, model_output: jax.Array,
             sample: jax.Array) -> tuple[jax.Array, EulerState]:
        """One Euler step ``x + (sigma_next - sigma) * v``; jittable, returns ``model_output.dtype``."""
        i = state.step_index
        dt = tables.sigmas[i + 1] - tables.sigmas[i]
        # diffusers: float32 sample + (0-dim float32 dt) * model_output (in model_output's dtype)
        update = (dt.astype(model_output.dtype) * model_output).astype(jnp.float32)
        prev = sample.astype(jnp.float32) + update
        return prev.astype(model_output.dtype), EulerState(i + 1)
