"""Denoising: the scheduler loop around the DiT, one jitted step per (expert, CFG, window palette), on the DiT's mesh.

The DiT is split into (graph, state) once. One step (the batched cond + uncond forward, guidance and the
scheduler update) is a single jitted pure function, compiled once per latent/conditioning shape: the number of
steps (tables are padded), the guidance scale and the seed are runtime values. The DiT is called by keyword
with the batch's ``conditioning`` as they are (``encoder_hidden_states``, ``encoder_hidden_states_image``, ...),
so a new model's inputs need no change here.

On a mesh (the one the DiT's parameters live on) the step runs with that mesh in scope: the CFG batch
[cond; uncond] goes over ``data``, the video tokens over ``sequence`` (Ulysses inside the DiT), and the latents
and scheduler state keep one layout across steps so the step compiles once.

Wan2.2 variants, generic here so every Wan pipeline gets them:
* two experts (A14B): ``transformer`` for timesteps >= ``boundary_ratio * num_train_timesteps``, then
  ``transformer_2`` with ``guidance_scale_2``; each expert has its own jitted step (the switch retraces
  nothing); ``expert_offload`` keeps the idle expert's parameters in pinned host memory.
* per-token timesteps (TI2V, ``expand_timesteps``): the DiT gets (B, L) timesteps; with a clean first-frame
  latent (image-to-video) the first latent frame's tokens are at 0 and the DiT's input has that frame replaced by
  the image latent at every step (the scheduler advances its own latents), and the result's first frame is the
  image latent, as diffusers' WanImageToVideoPipeline does.
* a stochastic scheduler (DMD) gets its noise key from the request's seed (``init_state(key=seed)``).

TeaCache (``teacache_thresh`` > 0, a ``CachableDiT``, Wan2.1: one expert, one timestep per sample): a second
executable whose step also takes and returns the cache pytree (``models/dits/teacache.py``), a fresh cache per
request, the threshold and step counts as data.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.dits import teacache
from fastvideo_jax.models.dits.cachable import CachableDiT
from fastvideo_jax.models.dits.wanvideo import per_token_timesteps
from fastvideo_jax.parallel.activations import constrain, mesh_scope, spec_for
from fastvideo_jax.parallel.memory import move_params
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["DenoisingStage"]

_BATCH_FIRST = ("batch", None, None, None, None)


def _denoise_step(graphdef, scheduler, use_cfg, dtype, dit_state, latents, sched_state, tables, conditioning,
                  latent_condition, guidance, sta_ids=None, *, sta_palette=None, expand_timesteps=False,
                  first_frame=None):
    """latents (B, C, F, H, W) fp32; ``conditioning``: the DiT's keyword inputs, (2B, ...) = [cond; uncond] when
    ``use_cfg``; ``latent_condition`` (B, C', F, H, W) or None, concatenated on channels. With a mask strategy,
    ``sta_ids`` (num_layers,) picks this step's window set per layer from the static ``sta_palette``.
    ``expand_timesteps``: one timestep per token; ``first_frame`` (B, C, 1, H, W): the clean first-frame latent
    that replaces the first latent frame in the DiT's input (its tokens at timestep 0)."""
    def forward(model, **inputs):
        return model(**inputs), None

    out, _ = _guided_step(forward, nnx.merge(graphdef, dit_state), scheduler, use_cfg, dtype, latents, sched_state,
                          tables, conditioning, latent_condition, guidance, sta_ids, sta_palette, expand_timesteps,
                          first_frame)
    return out


def _cached_denoise_step(graphdef, scheduler, use_cfg, dtype, dit_state, latents, sched_state, cache, runtime,
                         tables, conditioning, latent_condition, guidance, sta_ids=None, *, sta_palette=None,
                         expand_timesteps=False, first_frame=None):
    """``_denoise_step`` under TeaCache (a ``CachableDiT``): the cache (``TeaCacheState``) goes in and comes out
    with the latents and scheduler state; ``runtime`` holds the threshold and step counts as data (no retrace)."""
    def forward(model, **inputs):
        return model.cached_call(cache, runtime, cfg=use_cfg, **inputs)

    out, cache = _guided_step(forward, nnx.merge(graphdef, dit_state), scheduler, use_cfg, dtype, latents,
                              sched_state, tables, conditioning, latent_condition, guidance, sta_ids, sta_palette,
                              expand_timesteps, first_frame)
    return (*out, teacache.constrain_state(cache))


def _guided_step(forward, model, scheduler, use_cfg, dtype, latents, sched_state, tables, conditioning,
                 latent_condition, guidance, sta_ids, sta_palette, expand_timesteps, first_frame):
    """One step: ``forward(model, **dit_inputs)`` -> (prediction, extra) on [cond; uncond] (or cond only),
    guidance, the scheduler update. Returns ((latents, scheduler state), extra)."""
    batch = latents.shape[0]
    t = scheduler.timestep(tables, sched_state)
    x = latents
    if first_frame is not None:  # diffusers' (1 - mask) * condition + mask * latents, mask 0 on frame 0
        x = jnp.concatenate([first_frame.astype(x.dtype), x[:, :, 1:]], axis=2)
    x = x if latent_condition is None else jnp.concatenate([x, latent_condition], axis=1)
    x = jnp.concatenate([x, x]) if use_cfg else x
    x = constrain(x, _BATCH_FIRST[: x.ndim])  # CFG parallel: cond and uncond on the two halves of data
    if expand_timesteps:
        timestep = per_token_timesteps(t, x.shape, model.config.arch_config.patch_size,
                                       clean_first_frame=first_frame is not None)
    else:
        timestep = jnp.broadcast_to(t, (x.shape[0],))
    sta = {} if sta_palette is None else dict(sta_layer_ids=sta_ids, sta_palette=sta_palette)
    pred, extra = forward(model, hidden_states=x.astype(dtype), timestep=timestep, **conditioning, **sta)
    pred = pred.astype(jnp.float32)
    if use_cfg:
        cond, uncond = pred[:batch], pred[batch:]
        pred = uncond + guidance * (cond - uncond)
    latents, sched_state = scheduler.step(tables, sched_state, pred, latents)
    return jax.tree.map(lambda a: constrain(a, _state_axes(a, batch)), (latents, sched_state)), extra


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
    (step, layer, head) for a sliding-tile DiT; every step runs one executable. ``transformer_2`` +
    ``boundary_ratio``: Wan2.2's low-noise expert and where it takes over; ``expert_offload`` keeps only the
    active expert on the devices. ``expand_timesteps``: per-token timesteps (Wan2.2 TI2V)."""

    def __init__(self, transformer: nnx.Module, scheduler: Any, *, mask_strategy: MaskStrategy | None = None,
                 progress: bool = True, transformer_2: nnx.Module | None = None, boundary_ratio: float | None = None,
                 expert_offload: bool = False, expand_timesteps: bool = False):
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("two experts need both transformer_2 and boundary_ratio (got "
                             f"transformer_2={'set' if transformer_2 is not None else None}, "
                             f"boundary_ratio={boundary_ratio})")
        if boundary_ratio is not None and not 0 < boundary_ratio < 1:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        self.transformer, self.scheduler, self.mask_strategy = transformer, scheduler, mask_strategy
        self.transformer_2, self.boundary_ratio = transformer_2, boundary_ratio
        self.expert_offload, self.expand_timesteps = expert_offload, expand_timesteps
        self.progress = progress
        self.dtype = to_dtype(transformer.config.precision)
        self.experts = (transformer,) if transformer_2 is None else (transformer, transformer_2)
        self._steps: dict[tuple, Any] = {}
        self.refresh()
        self.mesh, self._replicated = _mesh_and_replicated(self._state)
        self.last_teacache: dict | None = None  # what TeaCache skipped in the last denoise (None: it was off)

    def refresh(self) -> None:
        """Re-read the experts' graphs and parameters after they changed in place (a LoRA attached, merged or
        removed). Compiled steps are keyed by graph: a graph seen before (the same adapters' ranks) reuses them."""
        split = [nnx.split(m) for m in self.experts]
        self._graphs = [g for g, _ in split]
        self._states = [st for _, st in split]
        self._graph, self._state = self._graphs[0], self._states[0]

    def _step_fn(self, use_cfg: bool, palette: tuple | None, expert: int = 0, cached: bool = False):
        # one executable per (expert, cfg, palette, TeaCache); the window ids, guidance and threshold are data
        key = (self._graphs[expert], expert, use_cfg, palette, cached)
        if key not in self._steps:
            static = {} if palette is None else {"sta_palette": palette}
            if self.expand_timesteps:
                static["expand_timesteps"] = True
            fn = _cached_denoise_step if cached else _denoise_step
            self._steps[key] = jax.jit(functools.partial(fn, self._graphs[expert], self.scheduler, use_cfg,
                                                         self.dtype, **static))
        return self._steps[key]

    def expert_schedule(self, tables: Any, num_steps: int) -> list[int]:
        """The expert (0: ``transformer``, 1: ``transformer_2``) of each step: the high-noise one while the
        step's timestep is >= boundary_ratio * num_train_timesteps (diffusers' rule)."""
        if self.transformer_2 is None:
            return [0] * num_steps
        boundary = self.boundary_ratio * getattr(self.scheduler, "num_train_timesteps", 1000)
        timesteps = np.asarray(jax.device_get(tables.timesteps))[:num_steps]
        return [0 if float(t) >= boundary else 1 for t in timesteps]

    def _activate(self, expert: int) -> None:
        """With ``expert_offload``: the other experts' parameters to pinned host memory, this one's to the
        devices (their shardings kept)."""
        if not self.expert_offload or len(self.experts) == 1:
            return
        for j, m in enumerate(self.experts):
            if j != expert:
                move_params(m, "pinned_host")
                self._states[j] = nnx.state(m)
        move_params(self.experts[expert], None)
        self._states[expert] = nnx.state(self.experts[expert])

    def denoise(self, latents: jax.Array, conditioning: dict[str, jax.Array], tables: Any, num_steps: int,
                guidance: float, *, do_cfg: bool, latent_condition: jax.Array | None = None,
                progress: bool | None = None, guidance_2: float | None = None, first_frame: jax.Array | None = None,
                key: Any = None, teacache_thresh: float = 0.0) -> jax.Array:
        """``guidance_2``: the low-noise expert's guidance (default ``guidance``); ``first_frame`` (B, C, 1, H, W):
        the clean first-frame latent kept in place (image-to-video with per-token timesteps); ``key``: the seed
        of a stochastic scheduler's noise (DMD). ``teacache_thresh`` > 0: under TeaCache (the DiT's FastVideo
        preset); ``last_teacache`` then reports what it skipped."""
        if first_frame is not None and not self.expand_timesteps:
            raise ValueError("a clean first-frame latent needs per-token timesteps (expand_timesteps)")
        cached = self._check_teacache(teacache_thresh)
        self.last_teacache = None
        state = self.scheduler.init_state(tables, latents.shape, key=key)
        # Inputs live on the DiT's mesh in the layout of the step's outputs, so the second step hits the compile
        # cache: latent-shaped leaves and the conditioning rows over the batch axes, the rest replicated.
        batch = latents.shape[0]
        latents, state = jax.device_put((latents, state), self._placement((latents, state), batch))
        conditioning = {k: jax.device_put(v, self._placement(v, v.shape[0])) for k, v in conditioning.items()}
        if latent_condition is not None:
            latent_condition = jax.device_put(latent_condition, self._placement(latent_condition, batch))
        extra = {}
        if first_frame is not None:
            extra["first_frame"] = jax.device_put(first_frame, self._placement(first_frame, batch))
        g2 = guidance if guidance_2 is None else guidance_2
        tables, gs = jax.device_put((tables, [jnp.asarray(g, jnp.float32) for g in (guidance, g2)]),
                                    self._replicated)
        palette, ids = self._sta_schedule(num_steps)
        experts = self.expert_schedule(tables, num_steps)
        active = None
        if cached:
            cache, runtime = self._teacache_inputs(latents.shape, do_cfg, teacache_thresh, num_steps)
        show = self.progress if progress is None else progress
        with mesh_scope(self.mesh):
            for i in tqdm(range(num_steps), desc="denoising", unit="step", disable=not show):
                e = experts[i]
                if e != active:
                    self._activate(e)
                    active = e
                step = self._step_fn(do_cfg, palette, e, cached)
                sta = () if ids is None else (jax.device_put(ids[i], self._replicated),)
                if cached:
                    latents, state, cache = step(self._states[e], latents, state, cache, runtime, tables,
                                                 conditioning, latent_condition, gs[e], *sta, **extra)
                else:
                    latents, state = step(self._states[e], latents, state, tables, conditioning, latent_condition,
                                          gs[e], *sta, **extra)
        if cached:
            self.last_teacache = _teacache_report(cache, num_steps, do_cfg)
        if first_frame is not None:  # the result's first frame is the clean image latent
            latents = jnp.concatenate([extra["first_frame"].astype(latents.dtype), latents[:, :, 1:]], axis=2)
        return latents

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.param
        latents = self.denoise(batch.latents, batch.conditioning, batch.tables, batch.num_steps,
                               p.guidance_scale, do_cfg=batch.do_cfg, latent_condition=batch.latent_condition,
                               guidance_2=p.guidance_scale_2, first_frame=batch.first_frame_latent, key=p.seed,
                               teacache_thresh=p.teacache_thresh)
        return batch.replace(latents=latents, teacache=self.last_teacache)

    def _check_teacache(self, thresh: float) -> bool:
        """Whether this request runs under TeaCache; a threshold this DiT / stage cannot honour is a
        ``UserError`` before any work."""
        teacache.check_thresh(thresh)
        if thresh == 0:
            return False
        name = type(self.transformer).__name__
        if not isinstance(self.transformer, CachableDiT):
            raise UserError(f"{name} does not support TeaCache: use teacache_thresh=0")
        if self.transformer_2 is not None or self.expand_timesteps:
            has = "two experts" if self.transformer_2 is not None else "per-token timesteps"
            raise UserError(f"TeaCache is FastVideo's for Wan2.1 (one expert, one timestep per sample); this "
                            f"{name} pipeline has {has}: use teacache_thresh=0")
        return True

    def _teacache_inputs(self, shape: tuple[int, ...], do_cfg: bool, thresh: float, num_steps: int):
        """(empty cache, runtime) on the DiT's mesh in the layout the cached step returns them."""
        params = self.transformer.teacache_params()
        runtime = params.runtime(thresh, num_steps)
        with mesh_scope(self.mesh):  # the cache's token count follows the sequence axis's padding
            cache = self.transformer.init_teacache_state(shape, self.dtype, cfg=do_cfg,
                                                         use_ret_steps=params.use_ret_steps)
        if self.mesh is None:
            shardings = jax.tree.map(lambda a: self._replicated, cache)
        else:
            leaves, tree = jax.tree.flatten(cache)
            axes = tree.flatten_up_to(teacache.state_axes(cache))
            shardings = jax.tree.unflatten(tree, [NamedSharding(self.mesh, spec_for(ax, a.shape, self.mesh))
                                                  for a, ax in zip(leaves, axes)])
        return jax.device_put(cache, shardings), jax.device_put(runtime, self._replicated)

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
        plan = getattr(self.transformer, "sta_plan", None)
        if plan is None:
            raise ValueError("a mask strategy needs a sliding-tile transformer (self_attention_backend='sliding_tile')")
        arch = self.transformer.config.arch_config  # the plan counts every attention layer (Hunyuan: both kinds)
        palette, ids = self.mask_strategy.palette_schedule(self.mask_strategy.num_steps, plan.num_layers,
                                                           arch.num_attention_heads)
        if num_steps > len(ids):
            raise ValueError(f"the mask strategy covers {len(ids)} denoising steps; {num_steps} were requested")
        return palette, ids


def _teacache_report(cache, num_steps: int, use_cfg: bool) -> dict:
    """What TeaCache saved in a request: the steps whose blocks were skipped, and the cond / uncond (or, without
    CFG, single) calls served from the cache; ``pattern`` (num_steps, 2) per call."""
    steps, pattern = teacache.skipped_steps(cache, num_steps, use_cfg)
    return {"steps": num_steps, "skipped_steps": steps, "calls": num_steps * (2 if use_cfg else 1),
            "skipped_calls": int(pattern.sum()), "pattern": pattern}
