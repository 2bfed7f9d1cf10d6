"""TeaCache for Wan (FastVideo's rule, functional): skip the transformer blocks on steps whose timestep
modulation barely moved, and add the residual the blocks produced the last time they ran.

FastVideo's rule, per DiT call (a call is one half of the CFG batch: the cond pass, then the uncond pass):

* the *modulated input* is the timestep projection ``timestep_proj`` (B, 6D) when ``use_ret_steps``, else the
  time embedding ``temb`` (B, D);
* calls are counted (``cnt``) and kept in two slots by parity (even / odd), each with its own previous modulated
  input, accumulated distance and cached residual; the counter restarts at 0 on every call made at step 0;
* calls with ``cnt < ret_steps`` (10 = 5 steps x 2 with ret-steps, else 2) or ``cnt >= cutoff_steps``
  (2N with ret-steps, else 2N - 2) always compute, and reset the slot's accumulator to 0;
* otherwise ``accumulated += poly(mean|m - m_prev| / mean|m_prev|)`` (``np.poly1d(coefficients)``); below the
  threshold the call skips the blocks (``hidden + cached residual``), else it computes and resets to 0;
* every call stores its modulated input as the slot's previous one; a computed call stores
  ``residual = blocks(hidden) - hidden`` (tokens after the patch embedding) in its slot.

Because of the restart at step 0, FastVideo's cond pass sits in the odd slot from step 1 on and the uncond pass in
the even one; the counters a half sees are therefore cond ``max(2i - 1, 0)``, uncond ``2i`` at step ``i`` (with CFG)
and ``i`` in slot ``i % 2`` (without). The state below keeps one slot per CFG half (slot 0 = cond rows, slot 1 =
uncond rows, so the cache is laid out like the batch) and feeds each the counter FastVideo gives it, which yields
FastVideo's decisions exactly (the step-0 writes FastVideo makes into the shared slot are overwritten before they
are read). Without CFG the two slots are FastVideo's even / odd steps.

A threshold of 0 (the default) disables TeaCache, as FastVideo's ``enable_teacache=False``: with Wan's
coefficients the polynomial can be negative, so "accumulated < 0" alone would not mean "never skip".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fastvideo_jax.configs.sample import MAX_INFERENCE_STEPS, check_number
from fastvideo_jax.parallel.activations import constrain

logger = logging.getLogger(__name__)

SLOTS = 2  # cond / uncond halves with CFG; even / odd steps without

# FastVideo's rescaling polynomials (highest power first, as np.poly1d), fitted per model size.
WAN_1_3B_RET_COEFFS = (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02)
WAN_1_3B_COEFFS = (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01)
WAN_14B_RET_COEFFS = (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01)
WAN_14B_COEFFS = (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)


@dataclasses.dataclass(frozen=True)
class WanTeaCacheParams:
    """FastVideo's ``WanTeaCacheParams``: which polynomial and modulated input a model uses, and the threshold
    FastVideo's presets recommend for it (``recommended_thresh``; requests pass their own, 0 = off)."""

    recommended_thresh: float
    use_ret_steps: bool
    ret_steps_coeffs: tuple[float, ...]
    non_ret_steps_coeffs: tuple[float, ...]

    @property
    def coefficients(self) -> tuple[float, ...]:
        return self.ret_steps_coeffs if self.use_ret_steps else self.non_ret_steps_coeffs

    @property
    def ret_steps(self) -> int:
        return (5 if self.use_ret_steps else 1) * 2

    def cutoff_steps(self, num_inference_steps: int) -> int:
        return num_inference_steps * 2 - (0 if self.use_ret_steps else 2)

    def runtime(self, thresh: float, num_inference_steps: int) -> "TeaCacheRuntime":
        """The per-request values as arrays (a new threshold or step count does not retrace the step)."""
        check_thresh(thresh)
        return TeaCacheRuntime(
            thresh=jnp.asarray(thresh, jnp.float32),
            coefficients=jnp.asarray(self.coefficients, jnp.float32),
            ret_steps=jnp.asarray(self.ret_steps, jnp.int32),
            cutoff_steps=jnp.asarray(self.cutoff_steps(num_inference_steps), jnp.int32),
            use_ret_steps=self.use_ret_steps,
        )


