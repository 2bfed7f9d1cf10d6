"""Step-LLM (StepVideo's ``step_llm``, the ``Step1Model`` decoder stack) as a text encoder in Flax NNX.

Attributes carry the checkpoint's names (``tok_embeddings.word_embeddings``, ``transformer.layers.N.attention.wqkv``
/ ``wo``, ``feed_forward.w1`` / ``w2``, ``attention_norm``, ``ffn_norm``): the mapping is the identity; the layers
are built stacked (``nnx.vmap``) under ``transformer.layers`` and run with ``nnx.scan``.

Kept from the original (diffsynth 1.1.9's / FastVideo 0.1.7's ``stepvideo_text_encoder`` / ``stepllm.py``):
pre-norm residual layers with RMS norms (fp32 statistics, cast back, times the weight); one fused ``wqkv``
projection whose output is [queries (heads x E) | per key/value group: key (E), value (E)]; grouped-query
attention (query head h reads key/value group h // (heads / groups)); a SwiGLU MLP ``w2(silu(a) * b)`` with ``w1``
giving [a | b]; NO final norm (``last_hidden_state`` is the last layer's output) and no position embedding.

The attention: the original calls ``torch.ops.Optimus.fwd(q, k, v, None, dropout, 1/sqrt(E), causal=True, ...)``,
a closed CUDA kernel (``liboptimus_ths``) whose positional scheme is not in any Python source. We implement it as
**causal attention with square-root ALiBi**: logits ``q.k / sqrt(E) - slope_h * sqrt(i - j)`` for keys j <= i,
``-inf`` after, slopes ALiBi's (n = 2^floor(log2 H); 2^(-8k/n) for k = 1..n, then 2^(-4(2k-1)/n) for the
remaining H - n heads). Sources: StepFun's own open fallback for the same kernel with the same call, Step-Audio's
``modeling_step1.py`` (``build_alibi_cache``, used when ``Optimus.fwd`` is missing); the MindSpore port of
Step-Video-T2V (mindone ``examples/step_video_t2v``), which replaces this exact kernel by that attention; and
vLLM-omni's Step1 text model (``alibi_slopes=build_alibi_cache(H)``, ``use_alibi_sqrt=True``). diffsynth's own CPU
fallback (plain causal SDPA, no ALiBi) is NOT the kernel: it drops every position signal (tests/test_stepllm.py
checks that ours differs from it). What is verified: parity with diffsynth's ``Step1Model`` whose attention
function is replaced by that causal sqrt-ALiBi attention (tests/test_stepllm.py, fp32 <= 1e-5, padding included);
the kernel itself could not be run here.

Padding: the original passes no mask to the kernel (causal only). Its tokenizer pads on the right, so no real token
ever sees a pad, and a pad's state (which the DiT masks out) is what the causal model computes for it. We do the
same: ``attention_mask`` is returned, not applied, and a mask that is not right-padded is refused.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.configs.models.encoders.stepllm import StepLLMArchConfig, StepLLMEncoderConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, TextEncoder, check_attention_backend
from fastvideo_jax.models.encoders.t5 import Embedding, T5LayerNorm, split
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.layers.linear import Linear
from fastvideo_jax.parallel.activations import constrain
from fastvideo_jax.parallel.rules import TEXT_ENCODER_ACTIVATION_RULES, TEXT_ENCODER_RULES

F32 = jnp.float32
HIDDEN = ("batch", "length", "embed")  # (B, L, D) between layers
_MASKED = float(jnp.finfo(F32).min)
_LOOKUP_RULES = {"batch": TEXT_ENCODER_ACTIVATION_RULES["batch"], "embed": TEXT_ENCODER_RULES["embed"]}


def alibi_slopes(num_heads: int) -> np.ndarray:
    """(H,) fp32 ALiBi slopes as Step1's ``build_alibi_cache`` makes them (also for H not a power of two)."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * k / n) for k in range(1, 2 * (num_heads - n), 2)]
    return np.asarray(slopes, np.float32)


