"""Building blocks of the StepVideo VAE in Flax NNX: zero-padded causal 3D conv, per-frame GroupNorm, resnets,
token-causal attention, 2D/3D resamplers and the 2x2x2 pixel-(un)shuffle with channel shortcuts.

Activations are channels-last ``(B, F, H, W, C)``. Facts from the original (StepFun's ``vae_v2``, as in
diffsynth's ``stepvideo_vae.py``): every causal conv zero-pads ``k - 1`` frames in front and ``k // 2``
rows/columns on each side; every GroupNorm (32 groups, eps 1e-5) takes its statistics per frame (``spatial``
mode); the mid-block attention is causal over the flattened (frame, row, column) tokens. Attribute names follow
the checkpoint (``conv1.conv.weight`` -> ``conv1.conv.kernel``), so the name mapping is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange, reduce
from flax import nnx

from fastvideo_jax.configs.models.vaes.stepvideovae import NORM_GROUPS
from fastvideo_jax.models.layers.linear import make_param
from fastvideo_jax.models.vaes.hunyuan_blocks import _INIT, CausalConv3d, Conv3d
from fastvideo_jax.models.vaes.parallel_decode import constrain_video  # no-op without a mesh in scope

F32 = jnp.float32
EPS = 1e-5  # torch.nn.GroupNorm's default, which the original keeps
_CONV2D = ("NHWC", "HWIO", "NHWC")


def causal_conv(c_in: int, c_out: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1), *, dtype,
                rngs: nnx.Rngs) -> CausalConv3d:
    """Zero-pad ``k - 1`` frames in front and ``k // 2`` rows/columns on each side, then a valid conv. The
    original's CausalConv, CausalConvChannelLast and CausalConvAfterNorm (whose norm prepends the two zero
    frames) all compute this."""
    return CausalConv3d(c_in, c_out, kernel, stride, dtype=dtype, rngs=rngs, pad_mode="constant")


class Conv2d(nnx.Module):
    """A 3x3 ``nn.Conv2d`` run on every frame; ``pad`` is ((top, bottom), (left, right)) zero padding."""

    def __init__(self, c_in: int, c_out: int, stride: int, pad: tuple, *, dtype, rngs: nnx.Rngs):
        self.stride, self.padding = stride, pad
        self.kernel = make_param(rngs, _INIT, (3, 3, c_in, c_out), dtype, (None, None, "conv_in", "conv_out"))
        self.bias = make_param(rngs, nnx.initializers.zeros, (c_out,), dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, Ci) -> (B, F, H', W', Co)
        k = self.kernel[...]
        frames = rearrange(constrain_video(x.astype(k.dtype)), "b f h w c -> (b f) h w c")
        y = jax.lax.conv_general_dilated(frames, k, (self.stride,) * 2, self.padding, dimension_numbers=_CONV2D)
        return constrain_video(rearrange(y + self.bias[...], "(b f) h w c -> b f h w c", b=x.shape[0]))


class FrameGroupNorm(nnx.Module):
    """``nn.GroupNorm(32, C)`` applied to each frame separately (statistics per sample, frame and group over
    rows, columns and the group's channels), in fp32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), F32, ("norm",))
        self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), F32, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, C)
        xf = rearrange(x.astype(F32), "b f h w (g c) -> b f h w g c", g=NORM_GROUPS)
        mean = jnp.mean(xf, axis=(2, 3, 5), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(2, 3, 5), keepdims=True)
        y = rearrange((xf - mean) * jax.lax.rsqrt(var + EPS), "b f h w g c -> b f h w (g c)")
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """The original's Resnet3DBlock: norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (through a
    1x1x1 ``nin_shortcut`` when the width changes)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = FrameGroupNorm(in_dim, rngs=rngs)
        self.conv1 = causal_conv(in_dim, out_dim, dtype=dtype, rngs=rngs)
        self.norm2 = FrameGroupNorm(out_dim, rngs=rngs)
        self.conv2 = causal_conv(out_dim, out_dim, dtype=dtype, rngs=rngs)
        self.nin_shortcut = causal_conv(in_dim, out_dim, 1, dtype=dtype, rngs=rngs) if in_dim != out_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """Single-head softmax attention, query ``i`` seeing keys ``0..i`` (torch's ``is_causal=True``), scale
    1/sqrt(C). q, k, v (B, L, C). Queries go ``block`` at a time under ``lax.map``, so at most (B, block, L)
    scores exist at once (fp32); the (L, L) matrix is never built."""
    B, L, C = q.shape
    n = -(-L // block)
    size = min(block, L)
    qb = rearrange(jnp.pad(q, ((0, 0), (0, n * size - L), (0, 0))), "b (n q) c -> n b q c", q=size)
    kpos = jnp.arange(L)

    def one(args):
        i, qi = args
        s = jnp.einsum("bqc,bkc->bqk", qi, k, preferred_element_type=F32) * (C ** -0.5)
        qpos = i * size + jnp.arange(size)
        p = jax.nn.softmax(jnp.where(kpos[None, :] <= qpos[:, None], s, -jnp.inf), axis=-1)
        return jnp.einsum("bqk,bkc->bqc", p.astype(v.dtype), v, preferred_element_type=F32)

    out = jax.lax.map(one, (jnp.arange(n), qb))
    return rearrange(out, "n b q c -> b (n q) c")[:, :L].astype(q.dtype)


class AttnBlock(nnx.Module):
    """Per-frame GroupNorm, 1x1x1 q/k/v, token-causal attention over all (frame, row, column) positions, 1x1x1
    ``proj_out``, residual."""

    def __init__(self, dim: int, block: int, *, dtype, rngs: nnx.Rngs):
        self.block = block
        self.norm = FrameGroupNorm(dim, rngs=rngs)
        self.q, self.k, self.v, self.proj_out = (causal_conv(dim, dim, 1, dtype=dtype, rngs=rngs) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, C)
        _, T, H, _, _ = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(p(h), "b f h w c -> b (f h w) c") for p in (self.q, self.k, self.v))
        out = rearrange(causal_attention(q, k, v, self.block), "b (f h w) c -> b f h w c", f=T, h=H)
        return self.proj_out(out) + x


class MidBlock(nnx.Module):
    """block_1 -> attn_1 -> block_2 (the original's ``mid``)."""

    def __init__(self, dim: int, block: int, *, dtype, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(dim, dim, dtype=dtype, rngs=rngs)
        self.attn_1 = AttnBlock(dim, block, dtype=dtype, rngs=rngs)
        self.block_2 = ResnetBlock(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample2D(nnx.Module):
    """Per frame: zero-pad one row and column at the bottom/right, 3x3 conv with stride 2 (H -> H // 2 for even H)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(dim, dim, 2, ((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Downsample3D(nnx.Module):
    """Causal 3x3x3 conv with stride 2 in time and space (F -> ceil(F / 2), H -> ceil(H / 2))."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv = causal_conv(dim, dim, 3, (2, 2, 2), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Per frame: nearest 2x in space, then a 3x3 conv (zero padding 1)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(dim, dim, 1, ((1, 1), (1, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))


class Res3DBlockUpsample(nnx.Module):
    """conv1 -> norm1 -> SiLU -> conv2 -> norm2, then SiLU(h + x) + x (the original adds the input twice)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = causal_conv(dim, dim, dtype=dtype, rngs=rngs)
        self.norm1 = FrameGroupNorm(dim, rngs=rngs)
        self.conv2 = causal_conv(dim, dim, dtype=dtype, rngs=rngs)
        self.norm2 = FrameGroupNorm(dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm2(self.conv2(jax.nn.silu(self.norm1(self.conv1(x)))))
        return jax.nn.silu(h + x) + x


class Upsample3D(nnx.Module):
    """Nearest 2x in time and space (F -> 2F), then a ``Res3DBlockUpsample``."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv3d = Res3DBlockUpsample(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for axis in (1, 2, 3):
            x = jnp.repeat(x, 2, axis=axis)
        return self.conv3d(x)


# ---- 2x2x2 pixel-(un)shuffle and the parameter-free channel shortcuts ----------------------------------------
def pixel_unshuffle(x: jax.Array, f: int) -> jax.Array:
    """(B, F, H, W, C) -> (B, (F + f - 1) / f, H / f, W / f, C f^3): ``f - 1`` zero frames in front, then each
    f x f x f block into channels, ordered (c, t, h, w)."""
    x = jnp.pad(x, ((0, 0), (f - 1, 0), (0, 0), (0, 0), (0, 0))) if f > 1 else x
    return rearrange(x, "b (d ft) (h fh) (w fw) c -> b d h w (c ft fh fw)", ft=f, fh=f, fw=f)


def pixel_shuffle(x: jax.Array, f: int) -> jax.Array:
    """The inverse layout: (B, D, H, W, C f^3) -> (B, D f - (f - 1), H f, W f, C), the first ``f - 1`` frames dropped."""
    x = rearrange(x, "b d h w (c ft fh fw) -> b (d ft) (h fh) (w fw) c", ft=f, fh=f, fw=f)
    return x[:, f - 1:]


def averaging_shortcut(x: jax.Array, f: int, out: int) -> jax.Array:
    """PixelUnshuffleChannelAveragingDownSampleLayer3D: unshuffle, then the mean of each run of consecutive
    channels down to ``out``."""
    return reduce(pixel_unshuffle(x, f), "b d h w (o g) -> b d h w o", "mean", o=out)


def duplicating_shortcut(x: jax.Array, f: int, out: int) -> jax.Array:
    """ChannelDuplicatingPixelUnshuffleUpSampleLayer3D: every channel repeated in place (``repeat_interleave``)
    up to ``out f^3`` channels, then shuffled."""
    return pixel_shuffle(jnp.repeat(x, out * f**3 // x.shape[-1], axis=-1), f)


class ConvPixelUnshuffle(nnx.Module):
    """Causal conv to ``out / f^3`` channels, then ``pixel_unshuffle``."""

    def __init__(self, c_in: int, out: int, f: int, *, dtype, rngs: nnx.Rngs):
        self.f = f
        self.conv = causal_conv(c_in, out // f**3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return pixel_unshuffle(self.conv(x), self.f)


class ConvPixelShuffle(nnx.Module):
    """Causal conv to ``out f^3`` channels, then ``pixel_shuffle``."""

    def __init__(self, c_in: int, out: int, f: int, *, dtype, rngs: nnx.Rngs):
        self.f = f
        self.conv = causal_conv(c_in, out * f**3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return pixel_shuffle(self.conv(x), self.f)
