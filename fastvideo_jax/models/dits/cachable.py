"""``CachableDiT``: a DiT whose transformer blocks can be skipped by TeaCache (FastVideo's hooks, functional).

FastVideo's hooks mutate attributes of the module; here each takes the cache (``TeaCacheState``, a pytree the
pipeline's jitted step carries from step to step) and returns the new one, so nothing on the Python side changes
between steps and the step compiles once. A model provides three things: its forward split as
``embed -> blocks -> head`` (``cached_blocks`` runs the middle), the tensor TeaCache compares (the
"modulated input") and the shapes of an empty cache (``init_teacache_state``).

Batched CFG: the DiT runs [cond; uncond] as one batch, and each half keeps FastVideo's own per-call decision.
The blocks are skipped (``lax.cond``, no retrace) only when every half skips; when one half skips and the other
does not, the blocks run on the whole batch and the skipping half takes ``hidden + its cached residual``
instead of their output (its residual is not overwritten), so every half gets exactly what FastVideo's
sequential cond / uncond calls would give it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.models.dits import teacache
from fastvideo_jax.models.dits.base import BaseDiT
from fastvideo_jax.models.dits.teacache import TeaCacheRuntime, TeaCacheState, WanTeaCacheParams


class CachableDiT(BaseDiT):
    """A ``BaseDiT`` whose blocks TeaCache can skip (FastVideo's hooks, taking and returning the cache)."""

    _abstract = True

    def teacache_params(self) -> WanTeaCacheParams:
        """The model's TeaCache preset (polynomial, which modulated input, retention steps)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement TeaCache")

    def init_teacache_state(self, hidden_states_shape: tuple[int, ...], dtype, *, cfg: bool,
                            use_ret_steps: bool) -> TeaCacheState:
        """An empty cache for latents of ``hidden_states_shape`` (the batch without the CFG copy), with the DiT's
        mesh in scope."""
        raise NotImplementedError(f"{type(self).__name__} does not implement TeaCache")

    def should_skip_forward_for_cached_states(self, cache: TeaCacheState, *, modulated: jax.Array,
                                              runtime: TeaCacheRuntime, cfg: bool):
        """FastVideo's decision for every half of the batch: (skip per slot (2,) bool, updated cache).
        ``modulated``: this step's modulated input for the whole batch ([cond; uncond] with CFG)."""
        if cfg:
            modulated = rearrange(modulated, "(s b) ... -> s b ...", s=teacache.SLOTS)
        return teacache.decide(cache, modulated, runtime, cfg)

    def retrieve_cached_states(self, cache: TeaCacheState, hidden_states: jax.Array, *, cfg: bool) -> jax.Array:
        """``hidden_states`` plus the cached residual of each row's half."""
        return hidden_states + teacache.residual_for_batch(cache, cfg).astype(hidden_states.dtype)

    def maybe_cache_states(self, cache: TeaCacheState, hidden_states: jax.Array, original_hidden_states: jax.Array,
                           skip: jax.Array, *, cfg: bool) -> TeaCacheState:
        """Store ``hidden_states - original_hidden_states`` (blocks' output minus input) for the halves that ran."""
        return teacache.store_residual(cache, hidden_states - original_hidden_states, skip, cfg)

    def cached_blocks(self, cache: TeaCacheState, runtime: TeaCacheRuntime, modulated: jax.Array,
                      hidden_states: jax.Array, run_blocks: Callable[["CachableDiT", jax.Array], jax.Array], *,
                      cfg: bool):
        """``run_blocks(self, hidden_states)`` under TeaCache: (block output or its cached stand-in, new cache).
        ``run_blocks`` gets the module as an argument (NNX modules cannot be closed over inside ``lax.cond``)."""
        skip, cache = self.should_skip_forward_for_cached_states(cache, modulated=modulated, runtime=runtime, cfg=cfg)
        rows = teacache.row_mask(skip, hidden_states.shape[0], cfg)[:, None, None]
        every = jnp.all(skip) if cfg else jnp.any(skip)  # without CFG only this step's slot can skip
        graphdef, state = nnx.split(self)

        def cached(state, x):
            return self.retrieve_cached_states(cache, x, cfg=cfg)

        def computed(state, x):  # halves that skip take their cached stand-in
            return jnp.where(rows, cached(state, x), run_blocks(nnx.merge(graphdef, state), x))

        out = jax.lax.cond(every, cached, computed, state, hidden_states)
        return out, self.maybe_cache_states(cache, out, hidden_states, skip, cfg=cfg)
