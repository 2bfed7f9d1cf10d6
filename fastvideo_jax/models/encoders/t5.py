"""T5 and UMT5 text encoders (``T5EncoderModel``, ``UMT5EncoderModel``) in Flax NNX.

Attributes carry the Transformers names (``shared``, ``encoder.block.N.layer.0.SelfAttention.q``,
``layer.1.DenseReluDense.wi_0``, ``encoder.final_layer_norm``), so checkpoints load through the identity mapping;
the blocks are built stacked (``nnx.vmap``) under ``encoder.block`` and run with ``nnx.scan``.

T5 specifics kept from the original: RMS layer norm without mean subtraction (variance in fp32), attention
logits not scaled by 1/sqrt(E), a learned bias over bidirectional log-spaced relative-position buckets (per
block in UMT5; block 0's table shared by all layers in T5), an additive large-negative padding mask, and a
gated-GELU (tanh approximation, ``gelu_new``) feed-forward. Precision "fp32" (Wan's choice) or "bf16".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.configs.models.encoders.t5 import T5ArchConfig, T5EncoderConfig, UMT5EncoderConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, TextEncoder, check_attention_backend
from fastvideo_jax.models.layers.activations import gelu_exact, gelu_tanh
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.layers.linear import Linear, make_param
from fastvideo_jax.parallel.activations import constrain
from fastvideo_jax.parallel.rules import TEXT_ENCODER_ACTIVATION_RULES, TEXT_ENCODER_RULES

F32 = jnp.float32
HIDDEN = ("batch", "length", "embed")  # (B, L, D) between layers
_LOOKUP_RULES = {"batch": TEXT_ENCODER_ACTIVATION_RULES["batch"], "embed": TEXT_ENCODER_RULES["embed"]}


def split(x: jax.Array, axes: tuple) -> jax.Array:
    """``x`` split over the mesh in scope by its logical ``axes`` (text-encoder rules; no-op without a mesh)."""
    return constrain(x, axes, TEXT_ENCODER_ACTIVATION_RULES)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": gelu_exact,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every offset ``key - query`` in ``[-(length-1), length-1]``, bidirectional (encoder) T5 rule.

    Half the buckets hold positive offsets; within each half, offsets below ``max_exact`` get their own bucket
    and larger ones share log-spaced buckets up to ``max_distance``. The log is taken in float32, as the
    original does, so offsets that land exactly on a bucket edge fall on the same side. Returns (2*length-1,).
    """
    offsets = np.arange(-(length - 1), length, dtype=np.int64)
    half = num_buckets // 2
    side = (offsets > 0).astype(np.int64) * half
    distance = np.abs(offsets)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(distance < max_exact, 0, ratio).astype(np.int64)  # trunc toward zero, as .long()
    large = np.minimum(large, half - 1)
    return (side + np.where(distance < max_exact, distance, large)).astype(np.int32)


def relative_position_bias(table: jax.Array, buckets: np.ndarray, length: int) -> jax.Array:
    """(1, N, L, L) fp32 bias from a (num_buckets, N) table and the per-offset buckets of ``length`` tokens."""
    per_offset = jnp.take(table, jnp.asarray(buckets), axis=0).astype(F32)  # (2L-1, N)
    pos = jnp.arange(length)
    index = pos[None, :] - pos[:, None] + (length - 1)  # (Lq, Lk): key - query, shifted to >= 0
    return rearrange(jnp.take(per_offset, index, axis=0), "q k n -> 1 n q k")


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """(B, L) mask (1 = token) -> (B, 1, 1, L) additive fp32 bias: 0 for tokens, the most negative float for pads."""
    keep = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(F32).min).astype(F32)


