"""Wan2.1 text-to-video: text encoding -> latent preparation -> denoising (CFG) -> VAE decode -> uint8 frames.

The DiT is split into (graph, state) once. One denoising step (batched cond + uncond forward, guidance, and
the scheduler update) is a single jitted pure function, compiled once per latent/text shape: the number of
steps (scheduler tables are padded to a fixed length), the guidance scale and the seed are runtime values.

On a mesh (the one the DiT's parameters live on) the step runs with that mesh in scope: the CFG batch
[cond; uncond] goes over ``data`` (cond on one half of the devices, uncond on the other when data is even),
the video tokens over ``sequence`` (Ulysses inside the DiT), and the latents / scheduler state keep one layout
across steps so the step compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy
from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import NonFiniteError
from fastvideo_jax.models.encoders.text import encode_prompts
from fastvideo_jax.models.vaes.parallel_decode import decode_on_mesh
from fastvideo_jax.parallel.activations import constrain, mesh_scope, spec_for
from fastvideo_jax.parallel.distributed import to_host
from fastvideo_jax.parallel.memory import move_params, params_mesh

# Scheduler tables are padded to this many steps so a new step count does not recompile the step.
MAX_STEPS = 1000


def pad_tables(tables: Any, num_steps: int, length: int = MAX_STEPS) -> Any:
    """Every table leaf (leading axis ``num_steps`` or ``num_steps + 1``) padded by edge values to ``length``."""
    if not 1 <= num_steps <= length:
        raise ValueError(f"num_inference_steps must be in [1, {length}], got {num_steps}")

    def pad(a):
        a = jnp.asarray(a)
        return jnp.pad(a, [(0, length - num_steps)] + [(0, 0)] * (a.ndim - 1), mode="edge")

    return jax.tree.map(pad, tables)


def _denoise_step(graphdef, scheduler, use_cfg, dit_state, latents, sched_state, tables, context, guidance,
                  sta_ids=None, *, sta_palette=None):
    """latents (B, C, F, H, W) fp32; context (2B or B, Lt, D): [cond; uncond] when ``use_cfg``. With a mask
    strategy, ``sta_ids`` (num_layers,) picks this step's window set per layer from the static ``sta_palette``."""
    model = nnx.merge(graphdef, dit_state)
    batch = latents.shape[0]
    t = scheduler.timestep(tables, sched_state)
    x = jnp.concatenate([latents, latents]) if use_cfg else latents
    x = constrain(x, _BATCH_FIRST[: x.ndim])  # CFG parallel: cond and uncond on the two halves of data
    sta = {} if sta_palette is None else dict(sta_layer_ids=sta_ids, sta_palette=sta_palette)
    pred = model(hidden_states=x.astype(context.dtype), encoder_hidden_states=context,
                 timestep=jnp.broadcast_to(t, (x.shape[0],)), **sta).astype(jnp.float32)
    if use_cfg:
        cond, uncond = pred[:batch], pred[batch:]
        pred = uncond + guidance * (cond - uncond)
    latents, sched_state = scheduler.step(tables, sched_state, pred, latents)
    return jax.tree.map(lambda a: constrain(a, _state_axes(a, batch)), (latents, sched_state))


_BATCH_FIRST = ("batch", None, None, None, None)


def _state_axes(a, batch: int) -> tuple:
    """Latent-shaped leaves (leading axis = batch) go over the batch axes; the rest is replicated."""
    return _BATCH_FIRST[: a.ndim] if a.ndim and a.ndim <= 5 and a.shape[0] == batch else (None,) * a.ndim


