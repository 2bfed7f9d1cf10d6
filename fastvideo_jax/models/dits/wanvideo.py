"""Wan2.1 / Wan2.2 DiT (``WanTransformer3DModel``) in Flax NNX.

Module attributes follow FastVideo's names (see ``WAN_PARAM_NAMES_MAPPING``), so a Diffusers checkpoint loads
through the regex mapping and the standard tensor transforms. Blocks are built stacked (``nnx.vmap``) and run
with ONE ``nnx.scan`` (sliding-tile windows per layer are scanned data), so compile time does not grow with
depth; ``__call__`` runs the forward under a cached module-level jit (``compiled_call``) at the config's
``matmul_precision``, so a second eager call with the same shapes does not compile. Precision follows the
original: parameters in the configured dtype, with the time embedder, the modulation tables and the affine
norms kept in fp32; RoPE tables are computed in float64 and applied in fp32.

The timestep is one per sample (B,) or, for Wan2.2 TI2V (``expand_timesteps``), one per token (B, L) in the
order of the flattened (frame, height, width) patch grid: then the time embedding, every block's modulation
and the output head's shift/scale are per token (split over the sequence axis with the tokens), as diffusers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention import attention, sliding_tile_attention
from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.attention.video_sparse_layout import check_sparsity
from fastvideo_jax.configs.models.dits.wanvideo import WanVideoArchConfig, WanVideoConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.dits import teacache
from fastvideo_jax.models.dits.base import DENSE_BACKENDS
from fastvideo_jax.models.dits.cachable import CachableDiT
from fastvideo_jax.models.dits.sta import StaLayer, sta_inputs, sta_plan, sta_scan_inputs
from fastvideo_jax.models.dits.vsa import VsaLayer, uses_vsa, video_sparse_attend, vsa_layer, vsa_sparsity_input
from fastvideo_jax.models.dits.teacache import (
    WAN_TEACACHE_PRESETS, TeaCacheRuntime, TeaCacheState, WanTeaCacheParams, wan_teacache_preset,
)
from fastvideo_jax.models.layers.activations import gelu_exact, gelu_tanh
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.layers.embeddings import apply_rope, rope_3d_tables, timestep_embedding
from fastvideo_jax.models.layers.linear import Linear, MLP, PatchEmbed3D, make_param
from fastvideo_jax.models.layers.remat import remat_block
from fastvideo_jax.models.layers.norms import LayerNorm, RMSNorm
from fastvideo_jax.parallel.activations import constrain, mesh_scope, params_mesh
from fastvideo_jax.parallel.sequence import local_attention, pad_length, padding_mask, ulysses_attention

F32 = jnp.float32


class _TimeEmbedder(nnx.Module):
    def __init__(self, freq_dim, dim, *, rngs):
        self.mlp = MLP(freq_dim, dim, dim, jax.nn.silu, axes_in=(None, "mlp"), axes_out=("mlp", "embed"),
                       param_dtype=F32, rngs=rngs)


class _TimeModulation(nnx.Module):
    def __init__(self, dim, *, param_dtype, rngs):
        self.linear = Linear(dim, 6 * dim, axes=("embed", "modulation"), param_dtype=param_dtype, rngs=rngs)


class WanImageEmbedding(nnx.Module):
    def __init__(self, in_features, dim, pos_embed_seq_len, *, param_dtype, rngs):
        self.norm1 = LayerNorm(in_features, 1e-5, param_dtype=F32, rngs=rngs)
        self.ff = MLP(in_features, in_features, dim, gelu_exact, axes_in=(None, "mlp"), axes_out=("mlp", "embed"),
                      param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, 1e-5, param_dtype=F32, rngs=rngs)
        self.pos_embed = (
            None
            if pos_embed_seq_len is None
            else make_param(rngs, nnx.initializers.zeros, (1, pos_embed_seq_len, in_features), param_dtype,
                            (None, None, None))
        )

    def __call__(self, x):  # (B, Li, image_dim) -> (B, Li', D)
        if self.pos_embed is not None:
            B, L, C = x.shape
            x = x.reshape(-1, 2 * L, C) + self.pos_embed[...]
        return self.norm2(self.ff(self.norm1(x)))


class WanConditionEmbedder(nnx.Module):
    def __init__(self, cfg: WanVideoArchConfig, param_dtype, rngs):
        dim = cfg.hidden_size
        self.freq_dim = cfg.freq_dim
        self.time_embedder = _TimeEmbedder(cfg.freq_dim, dim, rngs=rngs)
        self.time_modulation = _TimeModulation(dim, param_dtype=param_dtype, rngs=rngs)
        self.text_embedder = MLP(cfg.text_dim, dim, dim, gelu_tanh, axes_in=(None, "mlp"), axes_out=("mlp", "embed"),
                                 param_dtype=param_dtype, rngs=rngs)
        self.image_embedder = (
            None
            if cfg.image_dim is None
            else WanImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len, param_dtype=param_dtype, rngs=rngs)
        )

    def __call__(self, timestep, text, image):  # timestep (B,) or per token (B, L)
        t = timestep_embedding(timestep, self.freq_dim)
        temb = self.time_embedder.mlp(t).astype(text.dtype)  # (B[, L], D), in the text input's dtype as the original
        temb_proj = self.time_modulation.linear(jax.nn.silu(temb))  # (B[, L], 6D)
        context = self.text_embedder(text)
        image_context = None if image is None else self.image_embedder(image)
        return temb, temb_proj, context, image_context


class _QKNormProjections(nnx.Module):
    """to_q / to_k / to_v / to_out with q and k RMS-normalised across heads (names as in the checkpoint)."""

    def _init_projections(self, cfg: WanVideoArchConfig, param_dtype, rngs) -> None:
        dim, eps = cfg.hidden_size, cfg.eps
        self.num_heads = cfg.num_attention_heads

        def linear(axes):
            return Linear(dim, dim, axes=axes, param_dtype=param_dtype, rngs=rngs)

        def norm():
            return RMSNorm(dim, eps, param_dtype=param_dtype, axis_name="heads", rngs=rngs)

        self.to_q, self.to_k, self.to_v = linear(("embed", "heads")), linear(("embed", "heads")), linear(("embed", "heads"))
        self.to_out = linear(("heads", "embed"))
        self.norm_q, self.norm_k = norm(), norm()

    def _heads(self, x):  # (B, L, N*E) -> (B, L, N, E)
        return rearrange(x, "b l (n e) -> b l n e", n=self.num_heads)

    def _merge_heads_out(self, x):  # (B, L, N, E) -> (B, L, D)
        return self.to_out(rearrange(x, "b l n e -> b l (n e)"))


class WanCrossAttention(_QKNormProjections):
    def __init__(self, cfg: WanVideoArchConfig, param_dtype, rngs):
        self._init_projections(cfg, param_dtype, rngs)
        dim, kv = cfg.hidden_size, cfg.added_kv_proj_dim
        has_image = kv is not None
        self.add_k_proj = Linear(kv, dim, axes=("embed", "heads"), param_dtype=param_dtype, rngs=rngs) if has_image else None
        self.add_v_proj = Linear(kv, dim, axes=("embed", "heads"), param_dtype=param_dtype, rngs=rngs) if has_image else None
        self.norm_added_k = (
            RMSNorm(dim, cfg.eps, param_dtype=param_dtype, axis_name="heads", rngs=rngs) if has_image else None
        )

    def __call__(self, x, context, image_context, backend):  # x (B, L, D), context (B, Lt, D)
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(context)))
        v = self._heads(self.to_v(context))
        def attend(q, k, v, kv_mask):
            return attention(q, k, v, kv_mask, backend=backend)

        out = local_attention(q, k, v, attend)  # per token shard: the text is whole on every device
        if image_context is not None:
            k_img = self._heads(self.norm_added_k(self.add_k_proj(image_context)))
            v_img = self._heads(self.add_v_proj(image_context))
            out = out + local_attention(q, k_img, v_img, attend)
        return self._merge_heads_out(out)


class _ResidualNorm(nnx.Module):
    def __init__(self, dim, eps, *, rngs):
        self.norm = LayerNorm(dim, eps, param_dtype=F32, rngs=rngs)


class WanTransformerBlock(_QKNormProjections):
    """adaLN-modulated self-attention (q/k RMS norm across heads, 3D RoPE), cross-attention and FFN.

    The self-attention projections live on the block itself (FastVideo's layout: ``blocks.N.to_q``); with video
    sparse attention (``vsa``) so does FastVideo's ``to_gate_compress`` (the coarse branch's gate, projected from
    the same modulated input as q/k/v, no norm, no RoPE)."""

    def __init__(self, cfg: WanVideoArchConfig, param_dtype, attention_backend, rngs, vsa: bool = False):
        dim, eps = cfg.hidden_size, cfg.eps
        self._init_projections(cfg, param_dtype, rngs)
        self.to_gate_compress = (
            Linear(dim, dim, axes=("embed", "heads"), param_dtype=param_dtype, rngs=rngs) if vsa else None
        )
        self.attention_backend = attention_backend
        self.attn2 = WanCrossAttention(cfg, param_dtype, rngs)
        self.self_attn_residual_norm = _ResidualNorm(dim, eps, rngs=rngs) if cfg.cross_attn_norm else None
        self.ffn = MLP(dim, cfg.ffn_dim, dim, gelu_tanh, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                       param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(dim, eps, affine=False, rngs=rngs)  # norm1 and norm3: no parameters
        self.scale_shift_table = make_param(
            rngs, nnx.initializers.normal(dim**-0.5), (1, 6, dim), F32, (None, None, "embed")
        )

    def _self_attention(self, x, cos, sin, sta: StaLayer | None, kv_mask, vsa: VsaLayer | None = None):
        # RoPE on the sequence-sharded q/k (tables sharded alike), then Ulysses: each device attends N/sp heads
        q = apply_rope(self._heads(self.norm_q(self.to_q(x))), cos, sin)
        k = apply_rope(self._heads(self.norm_k(self.to_k(x))), cos, sin)
        v = self._heads(self.to_v(x))
        if vsa is not None:  # the gate travels with v (last axis) through the all-to-all
            vg = jnp.concatenate([v, self._heads(self.to_gate_compress(x))], axis=-1)
            attend = video_sparse_attend(vsa, v.shape[-1])
            return self._merge_heads_out(ulysses_attention(q, k, vg, attend, kv_mask))
        if sta is not None:
            attend = _sliding_tile_attend(sta, padded=kv_mask is not None)
        else:
            def attend(q, k, v, kv_mask):  # the padding mask is a prefix: as lengths, cuDNN can take it
                lengths = None if kv_mask is None else kv_mask.sum(-1, dtype=jnp.int32)
                return attention(q, k, v, kv_lengths=lengths, backend=self.attention_backend)
        return self._merge_heads_out(ulysses_attention(q, k, v, attend, kv_mask))

    def __call__(self, x, context, image_context, temb_proj, cos, sin, sta: StaLayer | None = None, kv_mask=None,
                 vsa: VsaLayer | None = None):
        # x (B, L, D), temb_proj (B, 6, D) or per token (B, L, 6, D); sta: this layer's sliding-tile windows
        # (None = dense); kv_mask (B, L): real tokens; vsa: video sparse attention's grid, width and sparsity
        x = constrain(x, ("batch", "length", "embed"))
        table = self.scale_shift_table[...]
        if temb_proj.ndim == 4:  # one modulation per token, each slice added on its own (no (B, L, 6, D) sum)
            shift, scale, gate, c_shift, c_scale, c_gate = (table[:, i] + temb_proj[:, :, i].astype(F32)
                                                            for i in range(6))
        else:
            mod = table + temb_proj.astype(F32)
            shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i : i + 1] for i in range(6))
        dtype = x.dtype
        h = (self.norm(x.astype(F32)) * (1 + scale) + shift).astype(dtype)
        x = (x.astype(F32) + self._self_attention(h, cos, sin, sta, kv_mask, vsa) * gate).astype(dtype)
        h = x if self.self_attn_residual_norm is None else self.self_attn_residual_norm.norm(x.astype(F32)).astype(dtype)
        x = x + self.attn2(h, context, image_context, self.attention_backend)
        h = (self.norm(x.astype(F32)) * (1 + c_scale) + c_shift).astype(dtype)
        x = (x.astype(F32) + self.ffn(h).astype(F32) * c_gate).astype(dtype)
        return constrain(x, ("batch", "length", "embed"))


def _sliding_tile_attend(sta: StaLayer, padded: bool):
    """Sliding-tile attention on the full token grid for the heads this device holds. Under Ulysses each
    device has every token for N/chunks heads: the palette is cut per head chunk and the entry is picked by
    (chunk, layer index) at run time (``StaLayer.device_view``)."""
    grid = sta.grid
    if padded:
        raise UserError(f"sliding-tile attention needs the whole token grid {grid} ({grid[0] * grid[1] * grid[2]} "
                         f"tokens), which the sequence mesh axis does not divide; use dense attention or a "
                         f"sequence size that divides the token count")

    def attend(q, k, v, kv_mask):
        palette, index = sta.device_view()
        return sliding_tile_attention(q, k, v, grid=grid, palette=palette, index=index, tile=sta.tile)

    return attend


class WanTransformer3DModel(CachableDiT):
    """Wan2.1 text/image-to-video DiT. ``__call__`` takes and returns PyTorch-layout latents (B, C, F, H, W).

    Attention: any dense backend, or ``SLIDING_TILE_ATTN`` (the same as ``self_attention_backend='sliding_tile'``:
    sliding-tile self-attention, dense cross-attention).
    ``SAGE_ATTN``: 8-bit SageAttention for every attention call (inference only: gradients raise).
    ``VIDEO_SPARSE_ATTN`` (FastWan): video sparse self-attention at ``vsa_sparsity`` with each block's
    ``to_gate_compress``; cross-attention dense."""

    config_class = WanVideoConfig
    _supported_attention_backends = DENSE_BACKENDS | {AttentionBackend.SLIDING_TILE_ATTN, AttentionBackend.SAGE_ATTN,
                                                      AttentionBackend.VIDEO_SPARSE_ATTN}
    extra_inputs = frozenset({"sta_layer_ids", "sta_palette", "vsa_sparsity"})

    def __init__(self, config: WanVideoConfig, *, rngs: nnx.Rngs):
        super().__init__(config)
        cfg = config.arch_config
        dtype = to_dtype(config.precision)
        vsa = uses_vsa(config)
        sparse = (AttentionBackend.SLIDING_TILE_ATTN, AttentionBackend.VIDEO_SPARSE_ATTN)
        dense_backend = None if self.attention_backend in sparse else self.attention_backend
        dim = cfg.hidden_size
        self.patch_embedding = _PatchEmbedding(cfg, dtype, rngs)
        self.condition_embedder = WanConditionEmbedder(cfg, dtype, rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return WanTransformerBlock(cfg, dtype, dense_backend, rngs, vsa=vsa)

        self.blocks = make_blocks(rngs)
        self.sta_plan = sta_plan(config)
        if vsa:
            _check_vsa_config(config, self.sta_plan)
        self.norm_out = LayerNorm(dim, cfg.eps, affine=False, rngs=rngs)
        out = cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.proj_out = Linear(dim, out, axes=("embed", None), param_dtype=dtype, rngs=rngs)
        self.scale_shift_table = make_param(
            rngs, nnx.initializers.normal(dim**-0.5), (1, 2, dim), F32, (None, None, "embed")
        )

    def __call__(
        self,
        hidden_states: jax.Array,  # (B, C, F, H, W)
        encoder_hidden_states: jax.Array,  # (B, Lt, text_dim)
        timestep: jax.Array,  # (B,) or, per token (Wan2.2 TI2V's expand_timesteps), (B, L) with L = F*H*W/patch
        encoder_hidden_states_image: jax.Array | None = None,  # (B, Li, image_dim)
        guidance: jax.Array | None = None,  # Wan has no guidance embedding: must stay None
        **kwargs,  # sta_layer_ids (num_layers,) int32, sta_palette: static per-head window sets; vsa_sparsity
    ) -> jax.Array:  # (B, C_out, F, H, W)
        """The forward under one cached jit (a second eager call with the same shapes does not compile).

        A sliding-tile model can take its per-layer windows at run time: ``sta_palette`` (static, e.g. from
        ``MaskStrategy.palette_schedule``) and ``sta_layer_ids`` (data: new ids do not recompile). A video sparse
        model takes ``vsa_sparsity`` (data, at least the config's; default the config's)."""
        self.check_extra_inputs(kwargs)
        if guidance is not None:
            raise TypeError("WanTransformer3DModel has no guidance embedding: guidance must be None "
                            "(classifier-free guidance is the pipeline's)")
        self._check_inputs(hidden_states, encoder_hidden_states_image)
        self._check_timestep(hidden_states, timestep)
        palette, ids = self._sta_inputs(kwargs.get("sta_layer_ids"), kwargs.get("sta_palette"))
        sparsity = vsa_sparsity_input(self.config, kwargs.get("vsa_sparsity"), type(self).__name__)
        with mesh_scope(params_mesh(nnx.state(self))):  # loaded on a mesh: split the work on it too
            return compiled_call(_forward, self, hidden_states, timestep, encoder_hidden_states,
                                 encoder_hidden_states_image, ids, sparsity, sta_palette=palette)

    def _sta_inputs(self, ids, palette):
        return sta_inputs(self.sta_plan, ids, palette, self.config.arch_config.num_attention_heads)

    def _check_inputs(self, hidden_states, encoder_hidden_states_image) -> None:
        cfg = self.config.arch_config
        B, C, F, H, W = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_channels or F % pt or H % ph or W % pw:
            raise ValueError(
                f"WanTransformer3DModel: latents {hidden_states.shape} need {cfg.in_channels} channels and "
                f"F, H, W divisible by patch {cfg.patch_size}"
            )
        if (encoder_hidden_states_image is None) != (self.condition_embedder.image_embedder is None):
            raise ValueError("encoder_hidden_states_image must be given exactly when the model has image_dim set")

    def _check_timestep(self, hidden_states, timestep) -> None:
        """A scalar, one timestep per sample (B,), or one per token (B, L) in the order of the flattened
        (frame, height, width) patch grid."""
        B, _, F, H, W = hidden_states.shape
        pt, ph, pw = self.config.arch_config.patch_size
        L = (F // pt) * (H // ph) * (W // pw)
        shape = jnp.shape(timestep)
        if shape not in ((), (B,), (B, L)):
            raise ValueError(f"WanTransformer3DModel: timestep of shape {shape} for latents {hidden_states.shape}; "
                             f"expected (), ({B},) or per token ({B}, {L})")

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                sta_layer_ids=None, vsa_sparsity=None, *, sta_palette=None):
        """The traced forward (``__call__`` runs it under jit with the configured matmul precision)."""
        emb = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, sta_layer_ids,
                         vsa_sparsity, sta_palette=sta_palette)
        return self.head(self.run_blocks(emb, emb.x), emb)

    # ---- TeaCache (CachableDiT) ---------------------------------------------------------------------------
    def cached_call(self, cache: TeaCacheState, runtime: TeaCacheRuntime, *, cfg: bool, hidden_states,
                    encoder_hidden_states, timestep, encoder_hidden_states_image=None, guidance=None, **kwargs):
        """``__call__`` under TeaCache (same inputs, checks, mesh and jit): (output, updated cache). ``cfg``: the
        batch is [cond; uncond] (each half keeps its own cache slot)."""
        self.check_extra_inputs(kwargs)
        if guidance is not None:
            raise TypeError("WanTransformer3DModel has no guidance embedding: guidance must be None")
        self._check_inputs(hidden_states, encoder_hidden_states_image)
        self._check_timestep(hidden_states, timestep)
        if jnp.ndim(timestep) == 2:
            raise UserError("TeaCache needs one timestep per sample; per-token timesteps (Wan2.2 TI2V) have no "
                            "TeaCache coefficients in FastVideo: use teacache_thresh=0")
        palette, ids = self._sta_inputs(kwargs.get("sta_layer_ids"), kwargs.get("sta_palette"))
        sparsity = vsa_sparsity_input(self.config, kwargs.get("vsa_sparsity"), type(self).__name__)
        with mesh_scope(params_mesh(nnx.state(self))):
            return compiled_call(_cached_forward, self, cache, runtime, hidden_states, timestep, encoder_hidden_states,
                                 encoder_hidden_states_image, ids, sparsity, sta_palette=palette, cfg=cfg)

    def cached_forward(self, cache: TeaCacheState, runtime: TeaCacheRuntime, hidden_states, timestep,
                       encoder_hidden_states, encoder_hidden_states_image=None, sta_layer_ids=None,
                       vsa_sparsity=None, *, cfg: bool, sta_palette=None):
        """``forward`` under TeaCache (traced): (output, updated cache)."""
        emb = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, sta_layer_ids,
                         vsa_sparsity, sta_palette=sta_palette)
        x, cache = self.cached_blocks(cache, runtime, self.teacache_modulated_input(emb, runtime.use_ret_steps),
                                      emb.x, lambda model, x: model.run_blocks(emb, x), cfg=cfg)
        return self.head(x, emb), cache

    @staticmethod
    def teacache_modulated_input(emb: "WanEmbedded", use_ret_steps: bool) -> jax.Array:
        """FastVideo's choice: the timestep projection (B, 6, D) with ret-steps, else the time embedding (B, D)."""
        return emb.temb_proj if use_ret_steps else emb.temb

    def teacache_params(self, model_id: str = "") -> WanTeaCacheParams:
        """FastVideo's TeaCache preset for this model's size (``wan_teacache_preset``)."""
        arch = self.config.arch_config
        return WAN_TEACACHE_PRESETS[wan_teacache_preset(arch.hidden_size, arch.image_dim, model_id)]

    def init_teacache_state(self, hidden_states_shape, dtype, *, cfg: bool, use_ret_steps: bool) -> TeaCacheState:
        """An empty cache for latents of ``hidden_states_shape`` (B, C, F, H, W); ``dtype``: the activations'.
        Call with the DiT's mesh in scope (the tokens are padded to the sequence axis)."""
        arch = self.config.arch_config
        B, _, F, H, W = hidden_states_shape
        pt, ph, pw = arch.patch_size
        dim = arch.hidden_size
        tokens = pad_length((F // pt) * (H // ph) * (W // pw))
        return teacache.init_state(B, tokens, dim, (6, dim) if use_ret_steps else (dim,), dtype, cfg=cfg)

    # ---- the forward's pieces: embed -> blocks -> head ----------------------------------------------------
    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
              sta_layer_ids=None, vsa_sparsity=None, *, sta_palette=None) -> "WanEmbedded":
        """Patch, text and time embeddings, RoPE tables and the padding mask: everything the blocks take."""
        cfg = self.config.arch_config
        B, C, F, H, W = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = (F // pt, H // ph, W // pw)
        cos, sin = rope_3d_tables(cfg.attention_head_dim, grid, cfg.rope_max_seq_len)
        # patches (B, L, pt*ph*pw*C) are split by tokens before they are embedded: no (B, L, D) array is ever whole
        patches = rearrange(self.patch_embedding.proj.patchify(hidden_states), "b f h w k -> b (f h w) k")
        # Tokens go over the sequence mesh axis: pad to a multiple of it, mask the padded keys, drop them at the end
        L = patches.shape[1]
        Lp = pad_length(L)
        per_token = jnp.ndim(timestep) == 2
        if per_token:  # (B, L): embedded and modulated per token, sharded like the tokens (padding: timestep 0)
            timestep = constrain(jnp.pad(timestep, ((0, 0), (0, Lp - L))), ("batch", "length"))
        else:
            timestep = jnp.broadcast_to(timestep, (B,))
        temb, temb_proj, context, image_context = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        if per_token:
            temb = constrain(temb, ("batch", "length", "embed"))
            temb_proj = constrain(rearrange(temb_proj, "b l (six d) -> b l six d", six=6),
                                  ("batch", "length", None, "embed"))
        else:
            temb_proj = constrain(rearrange(temb_proj, "b (six d) -> b six d", six=6), ("batch", None, "embed"))
        context = constrain(context, ("batch", "text_length", "embed"))
        patches, cos, sin = (jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, Lp - L), (0, 0)]) for a in (patches, cos, sin))
        x = self.patch_embedding.proj.project(constrain(patches, ("batch", "length", None)))
        x = constrain(x, ("batch", "length", "embed"))
        cos, sin = constrain(cos, ("length", None)), constrain(sin, ("length", None))
        kv_mask = padding_mask(B, L, Lp)

        sta = None
        if sta_palette is not None:
            like = jax.ShapeDtypeStruct((B, L, cfg.num_attention_heads, cfg.attention_head_dim), x.dtype)
            sta = sta_scan_inputs(self.sta_plan, sta_palette, sta_layer_ids, grid, like)
        vsa = None
        if uses_vsa(self.config):
            sparsity = self.config.vsa_sparsity if vsa_sparsity is None else vsa_sparsity
            vsa = vsa_layer(self.config, grid, jnp.asarray(sparsity, F32))
        return WanEmbedded(x, temb, temb_proj, context, image_context, cos, sin, kv_mask, sta, grid, L, vsa)

    def run_blocks(self, emb: "WanEmbedded", x: jax.Array) -> jax.Array:
        """The transformer blocks on tokens ``x`` (B, Lp, D)."""
        return _run_blocks(x, self.blocks, emb.context, emb.image_context, emb.temb_proj, emb.cos, emb.sin, emb.sta,
                           emb.kv_mask, emb.vsa, remat=self.config.remat)

    def head(self, x: jax.Array, emb: "WanEmbedded") -> jax.Array:
        """Output norm (modulated by the time embedding), projection and unpatchify: (B, C_out, F, H, W)."""
        pt, ph, pw = self.config.arch_config.patch_size
        grid = emb.grid
        table = self.scale_shift_table[...]  # (1, 2, D)
        if emb.temb.ndim == 3:  # per token, temb (B, Lp, D): the output head's shift and scale per token
            shift, scale = (table[:, i][:, None] + emb.temb.astype(F32) for i in range(2))
        else:
            shift, scale = jnp.split(table + emb.temb.astype(F32)[:, None, :], 2, axis=1)
        x = (self.norm_out(x.astype(F32)) * (1 + scale) + shift).astype(x.dtype)
        x = self.proj_out(x)[:, :emb.length]
        return rearrange(
            x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
            f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw,
        )


