"""Building blocks of the HunyuanVideo VAE in Flax NNX: causal 3D conv (replicate padding), GroupNorm, resnet,
frame-causal mid-block attention, down/up samplers.

Activations are channels-last ``(B, F, H, W, C)``. Unlike the Wan VAE, nothing here is frame-chunked: every
GroupNorm takes its statistics over all frames and the mid-block attention lets each frame attend to all
earlier ones, so a chunked scan with a feature cache would change the function. The whole clip (or one
temporal tile of it, see ``hunyuanvae``) goes through at once, as in diffusers. Attribute names follow the
checkpoint (``conv1.conv.weight`` -> ``conv1.conv.kernel``), so the name mapping is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention import attention
from fastvideo_jax.models.layers.linear import Linear, make_param
from fastvideo_jax.models.vaes.parallel_decode import constrain_video  # no-op without a mesh in scope

F32 = jnp.float32
EPS = 1e-6
_CONV3D = ("NDHWC", "DHWIO", "NDHWC")
_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # PyTorch's conv default


class Conv3d(nnx.Module):
    """A plain (valid) Conv3d: ``kernel`` (k, k, k, Ci, Co) and ``bias``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: tuple[int, int, int], *, dtype, rngs: nnx.Rngs):
        self.stride = stride
        self.kernel = make_param(rngs, _INIT, (kernel,) * 3 + (c_in, c_out), dtype,
                                 (None, None, None, "conv_in", "conv_out"))
        self.bias = make_param(rngs, nnx.initializers.zeros, (c_out,), dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, Ci) -> (B, F', H', W', Co)
        k = self.kernel[...]
        y = jax.lax.conv_general_dilated(constrain_video(x.astype(k.dtype)), k, self.stride, "VALID",
                                         dimension_numbers=_CONV3D)
        return constrain_video(y + self.bias[...])


class CausalConv3d(nnx.Module):
    """Pad ``k - 1`` frames in front and ``k // 2`` rows/columns on each side, then a valid conv (cubic kernel,
    stride (t, s, s)). ``pad_mode="edge"`` repeats the first frame and the edges (diffusers'
    ``HunyuanVideoCausalConv3d``); ``"constant"`` pads zeros (StepVideo's causal convs)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1), *, dtype,
                 rngs: nnx.Rngs, pad_mode: str = "edge"):
        self.pad, self.pad_mode = (kernel - 1, kernel // 2), pad_mode
        self.conv = Conv3d(c_in, c_out, kernel, stride, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        t, s = self.pad
        if t or s:
            x = jnp.pad(x, ((0, 0), (t, 0), (s, s), (s, s), (0, 0)), mode=self.pad_mode)
        return self.conv(x)


class GroupNorm(nnx.Module):
    """``nn.GroupNorm`` on channels-last input: statistics per (sample, group) over every other axis (all frames
    and positions), in fp32; ``scale``/``bias`` are the checkpoint's ``weight``/``bias``."""

    def __init__(self, groups: int, dim: int, *, rngs: nnx.Rngs):
        self.groups = groups
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), F32, ("norm",))
        self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), F32, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, ..., C)
        xf = rearrange(x.astype(F32), "b ... (g c) -> b ... g c", g=self.groups)
        axes = tuple(i for i in range(1, xf.ndim) if i != xf.ndim - 2)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = rearrange((xf - mean) * jax.lax.rsqrt(var + EPS), "b ... g c -> b ... (g c)")
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1x1 causal conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_dim, rngs=rngs)
        self.conv1 = CausalConv3d(in_dim, out_dim, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_dim, rngs=rngs)
        self.conv2 = CausalConv3d(out_dim, out_dim, dtype=dtype, rngs=rngs)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, dtype=dtype, rngs=rngs) if in_dim != out_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class FrameCausalAttention(nnx.Module):
    """Single-head self-attention over all (frame, row, column) positions, residual, with diffusers' mask: a
    position in frame t attends to every position of frames 0..t. Run as one attention call per query frame
    whose keys are a prefix (``kv_lengths``), under ``lax.map``: the (L, L) mask is never built."""

    def __init__(self, dim: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, dim, rngs=rngs)
        axes = ("conv_in", "conv_out")
        self.to_q = Linear(dim, dim, axes=axes, param_dtype=dtype, rngs=rngs)
        self.to_k = Linear(dim, dim, axes=axes, param_dtype=dtype, rngs=rngs)
        self.to_v = Linear(dim, dim, axes=axes, param_dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(dim, dim, axes=axes, param_dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, C)
        B, T, H, W, _ = x.shape
        h = self.group_norm(x)
        q, k, v = (rearrange(p(h), "b f h w c -> b (f h w) 1 c") for p in (self.to_q, self.to_k, self.to_v))
        if T == 1:
            out = attention(q, k, v)
        else:
            hw = H * W
            frames = rearrange(q, "b (f l) n c -> f b l n c", f=T)
            lengths = (jnp.arange(1, T + 1, dtype=jnp.int32) * hw)[:, None].repeat(B, axis=1)  # (T, B)
            out = jax.lax.map(lambda a: attention(a[0], k, v, kv_lengths=a[1]), (frames, lengths))
            out = rearrange(out, "f b l n c -> b (f l) n c")
        out = rearrange(out, "b (f h w) 1 c -> b f h w c", f=T, h=H)
        return self.to_out[0](out) + x


class Downsample(nnx.Module):
    """Causal conv with stride (t, s, s) and no extra padding (diffusers' ``downsample_padding=0``)."""

    def __init__(self, dim: int, stride: tuple[int, int], *, dtype, rngs: nnx.Rngs):
        t, s = stride
        self.conv = CausalConv3d(dim, dim, 3, (t, s, s), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest x(t, s, s) upsampling then a causal conv; the first frame is only upsampled in space (so F
    frames become 1 + t(F - 1))."""

    def __init__(self, dim: int, stride: tuple[int, int], *, dtype, rngs: nnx.Rngs):
        self.stride = stride
        self.conv = CausalConv3d(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        t, s = self.stride
        x = jnp.repeat(jnp.repeat(x, s, axis=2), s, axis=3)
        if t > 1 and x.shape[1] > 1:
            x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], t, axis=1)], axis=1)
        return self.conv(x)


class DownBlock(nnx.Module):
    """``layers`` resnets, then an optional downsampler (stride (1, 1) means none)."""

    def __init__(self, in_dim: int, out_dim: int, layers: int, groups: int, stride: tuple[int, int], *, dtype,
                 rngs: nnx.Rngs):
        dims = [in_dim] + [out_dim] * layers
        self.resnets = nnx.List([ResnetBlock(a, b, groups, dtype=dtype, rngs=rngs) for a, b in zip(dims, dims[1:])])
        self.downsamplers = (nnx.List([Downsample(out_dim, stride, dtype=dtype, rngs=rngs)])
                             if stride != (1, 1) else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nnx.Module):
    """``layers`` resnets, then an optional upsampler (stride (1, 1) means none)."""

    def __init__(self, in_dim: int, out_dim: int, layers: int, groups: int, stride: tuple[int, int], *, dtype,
                 rngs: nnx.Rngs):
        dims = [in_dim] + [out_dim] * layers
        self.resnets = nnx.List([ResnetBlock(a, b, groups, dtype=dtype, rngs=rngs) for a, b in zip(dims, dims[1:])])
        self.upsamplers = nnx.List([Upsample(out_dim, stride, dtype=dtype, rngs=rngs)]) if stride != (1, 1) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nnx.Module):
    """resnet -> (frame-causal attention) -> resnet, at the lowest resolution."""

    def __init__(self, dim: int, groups: int, add_attention: bool, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(dim, dim, groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = (nnx.List([FrameCausalAttention(dim, groups, dtype=dtype, rngs=rngs)])
                           if add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)
