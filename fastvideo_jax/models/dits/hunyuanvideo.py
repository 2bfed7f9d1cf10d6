"""HunyuanVideo DiT (``HunyuanVideoTransformer3DModel``, diffusers layout) in Flax NNX.

3D patch embedding; the text token refiner (its own timestep + masked-mean-pooled text embedding, stacked
refiner blocks); the conditioning vector = timestep + embedded guidance + pooled CLIP projection; dual-stream
blocks then single-stream blocks (``hunyuan_blocks.py``), each kind stacked and run by ONE ``nnx.scan``; 3D RoPE
with the checkpoint's axis split (``rope_axes_dim``) and theta; an adaLN output head. Module attributes carry
diffusers' names, so the name mapping only rewrites PyTorch's Sequential indices. ``__call__`` runs the forward
under a cached jit (``compiled_call``): a second eager call with the same shapes does not compile.

Sliding-tile attention (``SlidingTileDiTConfig``, ``sta.py``) runs on the video tokens of every dual- and
single-stream block's joint attention, the real text tokens joined in full; per-layer windows are scanned data
(layers: the dual-stream blocks then the single-stream ones, FastVideo's numbering for mask strategies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.configs.models.dits.hunyuanvideo import HunyuanVideoArchConfig, HunyuanVideoConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.models.dits.base import DENSE_BACKENDS, BaseDiT
from fastvideo_jax.models.dits.hunyuan_blocks import (
    F32, AdaModulation, DualStreamBlock, RefinerBlock, SingleStreamBlock, stacked,
)
from fastvideo_jax.models.dits.sta import StaLayer, sta_inputs, sta_plan, sta_scan_inputs
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.layers.embeddings import rope_3d_tables, timestep_embedding
from fastvideo_jax.models.layers.linear import Linear, PatchEmbed3D
from fastvideo_jax.parallel.activations import constrain, mesh_scope, params_mesh
from fastvideo_jax.parallel.sequence import pad_length

FREQ_DIM = 256  # diffusers' Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)


class _Embedder(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection(act_fn="silu"))."""

    def __init__(self, d_in, dim, *, param_dtype, rngs):
        self.linear_1 = Linear(d_in, dim, axes=(None, "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class _TimeTextEmbed(nnx.Module):
    """timestep embedding + projection of a pooled text vector (+ embedded guidance when the model has one)."""

    def __init__(self, dim, pooled_dim, guidance, *, param_dtype, rngs):
        self.timestep_embedder = _Embedder(FREQ_DIM, dim, param_dtype=F32, rngs=rngs)
        self.text_embedder = _Embedder(pooled_dim, dim, param_dtype=param_dtype, rngs=rngs)
        self.guidance_embedder = _Embedder(FREQ_DIM, dim, param_dtype=F32, rngs=rngs) if guidance else None

    def __call__(self, timestep, pooled, guidance=None):  # (B,), (B, pooled_dim), (B,) -> (B, D)
        def embed(embedder, t):
            return embedder(timestep_embedding(t, FREQ_DIM).astype(pooled.dtype)).astype(F32)

        out = embed(self.timestep_embedder, timestep) + self.text_embedder(pooled).astype(F32)
        if self.guidance_embedder is not None:
            out = out + embed(self.guidance_embedder, guidance)
        return out.astype(pooled.dtype)


class _TokenRefiner(nnx.Module):
    def __init__(self, cfg: HunyuanVideoArchConfig, dtype, backend, rngs):
        self.refiner_blocks = stacked(lambda r: RefinerBlock(cfg, dtype, backend, r), cfg.num_refiner_layers, rngs)


class _ContextEmbedder(nnx.Module):
    """``HunyuanVideoTokenRefiner``: text (B, Lt, text_embed_dim) -> refined text tokens (B, Lt, D)."""

    def __init__(self, cfg: HunyuanVideoArchConfig, dtype, backend, rngs):
        dim = cfg.hidden_size
        self.time_text_embed = _TimeTextEmbed(dim, cfg.text_embed_dim, False, param_dtype=dtype, rngs=rngs)
        self.proj_in = Linear(cfg.text_embed_dim, dim, axes=(None, "embed"), param_dtype=dtype, rngs=rngs)
        self.token_refiner = _TokenRefiner(cfg, dtype, backend, rngs)

    def __call__(self, text, timestep, mask):  # mask (B, Lt) bool
        m = mask.astype(F32)[..., None]
        pooled = ((text.astype(F32) * m).sum(1) / m.sum(1)).astype(text.dtype)  # masked mean over the text
        temb = self.time_text_embed(timestep, pooled)
        x = constrain(self.proj_in(text), ("batch", "text_length", "embed"))

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)
        def run(x, block, temb, mask):
            return block(x, temb, mask)

        return run(x, self.token_refiner.refiner_blocks, temb, mask)


class _XEmbedder(nnx.Module):
    def __init__(self, cfg: HunyuanVideoArchConfig, dtype, rngs):
        patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        self.proj = PatchEmbed3D(cfg.in_channels, cfg.hidden_size, patch, param_dtype=dtype, rngs=rngs)


class HunyuanVideoTransformer3DModel(BaseDiT):
    """HunyuanVideo text-to-video DiT. ``__call__`` takes and returns PyTorch-layout latents (B, C, F, H, W).

    Attention: any dense backend, or ``SLIDING_TILE_ATTN`` (the same as ``self_attention_backend='sliding_tile'``:
    sliding-tile joint attention in the dual- and single-stream blocks, dense attention in the text refiner).
    ``SAGE_ATTN``: 8-bit SageAttention for every attention call (inference only: gradients raise)."""

    config_class = HunyuanVideoConfig
    _supported_attention_backends = DENSE_BACKENDS | {AttentionBackend.SLIDING_TILE_ATTN, AttentionBackend.SAGE_ATTN}
    extra_inputs = frozenset({"encoder_attention_mask", "pooled_projections", "sta_layer_ids", "sta_palette"})

    def __init__(self, config: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        super().__init__(config)
        cfg = config.arch_config
        dtype = to_dtype(config.precision)
        backend = None if self.attention_backend is AttentionBackend.SLIDING_TILE_ATTN else self.attention_backend
        self.sta_plan = sta_plan(config, cfg.num_layers + cfg.num_single_layers)  # dual blocks, then single
        dim = cfg.hidden_size
        self.x_embedder = _XEmbedder(cfg, dtype, rngs)
        self.context_embedder = _ContextEmbedder(cfg, dtype, backend, rngs)
        self.time_text_embed = _TimeTextEmbed(dim, cfg.pooled_projection_dim, cfg.guidance_embeds,
                                              param_dtype=dtype, rngs=rngs)
        self.transformer_blocks = stacked(lambda r: DualStreamBlock(cfg, dtype, backend, r), cfg.num_layers, rngs)
        self.single_transformer_blocks = stacked(lambda r: SingleStreamBlock(cfg, dtype, backend, r),
                                                 cfg.num_single_layers, rngs)
        self.norm_out = AdaModulation(dim, 2, param_dtype=dtype, rngs=rngs)  # AdaLayerNormContinuous: scale, shift
        out = cfg.out_channels * cfg.patch_size_t * cfg.patch_size * cfg.patch_size
        self.proj_out = Linear(dim, out, axes=("embed", None), param_dtype=dtype, rngs=rngs)

    def __call__(
        self,
        hidden_states: jax.Array,  # (B, C, F, H, W)
        encoder_hidden_states: jax.Array,  # (B, Lt, text_embed_dim): the LLaMA text states
        timestep: jax.Array,  # (B,) or a scalar
        encoder_hidden_states_image: jax.Array | None = None,  # no image branch: must stay None
        guidance: jax.Array | None = None,  # (B,) or a scalar: the embedded guidance (diffusers: scale * 1000)
        **kwargs,  # encoder_attention_mask (B, Lt) (1 = real text token, a prefix); pooled_projections (B, P);
        # sta_layer_ids (num_layers + num_single_layers,) int32, sta_palette: static per-head window sets
    ) -> jax.Array:  # (B, C_out, F, H, W)
        """The forward under one cached jit. A sliding-tile model can take its per-layer windows at run time:
        ``sta_palette`` (static, e.g. from ``MaskStrategy.palette_schedule``) and ``sta_layer_ids`` (data: the
        dual-stream layers then the single-stream ones; new ids do not recompile)."""
        self.check_extra_inputs(kwargs)
        if encoder_hidden_states_image is not None:
            raise TypeError("HunyuanVideoTransformer3DModel takes no image embedding (encoder_hidden_states_image)")
        mask, pooled = kwargs.get("encoder_attention_mask"), kwargs.get("pooled_projections")
        B = hidden_states.shape[0]
        mask, guidance = self._check_inputs(hidden_states, encoder_hidden_states, timestep, mask, pooled, guidance)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, F32), (B,))
        palette, ids = sta_inputs(self.sta_plan, kwargs.get("sta_layer_ids"), kwargs.get("sta_palette"),
                                  self.config.arch_config.num_attention_heads)
        with mesh_scope(params_mesh(nnx.state(self))):  # loaded on a mesh: split the work on it too
            return compiled_call(_forward, self, hidden_states, encoder_hidden_states, timestep, mask, pooled,
                                 guidance, ids, sta_palette=palette)

    def _check_inputs(self, x, text, timestep, mask, pooled, guidance):
        cfg, name = self.config.arch_config, type(self).__name__
        B, C, F, H, W = x.shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        if C != cfg.in_channels or F % pt or H % p or W % p:
            raise ValueError(f"{name}: latents {x.shape} need {cfg.in_channels} channels, F divisible by "
                             f"{pt} and H, W divisible by {p}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"{name}: encoder_hidden_states {text.shape}: expected ({B}, Lt, {cfg.text_embed_dim})")
        if pooled is None or tuple(pooled.shape) != (B, cfg.pooled_projection_dim):
            raise ValueError(f"{name}: pooled_projections (the CLIP pooled text embedding) of shape "
                             f"({B}, {cfg.pooled_projection_dim}) is required, got "
                             f"{None if pooled is None else tuple(pooled.shape)}")
        if mask is None:
            mask = jnp.ones(text.shape[:2], bool)
        elif tuple(mask.shape) != text.shape[:2]:
            raise ValueError(f"{name}: encoder_attention_mask {tuple(mask.shape)} must be {text.shape[:2]}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError(f"{name}: this checkpoint embeds guidance (guidance_embeds=true): pass guidance "
                             "(diffusers passes guidance_scale * 1000)")
        if not cfg.guidance_embeds and guidance is not None:
            raise TypeError(f"{name}: this checkpoint has no guidance embedding (guidance_embeds=false): guidance "
                            "must be None")
        for what, value in (("timestep", timestep), ("guidance", guidance)):
            if value is not None and jnp.shape(value) not in ((), (B,)):
                raise ValueError(f"{name}: {what} of shape {jnp.shape(value)}: expected a scalar or ({B},) "
                                 "(one per sample)")
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, F32), (B,))
        return jnp.asarray(mask).astype(bool), guidance

    def forward(self, hidden_states, encoder_hidden_states, timestep, mask, pooled, guidance=None,
                sta_layer_ids=None, *, sta_palette=None):
        """The traced forward (``__call__`` runs it under jit with the configured matmul precision)."""
        cfg = self.config.arch_config
        pt, p = cfg.patch_size_t, cfg.patch_size
        B, _, F, H, W = hidden_states.shape
        grid = (F // pt, H // p, W // p)
        cos, sin = rope_3d_tables(cfg.attention_head_dim, grid, max(grid), cfg.rope_theta, cfg.rope_axes_dim)
        temb = self.time_text_embed(timestep, pooled, guidance)
        c = self.context_embedder(encoder_hidden_states, timestep, mask)
        text_lengths = mask.sum(-1, dtype=jnp.int32)
        # Video tokens go over the sequence mesh axis: padded to a multiple of it (the padding is never attended:
        # joint attention drops it) and cut off at the end. Patches are split before they are embedded.
        patches = rearrange(self.x_embedder.proj.patchify(hidden_states), "b f h w k -> b (f h w) k")
        L = patches.shape[1]
        Lp = pad_length(L)
        patches, cos, sin = (jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, Lp - L), (0, 0)]) for a in (patches, cos, sin))
        x = self.x_embedder.proj.project(constrain(patches, ("batch", "length", None)))
        x = constrain(x, ("batch", "length", "embed"))
        cos, sin = constrain(cos, ("length", None)), constrain(sin, ("length", None))

        dual = single = None
        if sta_palette is not None:  # layer ids: the dual-stream blocks', then the single-stream blocks'
            like = jax.ShapeDtypeStruct((B, L, cfg.num_attention_heads, cfg.attention_head_dim), x.dtype)
            grid, tile, palette, ids = sta_scan_inputs(self.sta_plan, sta_palette, sta_layer_ids, grid, like)
            dual, single = ((grid, tile, palette, part) for part in (ids[:cfg.num_layers], ids[cfg.num_layers:]))
        x, c = _run_blocks(self.transformer_blocks, x, c, temb, cos, sin, text_lengths, L, dual)
        x, _ = _run_blocks(self.single_transformer_blocks, x, c, temb, cos, sin, text_lengths, L, single)
        scale, shift = self.norm_out(temb)
        x = self.proj_out(self.norm_out.modulate(x, shift, scale))[:, :L]
        return rearrange(x, "b (f h w) (c pt ph pw) -> b c (f pt) (h ph) (w pw)",
                         f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=p, pw=p)


def _forward(model: HunyuanVideoTransformer3DModel, *args, **static):
    return model.forward(*args, **static)


def _run_blocks(blocks, x, c, temb, cos, sin, text_lengths, video_length, sta):
    """One block kind's stacked blocks under ONE ``nnx.scan``; with sliding-tile attention (``sta`` = grid, tile,
    palette, this kind's layer ids) each layer's window-set index is scanned data next to its parameters."""
    if sta is None:
        @nnx.scan(in_axes=(nnx.Carry, 0, None, None, None, None), out_axes=nnx.Carry)
        def run_dense(xc, block, temb, cos, sin, text_lengths):
            return block(*xc, temb, cos, sin, text_lengths, video_length)

        return run_dense((x, c), blocks, temb, cos, sin, text_lengths)
    grid, tile, palette, ids = sta

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None, None, None), out_axes=nnx.Carry)
    def run(xc, block, index, temb, cos, sin, text_lengths):
        return block(*xc, temb, cos, sin, text_lengths, video_length, StaLayer(grid, tile, palette, index))

    return run((x, c), blocks, ids, temb, cos, sin, text_lengths)


EntryClass = HunyuanVideoTransformer3DModel
