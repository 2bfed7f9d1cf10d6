"""CLIP text and vision encoders (``CLIPTextModel``, ``CLIPVisionModel`` and their ``...WithProjection``) in NNX.

Attributes carry the Transformers names (``embeddings.token_embedding``, ``encoder.layers.N.self_attn.q_proj``,
``mlp.fc1``, ``layer_norm1``, ``final_layer_norm``, ``pre_layrnorm``, ``post_layernorm``), so checkpoints load
through the identity mapping once the ``text_model.`` / ``vision_model.`` prefix is stripped; the layers are built
stacked (``nnx.vmap``) under ``encoder.layers`` and run with ``nnx.scan``.

Kept from the original: pre-norm layers (LayerNorm in fp32), attention scaled by 1/sqrt(E). Text: a causal mask
AND the padding mask over keys; ``final_layer_norm`` on every position; pooled output at each row's first
``eos_token_id`` (or, for the legacy ``eos_token_id == 2``, at its largest token id). Vision: a class token before
the patches, learned position embeddings, ``pre_layrnorm`` before the layers, ``post_layernorm`` on the pooled
class token only (``last_hidden_state`` is not normed). ``hidden_states`` is the first layer's input followed by
every layer's output, so ``hidden_states[-2]`` is the penultimate layer (what Wan I2V feeds its DiT). The
projection models return the projected pooled vector (``text_embeds`` / ``image_embeds``) as ``pooler_output``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend, attention
from fastvideo_jax.configs.models.encoders.clip import (
    CLIPTextArchConfig,
    CLIPTextEncoderConfig,
    CLIPTextProjectionEncoderConfig,
    CLIPVisionArchConfig,
    CLIPVisionEncoderConfig,
    CLIPVisionProjectionEncoderConfig,
)
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, ImageEncoder, TextEncoder, check_attention_backend
from fastvideo_jax.models.encoders.t5 import Embedding, split
from fastvideo_jax.models.layers.activations import gelu_exact, gelu_tanh, quick_gelu
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.layers.linear import Linear, make_param
from fastvideo_jax.models.layers.norms import LayerNorm

F32 = jnp.float32
HIDDEN = ("batch", "length", "embed")  # (B, L, D) between layers
_MASKED = float(jnp.finfo(F32).min)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
# Dense backends of ``fastvideo_jax.attention.attention`` (the vision tower has no mask); the text tower's
# causal + padding mask runs as its own einsum.
DENSE_BACKENDS = (AttentionBackend.REFERENCE, AttentionBackend.TORCH_SDPA, AttentionBackend.CUDNN,
                  AttentionBackend.FLASH_ATTN, AttentionBackend.SPLASH_TPU, AttentionBackend.PALLAS_GPU_TRITON,
                  AttentionBackend.PALLAS_GPU_MOSAIC, AttentionBackend.TOKAMAX)
MASKED_BACKENDS = (AttentionBackend.REFERENCE, AttentionBackend.TORCH_SDPA)  # the own-einsum path


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biases; ``mask`` (B, 1|Lq, Lk) bool (text) or None (vision: dense op)."""

    def __init__(self, dim: int, heads: int, backend: AttentionBackend | None, *, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.backend = heads, backend

        def proj(axes):
            return Linear(dim, dim, axes=axes, param_dtype=param_dtype, rngs=rngs)

        self.k_proj = proj(("embed", "heads"))
        self.v_proj = proj(("embed", "heads"))
        self.q_proj = proj(("embed", "heads"))
        self.out_proj = proj(("heads", "embed"))

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # (B, L, D) -> (B, L, D)
        def heads(t, axes):
            return split(rearrange(t, "b l (n e) -> b l n e", n=self.num_heads), axes)

        q = heads(self.q_proj(x), ("batch", "length", "heads", None))  # this device's queries
        k = heads(self.k_proj(x), ("batch", None, "heads", None))  # every key and value
        v = heads(self.v_proj(x), ("batch", None, "heads", None))
        if mask is None:
            out = attention(q, k, v, backend=self.backend)
        else:
            logits = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=F32) * q.shape[-1] ** -0.5
            probs = jax.nn.softmax(jnp.where(mask[:, None], logits, _MASKED), axis=-1).astype(v.dtype)
            out = jnp.einsum("bnqk,bkne->bqne", probs, v, preferred_element_type=F32).astype(v.dtype)
        return self.out_proj(rearrange(out, "b l n e -> b l (n e)"))


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, param_dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[act]
        self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(split(self.act(self.fc1(x)), ("batch", "length", "mlp")))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm residual self-attention, then pre-norm residual MLP."""

    def __init__(self, cfg, backend, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size

        def norm():
            return LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, backend, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = norm()
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = norm()

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The scanned layers; returns the last output and, when ``collect``, every layer's output (N, B, L, D)."""

    def __init__(self, cfg, backend, *, param_dtype, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return CLIPEncoderLayer(cfg, backend, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, collect: bool):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(h, layer):
            h = split(layer(h, mask), HIDDEN)
            return h, (h if collect else None)

        return run(split(x, HIDDEN), self.layers)


def _hidden_tuple(first: jax.Array, per_layer: jax.Array | None) -> tuple[jax.Array, ...] | None:
    return None if per_layer is None else (first, *(per_layer[i] for i in range(per_layer.shape[0])))


def _dtype(model_cls: type, config) -> jnp.dtype:
    dtype = to_dtype(config.precision)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"{model_cls.__name__}: precision {config.precision!r} unsupported; use fp32, bf16 or fp16")
    return dtype


