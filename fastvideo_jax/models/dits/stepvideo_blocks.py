"""StepVideo DiT blocks in Flax NNX: self-attention (fused ``wqkv``, q/k RMSNorm per head, 3D RoPE), cross-
attention to the text (``wq`` + fused ``wkv``, q/k RMSNorm), the tanh-GELU FFN and the adaLN-single block.
Attribute names are the checkpoint's (``attn1.wqkv``, ``attn2.wkv``, ``q_norm``, ``scale_shift_table``).

Layouts, from the oracle: the fused projections are per head, ``wqkv``'s output is ``(heads, [q, k, v], E)``
and ``wkv``'s ``(heads, [k, v], E)``, so splitting the output over the ``heads`` logical axis keeps whole heads
on each device. RoPE rotates halves (``rotate_half``, NeoX style) within each axis' chunk of the head dim
(frames, rows, columns = E/2, E/4, E/4), not interleaved pairs. The block (PixArt-style)::

    x = x + gate_msa * attn1(LN1(x) * (1 + scale_msa) + shift_msa)
    x = x + attn2(x, text)                      # no norm, no gate
    x = x + gate_mlp * ff(LN2(x) * (1 + scale_mlp) + shift_mlp)

with the six vectors = ``scale_shift_table`` (6, D) + the adaLN-single projection of the timestep (B, 6, D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention import attention
from fastvideo_jax.models.layers.activations import gelu_tanh
from fastvideo_jax.models.layers.linear import Linear, make_param
from fastvideo_jax.models.layers.norms import LayerNorm, RMSNorm
from fastvideo_jax.parallel.activations import constrain
from fastvideo_jax.parallel.sequence import local_attention, ulysses_attention

F32 = jnp.float32
QK_EPS = 1e-6  # RMSNorm(head_dim) default in the original
BLOCK_NORM_EPS = 1e-5  # StepVideoTransformerBlock(norm_eps=1e-5): the model's norm_eps is not passed to blocks


def apply_rope_halves(x: jax.Array, cos: jax.Array, sin: jax.Array, axis_dims: tuple[int, ...]) -> jax.Array:
    """x (B, L, N, E) rotated per axis chunk of ``axis_dims`` channels by ``rotate_half``: a chunk [a; b] becomes
    [a cos - b sin; b cos + a sin]. cos/sin (L, E/2): the chunks' angles side by side (``rope_3d_tables``)."""
    xf = x.astype(F32)
    out, start, half_start = [], 0, 0
    for d in axis_dims:
        h = d // 2
        a, b = xf[..., start:start + h], xf[..., start + h:start + d]
        c = cos[None, :, None, half_start:half_start + h]
        s = sin[None, :, None, half_start:half_start + h]
        out += [a * c - b * s, b * c + a * s]
        start, half_start = start + d, half_start + h
    return jnp.concatenate(out, axis=-1).astype(x.dtype)


def _lengths_attend(backend):
    """``attend`` for the sequence helpers: a prefix key mask goes to the kernel as lengths (cuDNN takes them)."""
    def attend(q, k, v, kv_mask):
        lengths = None if kv_mask is None else kv_mask.sum(-1, dtype=jnp.int32)
        return attention(q, k, v, kv_lengths=lengths, backend=backend)

    return attend


def _qk_norms(owner, head_dim, rngs):
    owner.q_norm = RMSNorm(head_dim, QK_EPS, param_dtype=F32, rngs=rngs)
    owner.k_norm = RMSNorm(head_dim, QK_EPS, param_dtype=F32, rngs=rngs)


