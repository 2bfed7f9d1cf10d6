"""HunyuanVideo DiT blocks in Flax NNX: the text token refiner block, the dual-stream block (separate video and
text weights, one joint attention over [video; text]) and the single-stream block (one weight set over the
joint sequence). Attribute names are diffusers' (``attn.to_q``, ``norm1_context.linear``, ...).

Joint attention masks keys only: key j is attended iff j < L_video + text_len_b, for every query row (padded
text queries included), exactly as diffusers' (B, 1, 1, L) mask; the mask is a prefix, so it reaches the kernel
as lengths. The refiner's self-attention over the text uses diffusers' (B, 1, Lt, Lt) mask ``m_i & m_j`` with
key 0 always on: a real text query attends the real keys (and key 0); a padded query attends key 0 alone, whose
output is exactly ``v[0]``, so that row is set to ``v[0]`` instead of building an (Lt, Lt) mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention import attention, sliding_tile_attention
from fastvideo_jax.models.dits.sta import StaLayer
from fastvideo_jax.models.layers.activations import gelu_tanh
from fastvideo_jax.models.layers.embeddings import apply_rope
from fastvideo_jax.models.layers.linear import Linear, MLP
from fastvideo_jax.models.layers.norms import LayerNorm, RMSNorm
from fastvideo_jax.parallel.activations import constrain
from fastvideo_jax.parallel.sequence import joint_ulysses_attention, local_attention

F32 = jnp.float32
EPS = 1e-6


def feed_forward(dim, hidden, act, param_dtype, rngs) -> MLP:
    return MLP(dim, hidden, dim, act, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"), param_dtype=param_dtype,
               rngs=rngs)


class AdaModulation(nnx.Module):
    """``linear(silu(temb))`` cut into ``parts`` (B, D) vectors (diffusers' AdaLayerNormZero[Single] /
    HunyuanVideoAdaNorm / AdaLayerNormContinuous), with the parameter-free LayerNorm they modulate."""

    def __init__(self, dim, parts, *, param_dtype, rngs):
        self.parts = parts
        self.linear = Linear(dim, parts * dim, axes=("embed", "modulation"), param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(dim, EPS, affine=False, rngs=rngs)

    def __call__(self, temb):  # (B, D) -> parts x (B, 1, D) fp32
        mod = self.linear(jax.nn.silu(temb)).astype(F32)
        return tuple(m[:, None, :] for m in jnp.split(mod, self.parts, axis=-1))

    def modulate(self, x, shift, scale):  # LayerNorm(x) * (1 + scale) + shift, in fp32, back to x's dtype
        return (self.norm(x.astype(F32)) * (1 + scale) + shift).astype(x.dtype)


def _heads(x, n):
    return rearrange(x, "b l (n e) -> b l n e", n=n)


def _merge(x):
    return rearrange(x, "b l n e -> b l (n e)")


def _qk_norm(head_dim):
    return lambda rngs: RMSNorm(head_dim, EPS, param_dtype=F32, rngs=rngs)


def joint_attention(video, text, text_lengths, video_length, backend, sta: StaLayer | None = None):
    """Attention over [video; text]: video q/k/v (B, Lp, N, E) token-sharded (the first ``video_length`` real),
    text q/k/v (B, Lt, N, E) whole; every query attends the real video and the first text_lengths[b] text keys.
    With ``sta`` (this layer's sliding-tile windows) a video query attends the video keys in its window only
    (text queries still attend every real video key, everyone every real text key: the STA op's joint text).
    Returns the video and text outputs merged over heads."""
    def attend(q, k, v, kv_lengths):
        if sta is None:
            return attention(q, k, v, kv_lengths=kv_lengths, backend=backend)
        # Per device: the whole video (padding dropped) then the text, for this device's head chunk
        palette, index = sta.device_view()
        text_len = q.shape[1] - video_length
        text_mask = jnp.arange(text_len)[None, :] < (kv_lengths - video_length)[:, None] if text_len else None
        return sliding_tile_attention(q, k, v, grid=sta.grid, palette=palette, index=index, tile=sta.tile,
                                      text_len=text_len, text_mask=text_mask)

    out_v, out_t = joint_ulysses_attention(video, text, attend, text_lengths, video_length)
    return _merge(out_v), _merge(out_t)


class DualStreamAttention(nnx.Module):
    """Video projections (to_q/k/v, norm_q/k, to_out) and text ones (add_*_proj, norm_added_*, to_add_out)."""

    def __init__(self, cfg, param_dtype, rngs):
        dim, self.heads = cfg.hidden_size, cfg.num_attention_heads
        norm = _qk_norm(cfg.attention_head_dim)

        def linear(axes):
            return Linear(dim, dim, axes=axes, param_dtype=param_dtype, rngs=rngs)

        self.to_q, self.to_k, self.to_v = (linear(("embed", "heads")) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (linear(("embed", "heads")) for _ in range(3))
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (norm(rngs) for _ in range(4))
        self.to_out, self.to_add_out = linear(("heads", "embed")), linear(("heads", "embed"))

    def __call__(self, x, c, cos, sin, text_lengths, video_length, backend, sta=None):  # x (B, Lp, D), c (B, Lt, D)
        n = self.heads
        q = apply_rope(self.norm_q(_heads(self.to_q(x), n)), cos, sin)
        k = apply_rope(self.norm_k(_heads(self.to_k(x), n)), cos, sin)
        v = _heads(self.to_v(x), n)
        qc = self.norm_added_q(_heads(self.add_q_proj(c), n))
        kc = self.norm_added_k(_heads(self.add_k_proj(c), n))
        vc = _heads(self.add_v_proj(c), n)
        out_v, out_t = joint_attention((q, k, v), (qc, kc, vc), text_lengths, video_length, backend, sta)
        return self.to_out(out_v), self.to_add_out(out_t)


class DualStreamBlock(nnx.Module):
    """``HunyuanVideoTransformerBlock``: adaLN-zero on each stream, joint attention, one FFN per stream."""

    def __init__(self, cfg, param_dtype, backend, rngs):
        dim = cfg.hidden_size
        self.backend = backend
        self.norm1 = AdaModulation(dim, 6, param_dtype=param_dtype, rngs=rngs)
        self.norm1_context = AdaModulation(dim, 6, param_dtype=param_dtype, rngs=rngs)
        self.attn = DualStreamAttention(cfg, param_dtype, rngs)
        self.ff = feed_forward(dim, cfg.mlp_dim, gelu_tanh, param_dtype, rngs)
        self.ff_context = feed_forward(dim, cfg.mlp_dim, gelu_tanh, param_dtype, rngs)

    def __call__(self, x, c, temb, cos, sin, text_lengths, video_length, sta: StaLayer | None = None):
        x = constrain(x, ("batch", "length", "embed"))
        c = constrain(c, ("batch", "text_length", "embed"))
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        a_x, a_c = self.attn(self.norm1.modulate(x, shift, scale), self.norm1_context.modulate(c, c_shift, c_scale),
                             cos, sin, text_lengths, video_length, self.backend, sta)
        x = (x.astype(F32) + a_x.astype(F32) * gate).astype(x.dtype)
        c = (c.astype(F32) + a_c.astype(F32) * c_gate).astype(c.dtype)
        x = (x.astype(F32) + self.ff(self.norm1.modulate(x, shift2, scale2)).astype(F32) * gate2).astype(x.dtype)
        c = (c.astype(F32) + self.ff_context(self.norm1_context.modulate(c, c_shift2, c_scale2)).astype(F32) * c_gate2
             ).astype(c.dtype)
        return constrain(x, ("batch", "length", "embed")), constrain(c, ("batch", "text_length", "embed"))


class SingleStreamAttention(nnx.Module):
    """``pre_only`` attention: to_q/k/v and norm_q/k over the joint sequence, no output projection."""

    def __init__(self, cfg, param_dtype, rngs):
        dim, self.heads = cfg.hidden_size, cfg.num_attention_heads
        norm = _qk_norm(cfg.attention_head_dim)
        self.to_q, self.to_k, self.to_v = (Linear(dim, dim, axes=("embed", "heads"), param_dtype=param_dtype,
                                                  rngs=rngs) for _ in range(3))
        self.norm_q, self.norm_k = norm(rngs), norm(rngs)


class SingleStreamBlock(nnx.Module):
    """``HunyuanVideoSingleTransformerBlock``: one weight set over both streams (the video tokens x and the text
    c are kept apart, so the video stays token-sharded): one adaLN, joint attention (RoPE on the video only) and a
    parallel tanh-GELU MLP, fused by one output projection."""

    def __init__(self, cfg, param_dtype, backend, rngs):
        dim = cfg.hidden_size
        self.backend = backend
        self.norm = AdaModulation(dim, 3, param_dtype=param_dtype, rngs=rngs)
        self.attn = SingleStreamAttention(cfg, param_dtype, rngs)
        self.proj_mlp = Linear(dim, cfg.mlp_dim, axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.proj_out = Linear(dim + cfg.mlp_dim, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, c, temb, cos, sin, text_lengths, video_length, sta: StaLayer | None = None):
        # x (B, Lp, D), c (B, Lt, D); sta: this layer's sliding-tile windows (None = dense)
        x = constrain(x, ("batch", "length", "embed"))
        c = constrain(c, ("batch", "text_length", "embed"))
        shift, scale, gate = self.norm(temb)
        attn, n = self.attn, self.attn.heads
        nx, nc = self.norm.modulate(x, shift, scale), self.norm.modulate(c, shift, scale)

        def qkv(h):
            return attn.norm_q(_heads(attn.to_q(h), n)), attn.norm_k(_heads(attn.to_k(h), n)), _heads(attn.to_v(h), n)

        q, k, v = qkv(nx)
        video = (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        out_v, out_t = joint_attention(video, qkv(nc), text_lengths, video_length, self.backend, sta)

        def residual(h, normed, out):
            mlp = gelu_tanh(self.proj_mlp(normed))
            y = self.proj_out(jnp.concatenate([out, mlp.astype(out.dtype)], axis=-1))
            return (h.astype(F32) + y.astype(F32) * gate).astype(h.dtype)

        x, c = residual(x, nx, out_v), residual(c, nc, out_t)
        return constrain(x, ("batch", "length", "embed")), constrain(c, ("batch", "text_length", "embed"))


class RefinerAttention(nnx.Module):
    def __init__(self, cfg, param_dtype, rngs):
        dim, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = (Linear(dim, dim, axes=("embed", "heads"), param_dtype=param_dtype,
                                                  rngs=rngs) for _ in range(3))
        self.to_out = Linear(dim, dim, axes=("heads", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, mask, backend):  # x (B, Lt, D), mask (B, Lt) bool: real text tokens
        n = self.heads
        q, k, v = (_heads(p(x), n) for p in (self.to_q, self.to_k, self.to_v))
        keys = mask | (jnp.arange(x.shape[1]) == 0)[None, :]  # key 0 always attended, as diffusers

        def attend(q, k, v, kv_mask):
            return attention(q, k, v, kv_mask, backend=backend)

        out = local_attention(q, k, v, attend, keys)
        out = jnp.where(mask[:, :, None, None], out, v[:, :1])  # a padded query attends key 0 alone
        return self.to_out(_merge(out))


class RefinerBlock(nnx.Module):
    """``HunyuanVideoIndividualTokenRefinerBlock``: masked self-attention and a SiLU MLP (4x) over the text,
    gated by the refiner's timestep + pooled-text embedding."""

    def __init__(self, cfg, param_dtype, backend, rngs):
        dim = cfg.hidden_size
        self.backend = backend
        self.norm1 = LayerNorm(dim, EPS, param_dtype=F32, rngs=rngs)
        self.attn = RefinerAttention(cfg, param_dtype, rngs)
        self.norm2 = LayerNorm(dim, EPS, param_dtype=F32, rngs=rngs)
        self.ff = feed_forward(dim, 4 * dim, jax.nn.silu, param_dtype, rngs)  # diffusers' mlp_width_ratio: 4.0
        self.norm_out = _Gates(dim, param_dtype, rngs)

    def __call__(self, x, temb, mask):
        x = constrain(x, ("batch", "text_length", "embed"))
        gate_msa, gate_mlp = self.norm_out(temb)
        x = (x.astype(F32) + self.attn(self.norm1(x), mask, self.backend).astype(F32) * gate_msa).astype(x.dtype)
        x = (x.astype(F32) + self.ff(self.norm2(x)).astype(F32) * gate_mlp).astype(x.dtype)
        return constrain(x, ("batch", "text_length", "embed"))


class _Gates(nnx.Module):  # HunyuanVideoAdaNorm: linear(silu(temb)) -> gate_msa, gate_mlp
    def __init__(self, dim, param_dtype, rngs):
        self.linear = Linear(dim, 2 * dim, axes=("embed", "modulation"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, temb):
        mod = self.linear(jax.nn.silu(temb)).astype(F32)
        return tuple(m[:, None, :] for m in jnp.split(mod, 2, axis=-1))


def stacked(make, num_layers, rngs):
    """``num_layers`` copies of ``make(rngs)`` stacked on a leading ``layers`` axis (for ONE ``nnx.scan``)."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(rngs)

    return build(rngs)