# ----------------------------------------------------------------------------------------------- text tower


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.token_embedding = Embedding(cfg.vocab_size, d, axes=("vocab", "embed"), param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = Embedding(cfg.max_position_embeddings, d, axes=(None, "embed"),
                                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:  # (B, L) -> (B, L, D)
        positions = self.position_embedding.embedding[...][: ids.shape[1]]
        return self.token_embedding(ids) + positions[None]


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B,) position each row pools at: its first ``eos_token_id`` (0 if none, as argmax gives), or for the
    legacy ``eos_token_id == 2`` its largest token id's first position (Transformers' rule for both)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(TextEncoder):
    """CLIP's text tower (HunyuanVideo's ``text_encoder_2``: its pooled output)."""

    config_class = CLIPTextEncoderConfig
    _supported_attention_backends = MASKED_BACKENDS
    with_projection = False

    def __init__(self, config: CLIPTextEncoderConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        dtype = _dtype(type(self), config)
        check_attention_backend(type(self), config)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(cfg, param_dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, None, param_dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=dtype, rngs=rngs)
        self.text_projection = (Linear(cfg.hidden_size, cfg.projection_dim, axes=("embed", None), use_bias=False,
                                       param_dtype=dtype, rngs=rngs) if self.with_projection else None)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> BaseEncoderOutput:
        """Token ids (B, L), L <= max_position_embeddings; ``attention_mask`` (B, L), 1 = token, 0 = pad."""
        self.check_tokens(input_ids, attention_mask, self.config.arch_config.max_position_embeddings)
        return compiled_call(_text_forward, self, input_ids, attention_mask, output_hidden_states=output_hidden_states)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None, output_hidden_states: bool = False
                ) -> BaseEncoderOutput:
        cfg, length = self.config.arch_config, input_ids.shape[1]
        x = self.embeddings(input_ids)
        pos = jnp.arange(length)
        mask = (pos[None, :] <= pos[:, None])[None]  # (1, Lq, Lk) causal
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]  # and no padded key
        last, per_layer = self.encoder(x, mask, output_hidden_states)
        last = self.final_layer_norm(last)
        pooled = last[jnp.arange(last.shape[0]), pooled_positions(input_ids, cfg.eos_token_id)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return BaseEncoderOutput(last_hidden_state=last, hidden_states=_hidden_tuple(x, per_layer),
                                 attention_mask=attention_mask, pooler_output=pooled)


def _text_forward(model, input_ids, attention_mask, output_hidden_states=False):
    return model.forward(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(CLIPTextModel):
    """The text tower and ``text_projection``: ``pooler_output`` is the projected pooled vector."""

    config_class = CLIPTextProjectionEncoderConfig
    with_projection = True


# --------------------------------------------------------------------------------------------- vision tower


class PatchConv(nnx.Module):
    """The bias-free patch conv's ``kernel`` (p, p, C, D) (Flax conv layout; the checkpoint's is (D, C, p, p))."""

    def __init__(self, p: int, c: int, d: int, *, param_dtype, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, nnx.initializers.lecun_normal(), (p, p, c, d), param_dtype,
                                 (None, None, "conv_in", "embed"))


class CLIPVisionEmbeddings(nnx.Module):
    """Class token + non-overlapping patches (a strided conv without bias, as one matmul) + position table."""

    def __init__(self, cfg: CLIPVisionArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.patch_size, self.grid = p, cfg.grid
        self.class_embedding = make_param(rngs, nnx.initializers.normal(1.0), (d,), param_dtype, ("embed",))
        self.patch_embedding = PatchConv(p, c, d, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = Embedding(cfg.num_positions, d, axes=(None, "embed"), param_dtype=param_dtype,
                                            rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # (B, C, H, W) -> (B, 1 + grid^2, D)
        kernel = self.patch_embedding.kernel[...]
        g, p = self.grid, self.patch_size
        x = pixel_values[:, :, : g * p, : g * p].astype(kernel.dtype)  # a remainder is dropped, as the conv does
        patches = rearrange(x, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p)
        w = kernel.reshape(-1, kernel.shape[-1])
        x = jnp.dot(patches, w, preferred_element_type=F32).astype(kernel.dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.position_embedding.embedding[...][None].astype(x.dtype)


class CLIPVisionModel(ImageEncoder):
    """CLIP's vision tower (Wan2.1 I2V's ``image_encoder``: its penultimate hidden state)."""

    config_class = CLIPVisionEncoderConfig
    _supported_attention_backends = DENSE_BACKENDS
    with_projection = False

    def __init__(self, config: CLIPVisionEncoderConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        dtype = _dtype(type(self), config)
        backend = check_attention_backend(type(self), config)
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(cfg, param_dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, backend, param_dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=dtype, rngs=rngs)
        self.visual_projection = (Linear(cfg.hidden_size, cfg.projection_dim, axes=("embed", None), use_bias=False,
                                         param_dtype=dtype, rngs=rngs) if self.with_projection else None)

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> BaseEncoderOutput:
        """``pixel_values`` (B, C, image_size, image_size), normalised as the image processor does."""
        cfg = self.config.arch_config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        shape = tuple(jnp.shape(pixel_values))
        if len(shape) != 4 or shape[1:] != want:
            raise UserError(f"{type(self).__name__}: pixel_values must be (batch, {', '.join(map(str, want))}), got "
                            f"{shape} (resize with the pipeline's image processor)")
        return compiled_call(_vision_forward, self, pixel_values, output_hidden_states=output_hidden_states)

    def forward(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> BaseEncoderOutput:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        last, per_layer = self.encoder(x, None, output_hidden_states)
        pooled = self.post_layernorm(last[:, 0])
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)
        return BaseEncoderOutput(last_hidden_state=last, hidden_states=_hidden_tuple(x, per_layer),
                                 pooler_output=pooled)


def _vision_forward(model, pixel_values, output_hidden_states=False):
    return model.forward(pixel_values, output_hidden_states)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """The vision tower and ``visual_projection``: ``pooler_output`` is the projected pooled vector."""

    config_class = CLIPVisionProjectionEncoderConfig
    with_projection = True


EntryClass = [CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel, CLIPVisionModelWithProjection]