@functools.partial(jax.jit, static_argnums=(0,))
def _initial_latents(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@dataclasses.dataclass
class WanT2VPipeline:
    tokenizer: Any
    text_encoder: nnx.Module
    transformer: nnx.Module
    vae: nnx.Module
    scheduler: Any
    config: PipelineConfig
    # FastVideo sliding-tile windows per (step, layer, head) for a sliding-tile DiT; steps run as one executable.
    mask_strategy: MaskStrategy | None = None

    def __post_init__(self) -> None:
        if self.config.flow_shift is not None:
            self.scheduler = dataclasses.replace(self.scheduler, shift=float(self.config.flow_shift))
        self._dit_graph, self._dit_state = nnx.split(self.transformer)
        self.mesh = _mesh_of(self._dit_state)
        self._replicated = _replicated_like(self._dit_state)
        self._steps = {
            use_cfg: jax.jit(functools.partial(_denoise_step, self._dit_graph, self.scheduler, use_cfg))
            for use_cfg in (False, True)
        }

    @property
    def dit_dtype(self):
        return to_dtype(self.transformer.config.precision)

    # ---- stages -------------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str], negative: list[str] | None) -> jax.Array:
        """(B or 2B, text_len, D) in the DiT dtype: cond rows, then uncond rows when ``negative`` is given."""
        texts = prompts + (negative or [])
        offload = self.config.text_encoder_offload
        if offload:  # parameters wait in host memory between prompts
            move_params(self.text_encoder, None)
        try:
            embeds, _ = encode_prompts(self.tokenizer, self.text_encoder, texts, self.config.text_len,
                                       clean=self.config.clean_prompts, dtype=self.dit_dtype)
        finally:
            if offload:
                move_params(self.text_encoder, "pinned_host")
        return embeds

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        vae = self.vae.config.arch_config
        t, s = vae.temporal_compression_ratio, vae.spatial_compression_ratio
        channels = self.transformer.config.arch_config.in_channels
        return (batch, channels, (num_frames - 1) // t + 1, height // s, width // s)

    def prepare_latents(self, shape: tuple[int, ...], seed: int, latents: Any | None = None) -> jax.Array:
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}; this request needs {shape}")
            return latents
        return _initial_latents(shape, jnp.asarray(seed, jnp.uint32))

    def denoise(self, latents: jax.Array, context: jax.Array, num_steps: int, guidance: float,
                progress: bool = True) -> jax.Array:
        use_cfg = context.shape[0] == 2 * latents.shape[0]
        tables = pad_tables(self.scheduler.set_timesteps(num_steps), num_steps)
        state = self.scheduler.init_state(tables, latents.shape)
        # Inputs live on the DiT's mesh in the layout of the step's outputs, so the second step hits the compile
        # cache: latent-shaped leaves and the text batch over the batch axes, the rest replicated.
        batch = latents.shape[0]
        latents, state = jax.device_put((latents, state), self._placement((latents, state), batch))
        context = jax.device_put(context, self._placement(context, context.shape[0]))
        tables, g = jax.device_put((tables, jnp.asarray(guidance, jnp.float32)), self._replicated)
        step = self._steps[use_cfg]
        palette, ids = self._sta_schedule(num_steps)
        if palette is not None:  # one executable per (cfg, palette); the step's window ids are data
            key = (use_cfg, palette)
            if key not in self._steps:
                self._steps[key] = jax.jit(functools.partial(_denoise_step, self._dit_graph, self.scheduler, use_cfg,
                                                             sta_palette=palette))
            step = self._steps[key]
        with mesh_scope(self.mesh):
            for i in tqdm(range(num_steps), desc="denoising", unit="step", disable=not progress):
                sta = () if ids is None else (jax.device_put(ids[i], self._replicated),)
                latents, state = step(self._dit_state, latents, state, tables, context, g, *sta)
        return latents

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
        dit = self.transformer.config
        if getattr(self.transformer, "sta_plan", None) is None:
            raise ValueError("a mask strategy needs a sliding-tile transformer (self_attention_backend='sliding_tile')")
        arch = dit.arch_config
        palette, ids = self.mask_strategy.palette_schedule(self.mask_strategy.num_steps, arch.num_layers,
                                                           arch.num_attention_heads)
        if num_steps > len(ids):
            raise ValueError(f"the mask strategy covers {len(ids)} denoising steps; {num_steps} were requested")
        return palette, ids

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Latents -> uint8 frames (B, F, H, W, 3), in spatial tiles when ``config.vae_tiling``. NaN or Inf in
        the latents or the decoded video is an error naming the stage, never a black video."""
        if not bool(_all_finite(latents)):
            raise NonFiniteError("the denoised latents contain NaN or Inf: the transformer diverged (with bf16, "
                                 "try dit_precision='fp32' / --dit-precision fp32)")
        vae_dtype = to_dtype(self.vae.config.precision)
        z = self.vae.denormalize_latents(latents.astype(jnp.float32)).astype(vae_dtype)
        video = decode_on_mesh(self.vae, z, params_mesh(self.vae), tiled=self.config.vae_tiling)  # split over the mesh
        if not bool(_all_finite(video)):
            raise NonFiniteError(f"the VAE decoded NaN or Inf from finite latents (VAE precision "
                                 f"{self.vae.config.precision}; try vae_decode_precision='fp32')")
        return to_host(_to_uint8(video))

    # ---- whole request ------------------------------------------------------------------------------------
    def __call__(self, param: SamplingParam, latents: Any | None = None, progress: bool = True) -> dict[str, Any]:
        param.validate(self.vae.config.arch_config.spatial_compression_ratio,
                       self.transformer.config.arch_config.patch_size[1],
                       self.vae.config.arch_config.temporal_compression_ratio)
        batch = param.num_videos_per_prompt
        prompts = [param.prompt] * batch
        use_cfg = param.guidance_scale > 1.0
        context = self.encode_text(prompts, [param.negative_prompt or ""] * batch if use_cfg else None)
        shape = self.latent_shape(batch, param.num_frames, param.height, param.width)
        z = self.prepare_latents(shape, param.seed, latents)
        z = self.denoise(z, context, param.num_inference_steps, param.guidance_scale, progress)
        return {"latents": z, "frames": self.decode(z)}


def _mesh_of(state: nnx.State):
    """The multi-device mesh the parameters live on, or None."""
    sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.devices.size > 1:
        return sharding.mesh
    return None


def _replicated_like(state: nnx.State):
    """A replicated sharding on the mesh the parameters live on (a single-device sharding without a mesh)."""
    leaf = jax.tree.leaves(state)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return jax.devices()[0]


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _to_uint8(video: jax.Array) -> jax.Array:  # (B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8
    x = jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(x, (0, 2, 3, 4, 1)) * 255).astype(jnp.uint8)