# FastVideo's Wan presets (configs/sample/wan.py before TeaCache was removed there).
WAN_TEACACHE_PRESETS = {
    "wan2.1-t2v-1.3b": WanTeaCacheParams(0.08, True, WAN_1_3B_RET_COEFFS, WAN_1_3B_COEFFS),
    "wan2.1-t2v-14b": WanTeaCacheParams(0.20, False, WAN_14B_RET_COEFFS, WAN_14B_COEFFS),
    "wan2.1-i2v-14b-480p": WanTeaCacheParams(0.26, True, WAN_14B_RET_COEFFS, WAN_14B_COEFFS),
    "wan2.1-i2v-14b-720p": WanTeaCacheParams(0.30, False, WAN_14B_RET_COEFFS, WAN_14B_COEFFS),
}
_SIZE_BY_WIDTH = {1536: "1.3b", 5120: "14b"}


def wan_teacache_preset(hidden_size: int, image_dim: int | None = None, model_id: str = "") -> str:
    """The preset for a Wan DiT: by width (1536: 1.3B, 5120: 14B); I2V 14B is 720P when the model id says so,
    else 480P. Other widths (tiny test models) get the 1.3B polynomial, logged: it was fitted to another model."""
    size = _SIZE_BY_WIDTH.get(hidden_size)
    if size is None:
        _warn_unfitted(hidden_size)
        size = "1.3b"
    if image_dim is None or size != "14b":
        return f"wan2.1-t2v-{size}"
    return "wan2.1-i2v-14b-720p" if "720" in model_id else "wan2.1-i2v-14b-480p"


@functools.lru_cache(maxsize=None)
def _warn_unfitted(hidden_size: int) -> None:  # once per width, not per request
    logger.warning("TeaCache: no coefficients fitted for a Wan DiT of width %d; using Wan2.1-T2V-1.3B's", hidden_size)


