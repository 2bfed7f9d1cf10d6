"""BERT's encoder stack as a text encoder (``BertModel``; StepVideo's bilingual "HunyuanClip") in Flax NNX.

Attributes carry the Transformers names (``embeddings.word_embeddings``, ``embeddings.LayerNorm``,
``encoder.layer.N.attention.self.query``, ``attention.output.dense``, ``intermediate.dense``, ``output.LayerNorm``),
so ``BertModel`` checkpoints load through the identity mapping (the wrappers' ``bert.`` prefix is stripped; the
pooler and pre-training heads are dropped, see ``configs/models/encoders/bert.py``); the layers are built stacked
(``nnx.vmap``) under ``encoder.layer`` and run with ``nnx.scan``.

Kept from the original (Transformers 5 ``BertModel`` in eval mode, parity-tested in tests/test_bert.py): word +
absolute position (0..L-1) + token-type (type 0: StepVideo passes no ``token_type_ids``) embeddings, then
LayerNorm; post-norm layers (``LayerNorm(x + attention(x))``, ``LayerNorm(h + output(act(intermediate(h))))``, in
fp32); bidirectional attention scaled by 1/sqrt(head_dim) with padded keys masked (padded query rows still
attend to every real token: their outputs are real numbers, and StepVideo's DiT attends to all 77 of them).
``hidden_states`` is the embeddings followed by every layer's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.configs.models.encoders.bert import BertArchConfig, BertEncoderConfig
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, TextEncoder, check_attention_backend
from fastvideo_jax.models.encoders.clip import ACTIVATIONS, MASKED_BACKENDS, _dtype, _hidden_tuple
from fastvideo_jax.models.encoders.t5 import Embedding, split
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.parallel.activations import constrain
from fastvideo_jax.parallel.rules import TEXT_ENCODER_ACTIVATION_RULES, TEXT_ENCODER_RULES
from fastvideo_jax.models.layers.linear import Linear
from fastvideo_jax.models.layers.norms import LayerNorm

F32 = jnp.float32
HIDDEN = ("batch", "length", "embed")  # (B, L, D) between layers
_LOOKUP_RULES = {"batch": TEXT_ENCODER_ACTIVATION_RULES["batch"], "embed": TEXT_ENCODER_RULES["embed"]}
_MASKED = float(jnp.finfo(F32).min)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size

        def table(num, axes):
            return Embedding(num, d, axes=axes, param_dtype=param_dtype, rngs=rngs)

        self.word_embeddings = table(cfg.vocab_size, ("vocab", "embed"))
        self.position_embeddings = table(cfg.max_position_embeddings, (None, "embed"))
        self.token_type_embeddings = table(cfg.type_vocab_size, (None, "embed"))
        self.LayerNorm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:  # (B, L) -> (B, L, D)
        positions = self.position_embeddings.embedding[...][: ids.shape[1]]
        token_type = self.token_type_embeddings.embedding[...][0]
        # Lookup output split as the table's model dim, then over prompts: all-to-alls, not a full gather of the
        # (B, L, D) output on a mesh (as stepllm.py / t5.py).
        words = constrain(self.word_embeddings(ids), (None, None, "embed"), TEXT_ENCODER_RULES)
        words = constrain(words, ("batch", None, "embed"), _LOOKUP_RULES)
        return self.LayerNorm(words + token_type[None, None] + positions[None])


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertArchConfig, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query, self.key, self.value = (Linear(d, d, axes=("embed", "heads"), param_dtype=param_dtype, rngs=rngs)
                                            for _ in range(3))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:  # x (B, L, D), mask (B|1, 1, Lk) -> (B, L, D)
        def heads(t, axes):
            return split(rearrange(t, "b l (n e) -> b l n e", n=self.num_heads), axes)

        q = heads(self.query(x), ("batch", "length", "heads", None))  # this device's queries
        k = heads(self.key(x), ("batch", None, "heads", None))  # every key and value
        v = heads(self.value(x), ("batch", None, "heads", None))
        logits = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=F32) * q.shape[-1] ** -0.5
        probs = jax.nn.softmax(jnp.where(mask[:, None], logits, _MASKED), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bkne->bqne", probs, v, preferred_element_type=F32).astype(v.dtype)
        return rearrange(out, "b l n e -> b l (n e)")


class BertResidualOutput(nnx.Module):
    """``LayerNorm(dense(h) + residual)`` (Transformers' ``BertSelfOutput`` / ``BertOutput``)."""

    def __init__(self, d_in: int, d: int, eps: float, axes, *, param_dtype, rngs: nnx.Rngs):
        self.dense = Linear(d_in, d, axes=axes, param_dtype=param_dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(d, eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertArchConfig, *, param_dtype, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.output = BertResidualOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, ("heads", "embed"),
                                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertArchConfig, *, param_dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), param_dtype=param_dtype,
                            rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return split(self.act(self.dense(x)), ("batch", "length", "mlp"))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertArchConfig, *, param_dtype, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, param_dtype=param_dtype, rngs=rngs)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, ("mlp", "embed"),
                                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nnx.Module):
    """The scanned layers; returns the last output and, when ``collect``, every layer's output (N, B, L, D)."""

    def __init__(self, cfg: BertArchConfig, *, param_dtype, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return BertLayer(cfg, param_dtype=param_dtype, rngs=rngs)

        self.layer = make_layers(rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, collect: bool):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(h, layer):
            h = split(layer(h, mask), HIDDEN)
            return h, (h if collect else None)

        return run(split(x, HIDDEN), self.layer)


class BertModel(TextEncoder):
    """BERT's encoder without the pooler (StepVideo's ``text_encoder_2``: its ``last_hidden_state``)."""

    config_class = BertEncoderConfig
    _supported_attention_backends = MASKED_BACKENDS  # the padding mask runs as its own einsum

    def __init__(self, config: BertEncoderConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        dtype = _dtype(type(self), config)
        check_attention_backend(type(self), config)
        self.config = config
        self.embeddings = BertEmbeddings(cfg, param_dtype=dtype, rngs=rngs)
        self.encoder = BertEncoder(cfg, param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> BaseEncoderOutput:
        """Token ids (B, L), L <= max_position_embeddings; ``attention_mask`` (B, L), 1 = token, 0 = pad (None:
        every position is a token). ``last_hidden_state`` (B, L, D); ``pooler_output`` None (no pooler)."""
        self.check_tokens(input_ids, attention_mask, self.config.arch_config.max_position_embeddings)
        return compiled_call(_forward, self, input_ids, attention_mask, output_hidden_states=output_hidden_states)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None, output_hidden_states: bool = False
                ) -> BaseEncoderOutput:
        """The traced forward (``__call__`` runs it under jit with the configured matmul precision)."""
        x = self.embeddings(input_ids)
        if attention_mask is None:
            mask = jnp.ones((1, 1, input_ids.shape[1]), bool)
        else:
            mask = attention_mask.astype(bool)[:, None, :]  # (B, 1, Lk): no padded key
        last, per_layer = self.encoder(x, mask, output_hidden_states)
        return BaseEncoderOutput(last_hidden_state=last, hidden_states=_hidden_tuple(x, per_layer),
                                 attention_mask=attention_mask)


def _forward(model: BertModel, input_ids: jax.Array, attention_mask: jax.Array | None,
             output_hidden_states: bool = False) -> BaseEncoderOutput:
    return model.forward(input_ids, attention_mask, output_hidden_states)


EntryClass = [BertModel]