class SelfAttention(nnx.Module):
    def __init__(self, cfg, param_dtype, rngs):
        dim, self.heads, self.rope_axes_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.rope_axes_dim
        self.wqkv = Linear(dim, 3 * dim, axes=("embed", "heads"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.wo = Linear(dim, dim, axes=("heads", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        _qk_norms(self, cfg.attention_head_dim, rngs)

    def __call__(self, x, cos, sin, kv_mask, backend):  # x (B, Lp, D) sequence-sharded; kv_mask (B, Lp) or None
        qkv = rearrange(self.wqkv(x), "b l (n three e) -> three b l n e", n=self.heads, three=3)
        q = apply_rope_halves(self.q_norm(qkv[0]), cos, sin, self.rope_axes_dim)
        k = apply_rope_halves(self.k_norm(qkv[1]), cos, sin, self.rope_axes_dim)
        out = ulysses_attention(q, k, qkv[2], _lengths_attend(backend), kv_mask)
        return self.wo(rearrange(out, "b l n e -> b l (n e)"))


class CrossAttention(nnx.Module):
    def __init__(self, cfg, param_dtype, rngs):
        dim, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.wq = Linear(dim, dim, axes=("embed", "heads"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.wkv = Linear(dim, 2 * dim, axes=("embed", "heads"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.wo = Linear(dim, dim, axes=("heads", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        _qk_norms(self, cfg.attention_head_dim, rngs)

    def __call__(self, x, text, text_mask, backend):  # x (B, Lp, D), text (B, Lt, D), text_mask (B, Lt) prefix
        q = self.q_norm(rearrange(self.wq(x), "b l (n e) -> b l n e", n=self.heads))
        kv = rearrange(self.wkv(text), "b l (n two e) -> two b l n e", n=self.heads, two=2)
        out = local_attention(q, self.k_norm(kv[0]), kv[1], _lengths_attend(backend), text_mask)
        return self.wo(rearrange(out, "b l n e -> b l (n e)"))


class FeedForward(nnx.Module):
    """fc_in -> tanh GELU -> fc_out, no biases (the original ``FeedForward(bias=False)``: net.0.proj, net.2)."""

    def __init__(self, dim, hidden, param_dtype, rngs):
        self.fc_in = Linear(dim, hidden, axes=("embed", "mlp"), use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.fc_out = Linear(hidden, dim, axes=("mlp", "embed"), use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc_out(gelu_tanh(self.fc_in(x)))


class StepVideoTransformerBlock(nnx.Module):
    def __init__(self, cfg, param_dtype, backend, rngs):
        dim = cfg.hidden_size
        self.backend = backend
        self.norm1 = LayerNorm(dim, BLOCK_NORM_EPS, param_dtype=F32, rngs=rngs)
        self.attn1 = SelfAttention(cfg, param_dtype, rngs)
        self.norm2 = LayerNorm(dim, BLOCK_NORM_EPS, param_dtype=F32, rngs=rngs)
        self.attn2 = CrossAttention(cfg, param_dtype, rngs)
        self.ff = FeedForward(dim, cfg.ff_dim, param_dtype, rngs)
        self.scale_shift_table = make_param(rngs, nnx.initializers.normal(dim**-0.5), (6, dim), F32,
                                            (None, "embed"))

    def __call__(self, x, text, text_mask, t_mod, cos, sin, kv_mask):
        # x (B, Lp, D); text (B, Lt, D); t_mod (B, 6, D) fp32; cos/sin (Lp, E/2); kv_mask (B, Lp) or None
        x = constrain(x, ("batch", "length", "embed"))
        mod = self.scale_shift_table[...][None] + t_mod
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i:i + 1] for i in range(6))
        dtype = x.dtype
        h = (self.norm1(x.astype(F32)) * (1 + scale_msa) + shift_msa).astype(dtype)
        x = (x.astype(F32) + self.attn1(h, cos, sin, kv_mask, self.backend).astype(F32) * gate_msa).astype(dtype)
        x = x + self.attn2(x, text, text_mask, self.backend).astype(dtype)
        h = (self.norm2(x.astype(F32)) * (1 + scale_mlp) + shift_mlp).astype(dtype)
        x = (x.astype(F32) + self.ff(h).astype(F32) * gate_mlp).astype(dtype)
        return constrain(x, ("batch", "length", "embed"))
