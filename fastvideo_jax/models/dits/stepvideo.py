"""StepVideo-T2V DiT (``StepVideoModel``, 30B: 48 layers, 48 heads x 128, 64 latent channels, patch 1) in Flax NNX.

Registered as ``StepVideoModel`` (the ``_class_name`` of ``FastVideo/stepvideo-t2v-diffusers``' and the original
``stepfun-ai/stepvideo-t2v``'s ``transformer/config.json``). Module attributes carry the checkpoint's names
(``pos_embed.proj``, ``adaln_single.emb.timestep_embedder.linear_1``, ``caption_norm``, ``caption_projection``,
``clip_projection``, ``transformer_blocks.N.attn1.wqkv``, ...). Blocks (``stepvideo_blocks.py``) are stacked and
run by ONE ``nnx.scan``; ``__call__`` runs the forward under a cached jit (``compiled_call``). Video tokens are
split over the ``sequence`` mesh axis (padded to a multiple of it, the padding masked): Ulysses self-attention,
cross-attention per token shard against the whole text.

The call (by keyword, as every pipeline calls a DiT)::

    model(hidden_states=latents,                  # (B, 64, F, H, W), channels first like every DiT here
          timestep=t,                             # () or (B,): the original's flow time in [0, 1], 0 = pure
                                                  # noise: t = 1 - sigma (its scheduler: reverse_sigmas,
                                                  # num_train_timesteps=1); the DiT multiplies it by 1000 itself
          encoder_hidden_states=llm_states,       # (B, Lt, 6144): Step-LLM last hidden states (max 320 tokens)
          encoder_hidden_states_2=clip_states,    # (B, Lc, 1024): the bilingual CLIP (BERT) states (77 tokens)
          encoder_attention_mask=mask)            # (B, Lc + Lt): the LLM mask with Lc ones in front (the
                                                  # original pipeline pads it so); a (B, Lt) LLM mask is padded
                                                  # the same way here. 1 = attend.

Returns (B, 64, F, H, W). The text the video attends is [clip_projection(clip); caption_projection(
caption_norm(llm))]; each row attends its first ``sum(mask[b])`` tokens (the original turns the mask into a
length, so padding must be at the end). Pipeline facts from the originals: flow matching, shift 13, CFG 9,
30-50 steps (Turbo: shift 17, CFG 5, 10-15 steps); CFG = uncond + scale * (cond - uncond).

Precision: parameters in the configured dtype; the time embedder, modulation tables and block norms in fp32.
Pass the timestep in fp32 (it is cast to fp32 here): t * 1000 feeds a sinusoid, and a bf16 timestep (diffsynth's
bf16 pipeline passes one) moves the output by ~10% of its scale.

The text mask follows the original and DiffSynth (each row attends its first ``sum(mask[b])`` tokens);
FastVideo 0.1.7's port drops the mask in its cross-attention (keys are only cut to the batch's longest row), so
it differs from this on batches whose rows have different text lengths (e.g. the CFG batch [cond; uncond]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.configs.models.dits.stepvideo import StepVideoConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.models.dits.base import DENSE_BACKENDS, BaseDiT
from fastvideo_jax.models.dits.stepvideo_blocks import F32, StepVideoTransformerBlock
from fastvideo_jax.models.layers.activations import gelu_tanh
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.layers.embeddings import rope_3d_tables, timestep_embedding
from fastvideo_jax.models.layers.linear import Linear, make_param
from fastvideo_jax.models.layers.norms import LayerNorm
from fastvideo_jax.parallel.activations import constrain, mesh_scope, params_mesh
from fastvideo_jax.parallel.sequence import pad_length, padding_mask

FREQ_DIM = 256  # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
TIME_STEP_RESCALE = 1000.0  # AdaLayerNormSingle(time_step_rescale=1000): the timestep comes in [0, 1]
ROPE_THETA = 1e4


class _PatchConv(nnx.Module):
    """Conv2d(C, D, kernel=stride=p) as one matmul on (p, p, C) patches; kernel (p, p, C, D) (Conv2d OIHW -> HWIO)."""

    def __init__(self, channels, dim, patch, *, param_dtype, rngs):
        init = nnx.initializers.normal((channels * patch * patch) ** -0.5)
        axes = (None, None, "conv_in", "embed")
        self.kernel = make_param(rngs, init, (patch, patch, channels, dim), param_dtype, axes)
        self.bias = make_param(rngs, init, (dim,), param_dtype, ("embed",))

    def __call__(self, patches):  # (..., p*p*C) in (p, q, c) order -> (..., D)
        w = self.kernel[...].reshape(-1, self.kernel.shape[-1])
        y = jnp.dot(patches.astype(w.dtype), w, preferred_element_type=F32) + self.bias[...].astype(F32)
        return y.astype(w.dtype)


class _PatchEmbed(nnx.Module):
    def __init__(self, channels, dim, patch, *, param_dtype, rngs):
        self.proj = _PatchConv(channels, dim, patch, param_dtype=param_dtype, rngs=rngs)


class _TwoLinear(nnx.Module):
    """linear_1 -> act -> linear_2 (TimestepEmbedding with SiLU, PixArtAlphaTextProjection with tanh GELU)."""

    def __init__(self, d_in, dim, act, *, param_dtype, rngs):
        self.linear_1 = Linear(d_in, dim, axes=(None, "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class _TimestepEmb(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.timestep_embedder = _TwoLinear(FREQ_DIM, dim, jax.nn.silu, param_dtype=F32, rngs=rngs)


class _AdaLayerNormSingle(nnx.Module):
    def __init__(self, dim, *, param_dtype, rngs):
        self.emb = _TimestepEmb(dim, rngs=rngs)
        self.linear = Linear(dim, 6 * dim, axes=("embed", "modulation"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, timestep):  # (B,) 1 - sigma -> modulation (B, 6, D), embedded timestep (B, D), fp32
        temb = self.emb.timestep_embedder(timestep_embedding(timestep * TIME_STEP_RESCALE, FREQ_DIM)).astype(F32)
        mod = self.linear(jax.nn.silu(temb)).astype(F32)
        return rearrange(mod, "b (six d) -> b six d", six=6), temb


class StepVideoModel(BaseDiT):
    """StepVideo text-to-video DiT; the call and the pipeline facts are in the module docstring."""

    config_class = StepVideoConfig
    _supported_attention_backends = DENSE_BACKENDS | {AttentionBackend.SAGE_ATTN}
    extra_inputs = frozenset({"encoder_hidden_states_2", "encoder_attention_mask"})

    def __init__(self, config: StepVideoConfig, *, rngs: nnx.Rngs):
        super().__init__(config)
        cfg = config.arch_config
        dtype = to_dtype(config.precision)
        dim, backend = cfg.hidden_size, self.attention_backend
        self.pos_embed = _PatchEmbed(cfg.in_channels, dim, cfg.patch_size, param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return StepVideoTransformerBlock(cfg, dtype, backend, rngs)

        self.transformer_blocks = make_blocks(rngs)
        affine = cfg.norm_elementwise_affine
        self.norm_out = LayerNorm(dim, cfg.norm_eps, affine=affine, rngs=rngs)
        self.scale_shift_table = make_param(rngs, nnx.initializers.normal(dim**-0.5), (2, dim), F32, (None, "embed"))
        self.proj_out = Linear(dim, cfg.patch_size**2 * cfg.out_channels, axes=("embed", None), param_dtype=dtype,
                               rngs=rngs)
        self.adaln_single = _AdaLayerNormSingle(dim, param_dtype=dtype, rngs=rngs)
        self.clip_projection = (None if cfg.clip_dim is None else
                                Linear(cfg.clip_dim, dim, axes=(None, "embed"), param_dtype=dtype, rngs=rngs))
        self.caption_norm = LayerNorm(cfg.caption_dim, cfg.norm_eps, affine=affine, rngs=rngs)
        self.caption_projection = _TwoLinear(cfg.caption_dim, dim, gelu_tanh, param_dtype=dtype, rngs=rngs)

    def __call__(
        self,
        hidden_states: jax.Array,  # (B, C, F, H, W)
        encoder_hidden_states: jax.Array,  # (B, Lt, caption_dim): Step-LLM states
        timestep: jax.Array,  # () or (B,), in [0, 1]: 1 - sigma (0 = pure noise)
        encoder_hidden_states_image: jax.Array | None = None,  # no image branch: must stay None
        guidance: jax.Array | None = None,  # no guidance embedding: must stay None
        **kwargs,  # encoder_hidden_states_2 (B, Lc, clip_dim); encoder_attention_mask (B, Lc + Lt) or (B, Lt)
    ) -> jax.Array:  # (B, C_out, F, H, W)
        self.check_extra_inputs(kwargs)
        name = type(self).__name__
        if encoder_hidden_states_image is not None or guidance is not None:
            raise TypeError(f"{name} takes no image embedding and no guidance (classifier-free guidance is the "
                            "pipeline's)")
        clip, mask = self._check_inputs(hidden_states, encoder_hidden_states, timestep,
                                        kwargs.get("encoder_hidden_states_2"), kwargs.get("encoder_attention_mask"))
        timestep = jnp.broadcast_to(jnp.asarray(timestep, F32), (hidden_states.shape[0],))
        with mesh_scope(params_mesh(nnx.state(self))):  # loaded on a mesh: split the work on it too
            return compiled_call(_forward, self, hidden_states, encoder_hidden_states, clip, timestep, mask)

    def _check_inputs(self, x, text, timestep, clip, mask):
        cfg, name = self.config.arch_config, type(self).__name__
        if x.ndim != 5:
            raise ValueError(f"{name}: hidden_states {x.shape} must be (B, C, F, H, W)")
        B, C, _, H, W = x.shape
        p = cfg.patch_size
        if C != cfg.in_channels or H % p or W % p:
            raise ValueError(f"{name}: latents {x.shape} need {cfg.in_channels} channels and H, W divisible by {p}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.caption_dim:
            raise ValueError(f"{name}: encoder_hidden_states {text.shape}: expected ({B}, Lt, {cfg.caption_dim}) "
                             "(the Step-LLM states)")
        if clip is not None and cfg.clip_dim is None:
            raise ValueError(f"{name}: encoder_hidden_states_2 given, but this checkpoint has no clip_projection "
                             "(caption_channels is one int)")
        if clip is not None and (clip.ndim != 3 or clip.shape[0] != B or clip.shape[2] != cfg.clip_dim):
            raise ValueError(f"{name}: encoder_hidden_states_2 {clip.shape}: expected ({B}, Lc, {cfg.clip_dim}) "
                             "(the CLIP/BERT states)")
        if jnp.shape(timestep) not in ((), (B,)):
            raise ValueError(f"{name}: timestep of shape {jnp.shape(timestep)}: expected a scalar or ({B},)")
        Lc, Lt = (0 if clip is None else clip.shape[1]), text.shape[1]
        if mask is None:
            mask = jnp.ones((B, Lc + Lt), jnp.int32)
        elif tuple(mask.shape) == (B, Lt) and Lc:  # the LLM mask alone: the CLIP tokens in front are all real
            mask = jnp.concatenate([jnp.ones((B, Lc), jnp.int32), jnp.asarray(mask).astype(jnp.int32)], axis=1)
        elif tuple(mask.shape) != (B, Lc + Lt):
            raise ValueError(f"{name}: encoder_attention_mask {tuple(mask.shape)} must be ({B}, {Lc + Lt}) (CLIP "
                             f"then LLM tokens) or the LLM mask ({B}, {Lt})")
        mask = jnp.asarray(mask).astype(jnp.int32)
        if not isinstance(mask, jax.core.Tracer) and bool((mask.sum(-1) == 0).any()):
            raise ValueError(f"{name}: encoder_attention_mask has a row with no text token to attend")
        return clip, mask

    def forward(self, hidden_states, encoder_hidden_states, clip, timestep, mask):
        """The traced forward (``__call__`` runs it under jit with the configured matmul precision)."""
        cfg = self.config.arch_config
        p = cfg.patch_size
        B, _, F, H, W = hidden_states.shape
        grid = (F, H // p, W // p)
        cos, sin = rope_3d_tables(cfg.attention_head_dim, grid, max(grid), ROPE_THETA, cfg.rope_axes_dim)
        # tokens in (frame, row, column) order, each patch (p, q, c) as the Conv2d kernel flattens
        patches = rearrange(hidden_states, "b c f (h p) (w q) -> b (f h w) (p q c)", p=p, q=p)
        L = patches.shape[1]
        Lp = pad_length(L)  # tokens over the sequence mesh axis: padded, the padded keys masked, cut at the end
        patches, cos, sin = (jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, Lp - L), (0, 0)]) for a in (patches, cos, sin))
        x = constrain(self.pos_embed.proj(constrain(patches, ("batch", "length", None))), ("batch", "length", "embed"))
        cos, sin = constrain(cos, ("length", None)), constrain(sin, ("length", None))
        t_mod, temb = self.adaln_single(timestep)
        text = self.caption_projection(self.caption_norm(encoder_hidden_states))
        if clip is not None:
            text = jnp.concatenate([self.clip_projection(clip).astype(text.dtype), text], axis=1)
        text = constrain(text, ("batch", "text_length", "embed"))
        text_mask = jnp.arange(text.shape[1])[None, :] < mask.sum(-1)[:, None]  # the original: a length per row
        kv_mask = padding_mask(B, L, Lp)

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None, None, None, None, None), out_axes=nnx.Carry)
        def run(x, block, text, text_mask, t_mod, cos, sin, kv_mask):
            return block(x, text, text_mask, t_mod, cos, sin, kv_mask)

        x = run(x, self.transformer_blocks, text, text_mask, t_mod, cos, sin, kv_mask)
        mod = self.scale_shift_table[...][None] + temb[:, None]  # (B, 2, D): shift, scale
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        x = (self.norm_out(x.astype(F32)) * (1 + scale) + shift).astype(x.dtype)
        x = self.proj_out(x)[:, :L]
        return rearrange(x, "b (f h w) (p q c) -> b c f (h p) (w q)", f=grid[0], h=grid[1], w=grid[2], p=p, q=p)


def _forward(model: StepVideoModel, *args):
    return model.forward(*args)


EntryClass = StepVideoModel
