"""The LLaMA decoder stack as a text encoder (``LlamaModel``; HunyuanVideo's ``text_encoder``) in Flax NNX.

Attributes carry the Transformers names (``embed_tokens``, ``layers.N.self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``norm``), so ``LlamaModel`` checkpoints load through the
identity mapping (``LlamaForCausalLM``'s lose their ``model.`` prefix and ``lm_head``); the layers are built
stacked (``nnx.vmap``) under ``layers`` and run with ``nnx.scan``.

Kept from the original: pre-norm residual layers with RMS norms (variance in fp32, normalised value cast back
before the weight multiplies it), rotary position embeddings on queries and keys (positions 0..L-1, rotate-half
layout, ``rope_theta``), grouped-query attention (each key/value head serves ``num_attention_heads //
num_key_value_heads`` consecutive query heads) scaled by 1/sqrt(head_dim) under a causal mask AND the padding mask
over keys, softmax in fp32, and a SwiGLU MLP ``down(act(gate x) * up x)``. ``hidden_states`` is the embeddings
followed by every layer's output, the last one normed (Transformers' collection), so HunyuanVideo's skip-layer
state ``hidden_states[-(skip + 1)]`` is the output of layer ``num_hidden_layers - skip`` (1-based).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.configs.models.encoders.llama import LlamaArchConfig, LlamaEncoderConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, TextEncoder, check_attention_backend
from fastvideo_jax.models.encoders.t5 import ACTIVATIONS, Embedding, T5LayerNorm, split
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.layers.linear import Linear
from fastvideo_jax.parallel.activations import constrain
from fastvideo_jax.parallel.rules import TEXT_ENCODER_ACTIVATION_RULES, TEXT_ENCODER_RULES

F32 = jnp.float32
HIDDEN = ("batch", "length", "embed")  # (B, L, D) between layers
_MASKED = float(jnp.finfo(F32).min)
_LOOKUP_RULES = {"batch": TEXT_ENCODER_ACTIVATION_RULES["batch"], "embed": TEXT_ENCODER_RULES["embed"]}

# LLaMA's RMS norm is T5's: x * rsqrt(mean(x^2) + eps) in fp32, cast to the weight dtype, times the weight.
LlamaRMSNorm = T5LayerNorm


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (L, head_dim) fp32, for positions 0..L-1: frequencies theta^(-2i/head_dim), each used for
    dim i and dim i + head_dim/2 (the rotate-half layout)."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (B, L, ..., E) by the (L, E) tables, in fp32; the result has ``x``'s dtype."""
    shape = (1, cos.shape[0]) + (1,) * (x.ndim - 3) + (cos.shape[1],)
    xf = x.astype(F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos.reshape(shape) + rotated * sin.reshape(shape)).astype(x.dtype)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE; queries are held as (B, L, KV heads, group, E)."""

    def __init__(self, cfg: LlamaArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d, e, n, kv = cfg.hidden_size, cfg.head_size, cfg.num_attention_heads, cfg.kv_heads
        self.kv_heads, self.groups, self.head_dim = kv, n // kv, e

        def proj(d_in, d_out, axes):
            return Linear(d_in, d_out, axes=axes, use_bias=cfg.attention_bias, param_dtype=param_dtype, rngs=rngs)

        self.q_proj = proj(d, n * e, ("embed", "heads"))
        self.k_proj = proj(d, kv * e, ("embed", "kv_heads"))
        self.v_proj = proj(d, kv * e, ("embed", "kv_heads"))
        self.o_proj = proj(n * e, d, ("heads", "embed"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, L, D); cos/sin (L, E); mask (B|1, Lq, Lk) bool, True = attend."""
        kv, g = self.kv_heads, self.groups
        q = rearrange(self.q_proj(x), "b l (k g e) -> b l k g e", k=kv, g=g)
        k = rearrange(self.k_proj(x), "b l (k e) -> b l k e", k=kv)
        v = rearrange(self.v_proj(x), "b l (k e) -> b l k e", k=kv)
        q = split(apply_rope(q, cos, sin), ("batch", "length", "kv_heads", None, None))  # this device's queries
        k = split(apply_rope(k, cos, sin), ("batch", None, "kv_heads", None))  # every key and value
        v = split(v, ("batch", None, "kv_heads", None))
        logits = jnp.einsum("bqkge,bske->bkgqs", q, k, preferred_element_type=F32) * self.head_dim**-0.5
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, _MASKED), axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bske->bqkge", probs, v, preferred_element_type=F32).astype(v.dtype)
        return self.o_proj(rearrange(out, "b l k g e -> b l (k g e)"))


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down_proj(act(gate_proj x) * up_proj x)``."""

    def __init__(self, cfg: LlamaArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d, ff = cfg.hidden_size, cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.hidden_act]

        def proj(d_in, d_out, axes):
            return Linear(d_in, d_out, axes=axes, use_bias=cfg.mlp_bias, param_dtype=param_dtype, rngs=rngs)

        self.gate_proj = proj(d, ff, ("embed", "mlp"))
        self.up_proj = proj(d, ff, ("embed", "mlp"))
        self.down_proj = proj(ff, d, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(split(self.act(self.gate_proj(x)) * self.up_proj(x), ("batch", "length", "mlp")))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm residual attention, then pre-norm residual MLP."""

    def __init__(self, cfg: LlamaArchConfig, *, param_dtype, rngs: nnx.Rngs):
        def norm():
            return LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

        self.self_attn = LlamaAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp = LlamaMLP(cfg, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _dtype(model_cls: type, config: LlamaEncoderConfig) -> jnp.dtype:
    dtype = to_dtype(config.precision)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"{model_cls.__name__}: precision {config.precision!r} unsupported; use fp16, bf16 or fp32")
    return dtype


