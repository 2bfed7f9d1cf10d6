"""Pure-functional UniPC multistep scheduler for flow-matching models (Wan's default sampler).

Equivalent of diffusers ``UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=S)`` with ``predict_x0=True`` and no ``solver_p``/thresholding.

Design: every scalar of the UniP predictor / UniC corrector (step ratios, ``h``, ``phi``
functions, the ``rho`` linear solves) depends only on the step index and the update order, so
``set_timesteps`` precomputes them in float64 NumPy for every reachable ``(step, order)``.  The
jittable ``step`` then only gathers one coefficient row and forms a few float32 axpys.  The
multistep history (last ``solver_order`` converted model outputs, last sample, warm-up counter,
previous order, step index) lives in :class:`UniPCState`, a pytree of fixed-shape arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.schedulers._common import ConfigRules, host_table, resolve_config, stretch_to_terminal

_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True, solver_type="bh2",
    lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
    timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    sigma_min=None, sigma_max=None, shift_terminal=None,
)

_RULES: ConfigRules = {
    "num_train_timesteps": (lambda v: isinstance(v, int) and v > 0, "a positive int"),
    "solver_order": (lambda v: isinstance(v, int) and v > 0, "a positive int"),
    "prediction_type": (lambda v: v == "flow_prediction", "'flow_prediction'"),
    "thresholding": (lambda v: v is False, "False"),
    "predict_x0": (lambda v: v is True, "True"),
    "solver_type": (lambda v: v in ("bh1", "bh2", "midpoint", "heun", "logrho"), "'bh1' or 'bh2'"),
    "lower_order_final": (lambda v: isinstance(v, bool), "True or False"),
    "disable_corrector": (lambda v: all(isinstance(i, int) for i in v), "a list of step indices"),
    "solver_p": (lambda v: v is None, "None"),
    "use_karras_sigmas": (lambda v: v is False, "False"),
    "use_exponential_sigmas": (lambda v: v is False, "False"),
    "use_beta_sigmas": (lambda v: v is False, "False"),
    "use_flow_sigmas": (lambda v: v is True, "True"),
    "flow_shift": (lambda v: float(v) > 0, "a positive float"),
    "timestep_spacing": (lambda v: v in ("linspace", "leading", "trailing"), "linspace/leading/trailing"),
    "final_sigmas_type": (lambda v: v in ("zero", "sigma_min"), "'zero' or 'sigma_min'"),
    "use_dynamic_shifting": (lambda v: v is False, "False"),
    "shift_terminal": (lambda v: not v or 0 < float(v) < 1, "None or a float in (0, 1)"),
}


class UniPCTables(NamedTuple):
    """Immutable schedule and per-step update coefficients (a pytree of arrays).

    Coefficient rows are ``[a0, a1, c, d_1, ..., d_J]`` for the update
    ``(a0 + a1) * x - c * m0 - sum_j d_j * (m_j - m0)`` (see ``_combine``).
    ``pred_coef[i, p - 1]`` is the order-``p`` predictor of step ``i`` (``m_j`` = j-th older
    history entry); ``corr_coef[i, q - 1]`` the order-``q`` corrector (its last ``d``
    multiplies the freshly converted model output).
    """

    timesteps: jax.Array  # (n,) int32 (diffusers: int64)
    sigmas: jax.Array  # (n + 1,) float32
    max_order: jax.Array  # (n,) int32, order cap incl. lower_order_final
    corrector_on: jax.Array  # (n,) bool, False at step 0 and after disabled steps
    pred_coef: jax.Array  # (n, K, K + 2) float32
    corr_coef: jax.Array  # (n, K, K + 3) float32


class UniPCState(NamedTuple):
    """Functional multistep state (all fixed-shape arrays)."""

    step_index: jax.Array  # () int32
    lower_order_nums: jax.Array  # () int32, steps taken so far, capped at solver_order
    last_order: jax.Array  # () int32, order of the previous predictor (0 before the first step)
    model_outputs: jax.Array  # (K, *sample_shape), converted x0 predictions, newest last
    last_sample: jax.Array  # (*sample_shape), corrected sample of the previous step


def _lambdas(sigmas: np.ndarray) -> np.ndarray:
    """Half log-SNR ``log(alpha) - log(sigma)`` with ``alpha = 1 - sigma`` (float64)."""
    with np.errstate(divide="ignore"):
        return np.log(1.0 - sigmas) - np.log(sigmas)


def _update_row(sig: np.ndarray, lam: np.ndarray, t: int, s0: int, priors: Sequence[int],
                corrector: bool, bh1: bool, width: int) -> np.ndarray:
    """One UniP (``corrector=False``) or UniC coefficient row, as diffusers' bh updates."""
    h = lam[t] - lam[s0]
    rks = np.array([(lam[j] - lam[s0]) / h for j in priors] + [1.0])
    order = len(rks)
    hh = -h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if bh1 else np.expm1(hh)
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r_mat, b = np.stack([rks**k for k in range(order)]), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b)
    elif order <= 2:
        rhos = np.full(order - 1, 0.5)
    else:
        rhos = np.linalg.solve(r_mat[:-1, :-1], b[:-1])
    alpha_t, ratio = 1.0 - sig[t], sig[t] / sig[s0]
    row = np.zeros(width)
    row[0] = 1.0 if ratio >= 0.5 else 0.0  # x + ((ratio - 1) * x - ...) keeps float32 error small
    row[1], row[2] = ratio - row[0], alpha_t * h_phi_1
    row[3:2 + order] = alpha_t * b_h * rhos[:order - 1] / rks[:order - 1]
    if corrector:
        row[-1] = alpha_t * b_h * rhos[-1]
    return row