def check_thresh(thresh) -> None:
    """A finite number >= 0 (0 disables TeaCache), else ``UserError`` naming ``teacache_thresh``."""
    check_number("teacache_thresh", thresh, low=0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeaCacheRuntime:
    """One request's TeaCache settings as data; ``use_ret_steps`` (which tensor is compared) is static."""

    thresh: jax.Array  # () f32; <= 0 disables
    coefficients: jax.Array  # (K,) f32, highest power first
    ret_steps: jax.Array  # () int32
    cutoff_steps: jax.Array  # () int32
    use_ret_steps: bool = dataclasses.field(metadata=dict(static=True), default=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeaCacheState:
    """The cache carried from step to step (a fresh one per request)."""

    previous: jax.Array  # (SLOTS, B, *M) f32: each slot's previous modulated input
    accumulated: jax.Array  # (SLOTS,) f32: accumulated rescaled relative L1 distance
    # blocks(hidden) - hidden per slot, in the activations' dtype: laid out like the batch with CFG, (SLOTS * B,
    # L, D) = [cond; uncond]; without, (SLOTS, B, L, D)
    residual: jax.Array
    step: jax.Array  # () int32: forwards done (FastVideo's step index i)
    skipped: jax.Array  # (max_steps, SLOTS) bool: which slots were served from the cache at each step


def init_state(batch: int, tokens: int, dim: int, modulated: Sequence[int], dtype, *, cfg: bool,
               max_steps: int = MAX_INFERENCE_STEPS) -> TeaCacheState:
    """An empty cache for latents of ``batch`` videos (without the CFG copy), ``tokens`` (padded) tokens of width
    ``dim`` and a per-video modulated input of shape ``modulated``."""
    return TeaCacheState(
        previous=jnp.zeros((SLOTS, batch, *modulated), jnp.float32),
        accumulated=jnp.zeros((SLOTS,), jnp.float32),
        residual=jnp.zeros((SLOTS * batch, tokens, dim) if cfg else (SLOTS, batch, tokens, dim), dtype),
        step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((max_steps, SLOTS), bool),
    )


def state_axes(state: TeaCacheState) -> TeaCacheState:
    """Logical axes of every leaf: the residual like the activations (with CFG its slots are the batch halves,
    so they go over the batch axes with it; without, every device keeps both slots of its rows), the rest
    replicated."""
    cfg = state.residual.ndim == 3
    residual = ("batch", "length", "embed") if cfg else (None, "batch", "length", "embed")
    axes = jax.tree.map(lambda a: (None,) * a.ndim, dataclasses.replace(state, residual=jnp.zeros(())))
    return dataclasses.replace(axes, residual=residual)


def constrain_state(state: TeaCacheState) -> TeaCacheState:
    """``state`` constrained to ``state_axes`` on the mesh in scope (no-op without one)."""
    axes = state_axes(state)
    leaves, tree = jax.tree.flatten(state)
    return jax.tree.unflatten(tree, [constrain(a, ax) for a, ax in zip(leaves, tree.flatten_up_to(axes))])


def call_counters(step: jax.Array, cfg: bool) -> tuple[jax.Array, jax.Array]:
    """Per slot: FastVideo's call counter ``cnt`` and whether the slot is called at this step."""
    if cfg:
        cnt = jnp.stack([jnp.maximum(2 * step - 1, 0), 2 * step])
        return cnt, jnp.ones((SLOTS,), bool)
    return jnp.stack([step, step]), jnp.arange(SLOTS) == step % SLOTS


def decide(state: TeaCacheState, modulated: jax.Array, runtime: TeaCacheRuntime, cfg: bool):
    """FastVideo's decision for this step's calls. ``modulated``: (SLOTS, B, *M) with CFG (cond, uncond) or
    (B, *M) without. Returns (skip per slot (SLOTS,) bool, the state with previous / accumulated / step updated)."""
    m = modulated.astype(jnp.float32)
    if not cfg:
        m = jnp.broadcast_to(m, (SLOTS, *m.shape))
    cnt, active = call_counters(state.step, cfg)
    forced = (cnt < runtime.ret_steps) | (cnt >= runtime.cutoff_steps)
    axes = tuple(range(1, m.ndim))
    prev_mean = jnp.mean(jnp.abs(state.previous), axis=axes)
    rel = jnp.mean(jnp.abs(m - state.previous), axis=axes) / jnp.where(prev_mean > 0, prev_mean, 1.0)
    total = state.accumulated + jnp.polyval(runtime.coefficients, rel)
    skip = active & ~forced & (runtime.thresh > 0) & (total < runtime.thresh)
    wide = active.reshape((SLOTS,) + (1,) * (m.ndim - 1))
    state = dataclasses.replace(
        state,
        previous=jnp.where(wide, m, state.previous),
        accumulated=jnp.where(active, jnp.where(skip, total, 0.0), state.accumulated),
        step=state.step + 1,
        skipped=state.skipped.at[state.step].set(skip),
    )
    return skip, state


def residual_for_batch(state: TeaCacheState, cfg: bool) -> jax.Array:
    """The cached residual laid out like the DiT batch: [cond; uncond] with CFG, else the slot of this step's
    parity. Call after ``decide`` (it advanced ``step``)."""
    return state.residual if cfg else state.residual[(state.step - 1) % SLOTS]


def row_mask(skip: jax.Array, rows: int, cfg: bool) -> jax.Array:
    """(rows,) bool: whether each batch row's call skips."""
    return jnp.repeat(skip, rows // SLOTS) if cfg else jnp.broadcast_to(jnp.any(skip), (rows,))


def store_residual(state: TeaCacheState, residual: jax.Array, skip: jax.Array, cfg: bool) -> TeaCacheState:
    """``residual`` (batch layout) kept for the calls that computed; skipped calls keep their cached one."""
    keep = row_mask(skip, residual.shape[0], cfg)[:, None, None]
    new = jnp.where(keep, residual_for_batch(state, cfg), residual.astype(state.residual.dtype))
    stacked = new if cfg else state.residual.at[(state.step - 1) % SLOTS].set(new)
    return constrain_state(dataclasses.replace(state, residual=stacked))


def skipped_steps(state: TeaCacheState, num_steps: int, cfg: bool):
    """Host-side summary: (steps whose blocks were skipped, (num_steps, SLOTS) per-call pattern as numpy)."""
    import numpy as np

    pattern = np.asarray(state.skipped)[:num_steps]
    forwards = pattern.all(axis=1) if cfg else pattern.any(axis=1)
    return [int(i) for i in np.flatnonzero(forwards)], pattern
