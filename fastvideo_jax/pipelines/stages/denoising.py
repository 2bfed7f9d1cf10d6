"""Denoising: the scheduler loop around the DiT, one jitted step per (CFG, window palette), on the DiT's mesh.

The DiT is split into (graph, state) once. One step (the batched cond + uncond forward, guidance and the
scheduler update) is a single jitted pure function, compiled once per latent/conditioning shape: the number of
steps (tables are padded), the guidance scale and the seed are runtime values. The DiT is called by keyword
with the batch's ``conditioning`` as they are (``encoder_hidden_states``, ``encoder_hidden_states_image``, ...),
so a new model's inputs need no change here.

On a mesh (the one the DiT's parameters live on) the step runs with that mesh in scope: the CFG batch
[cond; uncond] goes over ``data``, the video tokens over ``sequence`` (Ulysses inside the DiT), and the latents
and scheduler state keep one layout across steps so the step compiles once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.parallel.activations import constrain, mesh_scope, spec_for
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["DenoisingStage"]

_BATCH_FIRST = ("batch", None, None, None, None)


def _denoise_step(graphdef, scheduler, use_cfg, dtype, dit_state, latents, sched_state, tables, conditioning,
                  latent_condition, guidance, sta_ids=None, *, sta_palette=None):
    """latents (B, C, F, H, W) fp32; ``conditioning``: the DiT's keyword inputs, (2B, ...) = [cond; uncond] when
    ``use_cfg``; ``latent_condition`` (B, C', F, H, W) or None, concatenated on channels. With a mask strategy,
    ``sta_ids`` (num_layers,) picks this step's window set per layer from the static ``sta_palette``."""
    model = nnx.merge(graphdef, dit_state)
    batch = latents.shape[0]
    t = scheduler.timestep(tables, sched_state)
    x = latents if latent_condition is None else jnp.concatenate([latents, latent_condition], axis=1)
    x = jnp.concatenate([x, x]) if use_cfg else x
    x = constrain(x, _BATCH_FIRST[: x.ndim])  # CFG parallel: cond and uncond on the two halves of data
    sta = {} if sta_palette is None else dict(sta_layer_ids=sta_ids, sta_palette=sta_palette)
    pred = model(hidden_states=x.astype(dtype), timestep=jnp.broadcast_to(t, (x.shape[0],)), **conditioning,
                 **sta).astype(jnp.float32)
    if use_cfg:
        cond, uncond = pred[:batch], pred[batch:]
        pred = uncond + guidance * (cond - uncond)
    latents, sched_state = scheduler.step(tables, sched_state, pred, latents)
    return jax.tree.map(lambda a: constrain(a, _state_axes(a, batch)), (latents, sched_state))


def _state_axes(a, batch: int) -> tuple:
    """Latent-shaped leaves (leading axis = batch) go over the batch axes; the rest is replicated."""
    return _BATCH_FIRST[: a.ndim] if a.ndim and a.ndim <= 5 and a.shape[0] == batch else (None,) * a.ndim


def _mesh_and_replicated(state: nnx.State):
    """The multi-device mesh the parameters live on (or None) and a replicated sharding on it (a single-device
    sharding without a mesh)."""
    sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
    if isinstance(sharding, NamedSharding):
        mesh = sharding.mesh if sharding.mesh.devices.size > 1 else None
        return mesh, NamedSharding(sharding.mesh, PartitionSpec())
    return None, jax.devices()[0]


class DenoisingStage(PipelineStage):
    """``transformer`` + ``scheduler``: the batch's latents denoised over ``batch.num_steps`` steps, with
    classifier-free guidance when ``batch.do_cfg``. ``mask_strategy``: FastVideo sliding-tile windows per
    (step, layer, head) for a sliding-tile DiT; every step runs one executable."""

    def __init__(self, transformer: nnx.Module, scheduler: Any, *, mask_strategy: MaskStrategy | None = None,
                 progress: bool = True):
        self.transformer, self.scheduler, self.mask_strategy = transformer, scheduler, mask_strategy
        self.progress = progress
        self.dtype = to_dtype(transformer.config.precision)
        self._graph, self._state = nnx.split(transformer)
        self.mesh, self._replicated = _mesh_and_replicated(self._state)
        self._steps: dict[tuple, Any] = {}

    def _step_fn(self, use_cfg: bool, palette: tuple | None):
        key = (use_cfg, palette)  # one executable per (cfg, palette); the step's window ids are data
        if key not in self._steps:
            static = {} if palette is None else {"sta_palette": palette}
            self._steps[key] = jax.jit(functools.partial(_denoise_step, self._graph, self.scheduler, use_cfg,
                                                         self.dtype, **static))
        return self._steps[key]

    def denoise(self, latents: jax.Array, conditioning: dict[str, jax.Array], tables: Any, num_steps: int,
                guidance: float, *, do_cfg: bool, latent_condition: jax.Array | None = None,
                progress: bool | None = None) -> jax.Array:
        state = self.scheduler.init_state(tables, latents.shape)
        # Inputs live on the DiT's mesh in the layout of the step's outputs, so the second step hits the compile
        # cache: latent-shaped leaves and the conditioning rows over the batch axes, the rest replicated.
        batch = latents.shape[0]
        latents, state = jax.device_put((latents, state), self._placement((latents, state), batch))
        conditioning = {k: jax.device_put(v, self._placement(v, v.shape[0])) for k, v in conditioning.items()}
        if latent_condition is not None:
            latent_condition = jax.device_put(latent_condition, self._placement(latent_condition, batch))
        tables, g = jax.device_put((tables, jnp.asarray(guidance, jnp.float32)), self._replicated)
        palette, ids = self._sta_schedule(num_steps)
        step = self._step_fn(do_cfg, palette)
        show = self.progress if progress is None else progress
        with mesh_scope(self.mesh):
            for i in tqdm(range(num_steps), desc="denoising", unit="step", disable=not show):
                sta = () if ids is None else (jax.device_put(ids[i], self._replicated),)
                latents, state = step(self._state, latents, state, tables, conditioning, latent_condition, g, *sta)
        return latents

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        latents = self.denoise(batch.latents, batch.conditioning, batch.tables, batch.num_steps,
                               batch.param.guidance_scale, do_cfg=batch.do_cfg,
                               latent_condition=batch.latent_condition)
        return batch.replace(latents=latents)

    def _placement(self, tree, batch: int):
        """Shardings for ``tree`` on the DiT's mesh (batch-leading leaves over the batch axes)."""
        if self.mesh is None:
            return jax.tree.map(lambda a: self._replicated, tree)
        return jax.tree.map(
            lambda a: NamedSharding(self.mesh, spec_for(_state_axes(a, batch), a.shape, self.mesh)), tree)

    def _sta_schedule(self, num_steps: int):
        """``(palette, ids (num_steps, num_layers))`` from ``mask_strategy`` (the palette spans every step the
        strategy covers, so the step compiles once whatever the step count), or ``(None, None)``."""
        if self.mask_strategy is None:
            return None, None
        if getattr(self.transformer, "sta_plan", None) is None:
            raise ValueError("a mask strategy needs a sliding-tile transformer (self_attention_backend='sliding_tile')")
        arch = self.transformer.config.arch_config
        palette, ids = self.mask_strategy.palette_schedule(self.mask_strategy.num_steps, arch.num_layers,
                                                           arch.num_attention_heads)
        if num_steps > len(ids):
            raise ValueError(f"the mask strategy covers {len(ids)} denoising steps; {num_steps} were requested")
        return palette, ids