def _combine(coef: jax.Array, x: jax.Array, m0: jax.Array, others: Sequence[jax.Array]) -> jax.Array:
    """``a0 * x + (a1 * x - c * m0 - sum_j d_j * (m_j - m0))``, elementwise float ops only.

    ``a0`` is 0 or 1, so for step ratios ``a = a0 + a1`` near 1 only the small increment is
    rounded before the final add (about half the float32 error of ``a * x - ...``).
    """
    inc = coef[1] * x - coef[2] * m0
    for j, m in enumerate(others):
        inc = inc - coef[3 + j] * (m - m0)
    return coef[0] * x + inc


@dataclasses.dataclass(frozen=True)
class FlowUniPCMultistepScheduler:
    """UniPC (bh1/bh2, predict-x0) for flow-prediction models, matching diffusers step by step.

    Usage::

        sched = FlowUniPCMultistepScheduler(shift=3.0)
        tables = sched.set_timesteps(50)
        state = sched.init_state(tables, x.shape)
        step = jax.jit(sched.step)
        for _ in range(50):
            v = model(x, sched.timestep(tables, state))
            x, state = step(tables, state, v, x)
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    final_sigmas_type: str = "zero"
    shift_terminal: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowUniPCMultistepScheduler:
        """Build from a diffusers ``scheduler_config.json`` dict (missing keys: diffusers defaults)."""
        cfg = resolve_config(cls.__name__, _DIFFUSERS_DEFAULTS, config, _RULES)
        return cls(
            num_train_timesteps=int(cfg["num_train_timesteps"]), shift=float(cfg["flow_shift"]),
            solver_order=int(cfg["solver_order"]),
            solver_type="bh1" if cfg["solver_type"] == "bh1" else "bh2",
            lower_order_final=bool(cfg["lower_order_final"]),
            disable_corrector=tuple(int(i) for i in cfg["disable_corrector"]),
            final_sigmas_type=cfg["final_sigmas_type"],
            shift_terminal=float(cfg["shift_terminal"]) if cfg["shift_terminal"] else None)

    def _sigmas(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' flow-sigma schedule: (int timesteps, float32 sigmas incl. the final one)."""
        n_train = self.num_train_timesteps
        s = np.linspace(1, 1 / n_train, num_inference_steps + 1)[:-1]
        s = self.shift * s / (1 + (self.shift - 1) * s)
        if self.shift_terminal:
            s = stretch_to_terminal(s, self.shift_terminal)
        if np.fabs(s[0] - 1) < 1e-6:
            s[0] -= 1e-6
        timesteps = (s * n_train).astype(np.int64)
        last = s[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        return timesteps, np.concatenate([s, [last]]).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int) -> UniPCTables:
        """Schedule and all update coefficients for ``num_inference_steps`` (a Python int)."""
        n, k_max = int(num_inference_steps), self.solver_order
        timesteps, sigmas = self._sigmas(n)
        sig = sigmas.astype(np.float64)
        lam = _lambdas(sig)
        bh1 = self.solver_type == "bh1"
        max_order = np.array([min(k_max, n - i) if self.lower_order_final else k_max for i in range(n)])
        corrector_on = np.array([i > 0 and (i - 1) not in self.disable_corrector for i in range(n)])
        pred = np.zeros((n, k_max, k_max + 2))
        corr = np.zeros((n, k_max, k_max + 3))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i in range(n):
                for p in range(1, min(max_order[i], i + 1) + 1):
                    priors = [i - k for k in range(1, p)]
                    pred[i, p - 1] = _update_row(sig, lam, i + 1, i, priors, False, bh1, k_max + 2)
                if i == 0:
                    continue
                for q in range(1, min(max_order[i - 1], i) + 1):
                    priors = [i - 1 - k for k in range(1, q)]
                    corr[i, q - 1] = _update_row(sig, lam, i, i - 1, priors, True, bh1, k_max + 3)
        return UniPCTables(
            timesteps=host_table(timesteps, np.int32), sigmas=host_table(sigmas, np.float32),
            max_order=host_table(max_order, np.int32), corrector_on=host_table(corrector_on),
            pred_coef=host_table(pred, np.float32), corr_coef=host_table(corr, np.float32))

    def init_state(self, tables: UniPCTables, sample_shape: tuple[int, ...],
                   dtype: Any = jnp.float32, begin_index: int = 0, *, key: Any = None) -> UniPCState:
        """Empty history; ``begin_index`` mirrors diffusers' ``set_begin_index``; ``key`` (a stochastic
        scheduler's noise key) is accepted for interface symmetry and unused: this sampler is deterministic."""
        del tables, key
        zero = jnp.asarray(0, jnp.int32)
        return UniPCState(step_index=jnp.asarray(begin_index, jnp.int32), lower_order_nums=zero,
                          last_order=zero,
                          model_outputs=jnp.zeros((self.solver_order, *sample_shape), dtype),
                          last_sample=jnp.zeros(sample_shape, dtype))

    @staticmethod
    def timestep(tables: UniPCTables, state: UniPCState) -> jax.Array:
        """Timestep to condition the model on at the current step."""
        return tables.timesteps[state.step_index]

    def step(self, tables: UniPCTables, state: UniPCState, model_output: jax.Array,
             sample: jax.Array) -> tuple[jax.Array, UniPCState]:
        """One UniC correction (when enabled) + UniP prediction; jittable, no Python branching.

        Arithmetic is done in the state dtype (float32 by default); the result has
        ``sample.dtype``.  Stepping past the last step is not checked (indices clamp).
        """
        k_max, buf_dtype = self.solver_order, state.model_outputs.dtype
        i, nums, hist = state.step_index, state.lower_order_nums, state.model_outputs
        x = sample.astype(buf_dtype)
        m_t = x - tables.sigmas[i] * model_output.astype(buf_dtype)  # flow x0 prediction

        older = [hist[-1 - k] for k in range(1, k_max)]
        corr_row = tables.corr_coef[i, jnp.maximum(state.last_order - 1, 0)]
        corrected = _combine(corr_row, state.last_sample, hist[-1], older + [m_t])
        x = jnp.where(tables.corrector_on[i] & (nums > 0), corrected, x)

        hist = jnp.concatenate([hist[1:], m_t[None]], axis=0)
        order = jnp.minimum(tables.max_order[i], nums + 1)
        pred_row = tables.pred_coef[i, order - 1]
        prev = _combine(pred_row, x, m_t, [hist[-1 - k] for k in range(1, k_max)])

        new_state = UniPCState(step_index=i + 1, lower_order_nums=jnp.minimum(nums + 1, k_max),
                               last_order=order, model_outputs=hist, last_sample=x)
        return prev.astype(sample.dtype), new_state