class Embedding(nnx.Module):
    """A lookup table ``embedding`` (num, dim) with logical axes."""

    def __init__(self, num: int, dim: int, *, axes: tuple[str | None, str | None], param_dtype, rngs: nnx.Rngs):
        self.embedding = make_param(rngs, nnx.initializers.normal(1.0), (num, dim), param_dtype, axes)

    def __call__(self, ids: jax.Array) -> jax.Array:  # (...,) int -> (..., dim)
        return jnp.take(self.embedding[...], ids, axis=0)


def _bias_table(cfg: T5ArchConfig, param_dtype, rngs: nnx.Rngs) -> Embedding:
    """The (num_buckets, N) relative-position bias table."""
    return Embedding(cfg.relative_attention_num_buckets, cfg.num_heads, axes=(None, "heads"), param_dtype=param_dtype,
                     rngs=rngs)


class T5LayerNorm(nnx.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) in fp32, cast to the weight dtype, times the weight. No bias."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(F32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        return scale * y.astype(scale.dtype)


class T5Attention(nnx.Module):
    """Multi-head self-attention with unscaled logits plus a position bias and the padding bias."""

    def __init__(self, cfg: T5ArchConfig, has_relative_bias: bool, *, param_dtype, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.inner_dim
        self.num_heads = cfg.num_heads
        self.q = Linear(d, inner, axes=("embed", "heads"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.k = Linear(d, inner, axes=("embed", "heads"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.v = Linear(d, inner, axes=("embed", "heads"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.o = Linear(inner, d, axes=("heads", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.relative_attention_bias = _bias_table(cfg, param_dtype, rngs) if has_relative_bias else None

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:  # x (B, L, D), bias (B|1, N, L, L) fp32
        def heads(t):
            return rearrange(t, "b l (n e) -> b l n e", n=self.num_heads)

        q = split(heads(self.q(x)), ("batch", "length", "heads", None))  # this device's queries
        k = split(heads(self.k(x)), ("batch", None, "heads", None))  # every key and value
        v = split(heads(self.v(x)), ("batch", None, "heads", None))
        logits = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=F32) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bkne->bqne", probs, v, preferred_element_type=F32).astype(v.dtype)
        return self.o(rearrange(out, "b l n e -> b l (n e)"))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5ArchConfig, has_relative_bias: bool, *, param_dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_relative_bias, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseActDense(nnx.Module):
    """Feed-forward: gated ``wo(act(wi_0 x) * wi_1 x)`` or plain ``wo(act(wi x))``."""

    def __init__(self, cfg: T5ArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d, ff = cfg.d_model, cfg.d_ff
        self.act = ACTIVATIONS[cfg.dense_act_fn]
        gated = cfg.is_gated_act

        def linear_in():
            return Linear(d, ff, axes=("embed", "mlp"), use_bias=False, param_dtype=param_dtype, rngs=rngs)

        self.wi = None if gated else linear_in()
        self.wi_0 = linear_in() if gated else None
        self.wi_1 = linear_in() if gated else None
        self.wo = Linear(ff, d, axes=("mlp", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, D) -> (B, L, D)
        if self.wi is not None:
            return self.wo(split(self.act(self.wi(x)), ("batch", "length", "mlp")))
        return self.wo(split(self.act(self.wi_0(x)) * self.wi_1(x), ("batch", "length", "mlp")))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5ArchConfig, *, param_dtype, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseActDense(cfg, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    """``layer[0]``: pre-norm self-attention, ``layer[1]``: pre-norm feed-forward, both residual."""

    def __init__(self, cfg: T5ArchConfig, *, param_dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(cfg, cfg.per_layer_relative_bias, param_dtype=param_dtype, rngs=rngs),
            T5LayerFF(cfg, param_dtype=param_dtype, rngs=rngs),
        ])

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    """Scanned blocks, then the final norm. T5 keeps its single relative-bias table here, outside the scan."""

    def __init__(self, cfg: T5ArchConfig, *, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return T5Block(cfg, param_dtype=param_dtype, rngs=rngs)

        self.block = make_blocks(rngs)
        shared = not cfg.per_layer_relative_bias
        self.relative_attention_bias = _bias_table(cfg, param_dtype, rngs) if shared else None
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array, collect: bool = False):
        """x (B, L, D), mask (B, L) -> (final hidden (B, L, D), every block's output stacked (N, B, L, D) when
        ``collect``, else None)."""
        cfg, length = self.cfg, x.shape[1]
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        mask_bias = padding_bias(attention_mask)  # (B, 1, 1, L)

        def bias_of(table) -> jax.Array:  # (B, N, Lq, Lk) fp32, this device's queries and heads
            return split(relative_position_bias(table, buckets, length) + mask_bias, ("batch", "heads", "length", None))

        shared = None if self.relative_attention_bias is None else bias_of(self.relative_attention_bias.embedding[...])

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run_blocks(h, block):
            table = block.layer[0].SelfAttention.relative_attention_bias
            h = split(block(h, shared if table is None else bias_of(table.embedding[...])), HIDDEN)
            return h, (h if collect else None)

        h, per_block = run_blocks(split(x, HIDDEN), self.block)
        return split(self.final_layer_norm(h), HIDDEN), per_block


class _T5EncoderBase(TextEncoder):
    config_class: type = T5EncoderConfig
    # Position-biased attention (a learned bias on unscaled logits) runs as its own einsum.
    _supported_attention_backends = (AttentionBackend.REFERENCE, AttentionBackend.TORCH_SDPA)

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        if cfg.per_layer_relative_bias != self.config_class().arch_config.per_layer_relative_bias:
            raise ValueError(f"{type(self).__name__}: arch config {type(cfg).__name__} is for the other T5 variant")
        dtype = to_dtype(config.precision)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"{type(self).__name__}: precision {config.precision!r} unsupported (T5 overflows in "
                             "fp16); use 'fp32' or 'bf16'")
        check_attention_backend(type(self), config)
        self.config = config
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), param_dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> BaseEncoderOutput:
        """Token ids (B, L); ``attention_mask`` (B, L), 1 = token, 0 = pad (None: all tokens).

        ``last_hidden_state`` (B, L, D). ``hidden_states``, as Transformers collects them: the embeddings, the
        outputs of blocks 1..N-1, then the final (normed) state. ``attention_mask`` is the mask used.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
        return compiled_call(_forward, self, input_ids, attention_mask, output_hidden_states=output_hidden_states)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array, output_hidden_states: bool = False
                ) -> BaseEncoderOutput:
        """The traced forward (``__call__`` runs it under jit with the configured matmul precision)."""
        # The lookup leaves the model dim split as the table's is; then prompts, then tokens, take their axes
        # from it (one all-to-all each: XLA will not move two dims in one step, it would replicate instead).
        x = constrain(self.shared(input_ids), (None, None, "embed"), TEXT_ENCODER_RULES)
        x = constrain(x, ("batch", None, "embed"), _LOOKUP_RULES)
        last, per_block = self.encoder(x, attention_mask, collect=output_hidden_states)
        hidden = None
        if output_hidden_states:
            hidden = (x, *(per_block[i] for i in range(per_block.shape[0] - 1)), last)
        return BaseEncoderOutput(last_hidden_state=last, hidden_states=hidden, attention_mask=attention_mask)


def _forward(model: _T5EncoderBase, input_ids: jax.Array, attention_mask: jax.Array,
             output_hidden_states: bool = False) -> BaseEncoderOutput:
    return model.forward(input_ids, attention_mask, output_hidden_states)


class UMT5EncoderModel(_T5EncoderBase):
    """UMT5 encoder (Wan's text encoder): a relative-position bias table in every block."""

    config_class = UMT5EncoderConfig


class T5EncoderModel(_T5EncoderBase):
    """T5 encoder: one relative-position bias table (block 0's) shared by all layers."""

    config_class = T5EncoderConfig


EntryClass = [UMT5EncoderModel, T5EncoderModel]