class WanEmbedded(NamedTuple):
    """What ``embed`` hands to the blocks and the head (traced arrays, plus the static token grid)."""

    x: jax.Array  # (B, Lp, D) tokens, padded to a multiple of the sequence mesh axis
    temb: jax.Array  # (B, D), or per token (B, Lp, D)
    temb_proj: jax.Array  # (B, 6, D), or per token (B, Lp, 6, D)
    context: jax.Array  # (B, Lt, D)
    image_context: jax.Array | None
    cos: jax.Array
    sin: jax.Array
    kv_mask: jax.Array | None
    sta: tuple | None
    grid: tuple[int, int, int]
    length: int  # L, real tokens
    vsa: VsaLayer | None = None  # video sparse attention: grid, top-k width, traced sparsity


def per_token_timesteps(t: jax.Array, latent_shape: tuple[int, ...], patch_size: tuple[int, int, int] = (1, 2, 2),
                        clean_first_frame: bool = False) -> jax.Array:
    """Wan2.2 TI2V's (B, L) timestep for a scalar (or (B,)) step timestep ``t`` on latents of ``latent_shape``
    (B, C, F, H, W): ``t`` on every token, 0 on the first latent frame's tokens when ``clean_first_frame``
    (image-to-video keeps that frame clean), as diffusers' ``(mask[0][0][:, ::2, ::2] * t).flatten()``."""
    B, _, F, H, W = latent_shape
    pt, ph, pw = patch_size
    grid = (F // pt, H // ph, W // pw)
    mask = np.ones(grid, np.float32)
    if clean_first_frame:
        mask[0] = 0.0  # the first latent frame (patch_size[0] is 1 in every Wan2.2 checkpoint)
    t = jnp.asarray(t, jnp.float32)
    return jnp.asarray(mask.reshape(-1)) * jnp.reshape(jnp.broadcast_to(t, (B,)), (B, 1))


def _forward(model: WanTransformer3DModel, *args, **static):
    return model.forward(*args, **static)


def _cached_forward(model: WanTransformer3DModel, *args, **static):
    return model.cached_forward(*args, **static)


def _run_blocks(x, blocks, context, image_context, temb_proj, cos, sin, sta, kv_mask, vsa=None, remat: str = "none"):
    """All stacked blocks under ONE ``nnx.scan`` (compile time flat in depth); with sliding-tile attention each
    layer's window-set index is scanned data next to its parameters; with video sparse attention every layer
    takes the same grid, width (static, closed over) and sparsity (broadcast data). ``remat``: the policy each
    block's body is rematerialised under when differentiated (``models/layers/remat.py``)."""
    if sta is None:
        statics = None if vsa is None else (vsa.grid, vsa.width)
        sparsity = None if vsa is None else vsa.sparsity

        def dense_body(x, block, context, image_context, temb_proj, cos, sin, kv_mask, sparsity):
            layer = None if statics is None else VsaLayer(*statics, sparsity)
            return block(x, context, image_context, temb_proj, cos, sin, None, kv_mask, layer)

        run_dense = nnx.scan(remat_block(dense_body, remat),
                             in_axes=(nnx.Carry, 0, None, None, None, None, None, None, None), out_axes=nnx.Carry)
        return run_dense(x, blocks, context, image_context, temb_proj, cos, sin, kv_mask, sparsity)
    grid, tile, palette, ids = sta

    def body(x, block, index, context, image_context, temb_proj, cos, sin, kv_mask):
        sta_layer = StaLayer(grid, tile, palette, index)
        return block(x, context, image_context, temb_proj, cos, sin, sta_layer, kv_mask)

    run = nnx.scan(remat_block(body, remat), in_axes=(nnx.Carry, 0, 0, None, None, None, None, None, None),
                   out_axes=nnx.Carry)
    return run(x, blocks, ids, context, image_context, temb_proj, cos, sin, kv_mask)


def _check_vsa_config(config: WanVideoConfig, plan) -> None:
    """Video sparse attention excludes sliding-tile windows and needs a sparsity in [0, 1) (before any weight)."""
    if plan is not None:
        raise UserError("WanTransformer3DModel: attention_backend='video_sparse_attn' and sliding-tile "
                        "self-attention exclude each other; pick one")
    try:
        check_sparsity(config.vsa_sparsity)
    except ValueError as e:
        raise UserError(f"WanTransformer3DModel: {e}") from None


class _PatchEmbedding(nnx.Module):
    def __init__(self, cfg: WanVideoArchConfig, dtype, rngs):
        self.proj = PatchEmbed3D(cfg.in_channels, cfg.hidden_size, cfg.patch_size, param_dtype=dtype, rngs=rngs)


EntryClass = WanTransformer3DModel