class StepAttention(nnx.Module):
    """Fused-QKV grouped-query self-attention, causal with square-root ALiBi; queries as (B, L, K, G, E)."""

    def __init__(self, cfg: StepLLMArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d, e, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_groups
        self.kv_heads, self.groups, self.head_dim = kv, cfg.num_attention_heads // kv, e
        # The fused output [q | (k, v) per group] splits unevenly, so it is not split over tensor (None).
        self.wqkv = Linear(d, d + 2 * kv * e, axes=("embed", None), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.wo = Linear(d, d, axes=("heads", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x (B, L, D); bias (K, G, Lq, Lk) fp32, ALiBi with -inf-like values above the diagonal."""
        kv, g, d = self.kv_heads, self.groups, x.shape[-1]
        qkv = self.wqkv(x)
        q = rearrange(qkv[..., :d], "b l (k g e) -> b l k g e", k=kv, g=g)
        k, v = jnp.split(rearrange(qkv[..., d:], "b l (k two e) -> b l k (two e)", k=kv, two=2), 2, axis=-1)
        q = split(q, ("batch", "length", "kv_heads", None, None))  # this device's queries
        k = split(k, ("batch", None, "kv_heads", None))  # every key and value
        v = split(v, ("batch", None, "kv_heads", None))
        logits = jnp.einsum("bqkge,bske->bkgqs", q, k, preferred_element_type=F32) * self.head_dim**-0.5
        probs = jax.nn.softmax(logits + bias[None], axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bske->bqkge", probs, v, preferred_element_type=F32).astype(v.dtype)
        return self.wo(rearrange(out, "b l k g e -> b l (k g e)"))


class FeedForward(nnx.Module):
    """SwiGLU with the gate and up projections fused in ``w1``: ``w2(silu(a) * b)``, [a | b] = w1 x."""

    def __init__(self, cfg: StepLLMArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d, ff = cfg.hidden_size, cfg.ffn_size
        self.w1 = Linear(d, 2 * ff, axes=("embed", "mlp"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.w2 = Linear(ff, d, axes=("mlp", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = jnp.split(self.w1(x), 2, axis=-1)
        return self.w2(split(jax.nn.silu(a) * b, ("batch", "length", "mlp")))


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: StepLLMArchConfig, *, param_dtype, rngs: nnx.Rngs):
        def norm():
            return T5LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, param_dtype=param_dtype, rngs=rngs)

        self.attention = StepAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.feed_forward = FeedForward(cfg, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = norm()
        self.ffn_norm = norm()

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        h = x + self.attention(self.attention_norm(x), bias)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nnx.Module):
    def __init__(self, cfg: StepLLMArchConfig, *, param_dtype, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return TransformerBlock(cfg, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)


class LLaMaEmbedding(nnx.Module):
    def __init__(self, cfg: StepLLMArchConfig, *, param_dtype, rngs: nnx.Rngs):
        self.word_embeddings = Embedding(cfg.padded_vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                                         param_dtype=param_dtype, rngs=rngs)


def alibi_bias(length: int, num_heads: int, kv_heads: int) -> jax.Array:
    """(K, G, L, L) fp32: -slope_h * sqrt(i - j) on and below the diagonal, the fp32 minimum above (causal)."""
    pos = jnp.arange(length)
    dist = (pos[:, None] - pos[None, :]).astype(F32)  # query i - key j
    slopes = jnp.asarray(alibi_slopes(num_heads)).reshape(kv_heads, -1, 1, 1)
    return jnp.where(dist >= 0, -slopes * jnp.sqrt(jnp.maximum(dist, 0.0)), _MASKED)


class Step1Model(TextEncoder):
    """Step-LLM's decoder stack (StepVideo's ``text_encoder``: its last layer's output, 320 tokens, 6144-d)."""

    config_class = StepLLMEncoderConfig
    # Causal square-root ALiBi runs as its own einsum (a bias no dense kernel here takes).
    _supported_attention_backends = (AttentionBackend.REFERENCE, AttentionBackend.TORCH_SDPA)

    def __init__(self, config: StepLLMEncoderConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        dtype = to_dtype(config.precision)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"Step1Model: precision {config.precision!r} unsupported; use bf16, fp16 or fp32")
        check_attention_backend(type(self), config)
        self.config = config
        self.tok_embeddings = LLaMaEmbedding(cfg, param_dtype=dtype, rngs=rngs)
        self.transformer = Transformer(cfg, param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> BaseEncoderOutput:
        """Token ids (B, L); ``attention_mask`` (B, L), 1 = token, 0 = pad, right-padded (it is returned, not
        applied: the original's attention is causal only). ``last_hidden_state`` (B, L, D) is the last layer's
        output (no final norm); ``hidden_states`` the embeddings then every layer's output."""
        self.check_tokens(input_ids, attention_mask)
        if attention_mask is not None and not isinstance(attention_mask, jax.core.Tracer):
            m = np.asarray(attention_mask) > 0
            if np.any(m[:, 1:] & ~m[:, :-1]):
                raise UserError(f"{type(self).__name__}: attention_mask must be right-padded (tokens first, then "
                                "pads), as StepVideo's tokenizer pads: the causal encoder cannot skip a pad before a token")
        return compiled_call(_forward, self, input_ids, attention_mask, output_hidden_states=output_hidden_states)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None, output_hidden_states: bool = False
                ) -> BaseEncoderOutput:
        """The traced forward (``__call__`` runs it under jit with the configured matmul precision)."""
        cfg = self.config.arch_config
        # Lookup output split as the table's model dim, then over prompts (one all-to-all each; see t5.py).
        x = constrain(self.tok_embeddings.word_embeddings(input_ids), (None, None, "embed"), TEXT_ENCODER_RULES)
        x = split(constrain(x, ("batch", None, "embed"), _LOOKUP_RULES), HIDDEN)
        bias = alibi_bias(input_ids.shape[1], cfg.num_attention_heads, cfg.num_attention_groups)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(h, layer):
            h = split(layer(h, bias), HIDDEN)
            return h, (h if output_hidden_states else None)

        last, per_layer = run(x, self.transformer.layers)
        hidden = None if per_layer is None else (x, *(per_layer[i] for i in range(per_layer.shape[0])))
        return BaseEncoderOutput(last_hidden_state=last, hidden_states=hidden, attention_mask=attention_mask)


def _forward(model: Step1Model, input_ids: jax.Array, attention_mask: jax.Array | None,
             output_hidden_states: bool = False) -> BaseEncoderOutput:
    return model.forward(input_ids, attention_mask, output_hidden_states)


EntryClass = [Step1Model]