class LlamaModel(TextEncoder):
    """LLaMA's decoder stack without the LM head (HunyuanVideo's ``text_encoder``, llava-llama-3-8b)."""

    config_class = LlamaEncoderConfig
    # The causal + padding mask runs as its own einsum (as CLIP's text tower).
    _supported_attention_backends = (AttentionBackend.REFERENCE, AttentionBackend.TORCH_SDPA)

    def __init__(self, config: LlamaEncoderConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        dtype = _dtype(type(self), config)
        check_attention_backend(type(self), config)
        self.config = config
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), param_dtype=dtype,
                                      rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return LlamaDecoderLayer(cfg, param_dtype=dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> BaseEncoderOutput:
        """Token ids (B, L); ``attention_mask`` (B, L), 1 = token, 0 = pad (None: causal mask only).

        ``last_hidden_state`` (B, L, D), normed. ``hidden_states``: the embeddings, the outputs of layers
        1..N-1, then the final (normed) state. ``attention_mask`` is the mask given.
        """
        self.check_tokens(input_ids, attention_mask)
        return compiled_call(_forward, self, input_ids, attention_mask, output_hidden_states=output_hidden_states)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None, output_hidden_states: bool = False
                ) -> BaseEncoderOutput:
        """The traced forward (``__call__`` runs it under jit with the configured matmul precision)."""
        cfg, length = self.config.arch_config, input_ids.shape[1]
        # Lookup output split as the table's model dim, then over prompts (one all-to-all each; see t5.py).
        x = constrain(self.embed_tokens(input_ids), (None, None, "embed"), TEXT_ENCODER_RULES)
        x = split(constrain(x, ("batch", None, "embed"), _LOOKUP_RULES), HIDDEN)
        cos, sin = (jnp.asarray(t) for t in rope_tables(length, cfg.head_size, cfg.rope_base))
        pos = jnp.arange(length)
        mask = (pos[None, :] <= pos[:, None])[None]  # (1, Lq, Lk) causal
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]  # and no padded key

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(h, layer):
            h = split(layer(h, cos, sin, mask), HIDDEN)
            return h, (h if output_hidden_states else None)

        h, per_layer = run(x, self.layers)
        last = split(self.norm(h), HIDDEN)
        hidden = None
        if output_hidden_states:
            hidden = (x, *(per_layer[i] for i in range(per_layer.shape[0] - 1)), last)
        return BaseEncoderOutput(last_hidden_state=last, hidden_states=hidden, attention_mask=attention_mask)


def _forward(model: LlamaModel, input_ids: jax.Array, attention_mask: jax.Array | None,
             output_hidden_states: bool = False) -> BaseEncoderOutput:
    return model.forward(input_ids, attention_mask, output_hidden_states)


EntryClass = [LlamaModel]
