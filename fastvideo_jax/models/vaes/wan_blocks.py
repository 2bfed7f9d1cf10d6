"""Building blocks of the Wan VAE in Flax NNX: causal 3D conv, RMS norm, residual block, attention, resample.

Activations are channels-last ``(B, F, H, W, C)``. Every causal convolution with a temporal kernel of 3 reads
the last two frames of its input from the previous chunk (``CACHE_T``), through a ``FeatCache`` cursor that
visits the convolutions in call order, as diffusers' ``feat_cache``/``feat_idx`` do. On the first chunk the
past is zeros, which is exactly the causal zero padding of the original. Attribute names follow the
checkpoint, so the name mapping only renames ``resample.1`` to ``resample_conv``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.attention import attention
from fastvideo_jax.models.layers.linear import make_param
from fastvideo_jax.models.vaes.parallel_decode import constrain_video  # no-op without a mesh in scope

F32 = jnp.float32
CACHE_T = 2  # past frames a causal conv with temporal kernel 3 needs
_CONV3D = ("NDHWC", "DHWIO", "NDHWC")
_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # PyTorch's conv default


class FeatCache:
    """Cursor over the causal caches of one chunk: ``prev`` (None on the first chunk) in, ``new`` out.

    Modules call ``take`` then ``put`` once per cached convolution, in the same order every chunk, so the
    list of new caches has the same structure (and, after the first chunk, the same shapes) each time and can
    be the carry of ``lax.scan``.
    """

    def __init__(self, prev: list[jax.Array] | None = None):
        self.prev = prev
        self.new: list[jax.Array] = []

    @property
    def first(self) -> bool:
        return self.prev is None

    def take(self) -> jax.Array | None:
        return None if self.prev is None else self.prev[len(self.new)]

    def put(self, value: jax.Array) -> None:
        self.new.append(value)


class CausalConv3d(nnx.Module):
    """Conv3d, valid in time (past frames are prepended by the caller) and zero-padded in space."""

    def __init__(
        self, c_in: int, c_out: int, kernel: tuple[int, int, int] = (3, 3, 3), *,
        stride: tuple[int, int, int] = (1, 1, 1), dtype=F32, rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.pad_hw = (kernel[1] // 2, kernel[2] // 2)
        self.kernel = make_param(rngs, _INIT, (*kernel, c_in, c_out), dtype, (None, None, None, "conv_in", "conv_out"))
        self.bias = make_param(rngs, nnx.initializers.zeros, (c_out,), dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, Ci) -> (B, F', H, W, Co)
        k = self.kernel[...]
        (ph, pw) = self.pad_hw
        y = jax.lax.conv_general_dilated(
            constrain_video(x.astype(k.dtype)), k, self.stride, ((0, 0), (ph, ph), (pw, pw)), dimension_numbers=_CONV3D
        )
        return constrain_video(y + self.bias[...])

    def cached(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        """Causal conv (temporal kernel 3) of a chunk: the previous chunk's last ``CACHE_T`` inputs go in front."""
        past = cache.take()
        if past is None:
            past = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
        full = jnp.concatenate([past, x], axis=1)
        cache.put(full[:, -CACHE_T:])
        return self(full)


class Conv2d(nnx.Module):
    """Per-frame 2D conv with explicit spatial padding ``((top, bottom), (left, right))``."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, padding=((1, 1), (1, 1)), dtype=F32, rngs: nnx.Rngs):
        self.stride = stride
        self.padding = padding
        self.kernel = make_param(rngs, _INIT, (3, 3, c_in, c_out), dtype, (None, None, "conv_in", "conv_out"))
        self.bias = make_param(rngs, nnx.initializers.zeros, (c_out,), dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, Ci) -> (B, F, H', W', Co)
        k = self.kernel[...][None]  # a (1, 3, 3) 3D kernel: frames stay independent
        s = self.stride
        y = jax.lax.conv_general_dilated(
            constrain_video(x.astype(k.dtype)), k, (1, s, s), ((0, 0), *self.padding), dimension_numbers=_CONV3D
        )
        return constrain_video(y + self.bias[...])


class PointwiseConv(nnx.Module):
    """A 1x1 (2D or 3D) convolution, stored with the checkpoint's kernel rank, run as a matmul."""

    def __init__(self, c_in: int, c_out: int, *, rank: int, dtype=F32, rngs: nnx.Rngs):
        ones = (1,) * (rank - 2)
        axes = (*(None,) * len(ones), "conv_in", "conv_out")
        self.kernel = make_param(rngs, _INIT, (*ones, c_in, c_out), dtype, axes)
        self.bias = make_param(rngs, nnx.initializers.zeros, (c_out,), dtype, ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., Ci) -> (..., Co)
        k = self.kernel[...]
        k = k.reshape(k.shape[-2:])
        return jnp.einsum("...i,io->...o", x.astype(k.dtype), k) + self.bias[...]


class RMSNorm(nnx.Module):
    """Wan's ``RMS_norm``: L2-normalise over channels, times ``sqrt(C) * gamma``; parameter and math in fp32.

    ``gamma`` keeps the checkpoint's channel-first broadcast shape: ``(C, 1, 1, 1)`` for video, ``(C, 1, 1)``
    for the per-frame attention norm (``images``). There is no bias in Wan2.1 checkpoints.
    """

    def __init__(self, dim: int, *, images: bool = False, rngs: nnx.Rngs):
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = make_param(rngs, nnx.initializers.ones, shape, F32, ("norm", *(None,) * (len(shape) - 1)))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., C)
        xf = x.astype(F32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].reshape(-1).astype(F32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=F32, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(in_dim, rngs=rngs)
        self.conv1 = CausalConv3d(in_dim, out_dim, dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(out_dim, rngs=rngs)
        self.conv2 = CausalConv3d(out_dim, out_dim, dtype=dtype, rngs=rngs)
        shortcut = PointwiseConv(in_dim, out_dim, rank=5, dtype=dtype, rngs=rngs) if in_dim != out_dim else None
        self.conv_shortcut = shortcut

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, F, H, W, Ci) -> (B, F, H, W, Co)
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1.cached(jax.nn.silu(self.norm1(x)), cache)
        x = self.conv2.cached(jax.nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention within each frame (over H*W positions), with a residual."""

    def __init__(self, dim: int, *, dtype=F32, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, images=True, rngs=rngs)
        self.to_qkv = PointwiseConv(dim, 3 * dim, rank=4, dtype=dtype, rngs=rngs)
        self.proj = PointwiseConv(dim, dim, rank=4, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: FeatCache | None = None) -> jax.Array:  # (B, F, H, W, C)
        B, _, H = x.shape[:3]
        qkv = rearrange(self.to_qkv(self.norm(x)), "b f h w (three c) -> three (b f) (h w) 1 c", three=3)
        out = attention(qkv[0], qkv[1], qkv[2])
        out = rearrange(out, "(b f) (h w) 1 c -> b f h w c", b=B, h=H)
        return self.proj(out) + x


class Resample(nnx.Module):
    """Spatial x2 up/down-sampling per frame, with an optional causal temporal x2 (``time_conv``).

    ``upsample3d``: on the first chunk the frame passes through unchanged (diffusers' "Rep" state: that frame
    is never part of the time_conv history); later chunks run time_conv (2C channels) and interleave the two
    halves as consecutive frames. ``downsample3d``: the first chunk only stores its last frame; later chunks
    run the stride-2 time_conv over that frame followed by the chunk.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, dtype=F32, rngs: nnx.Rngs):
        if mode not in self.MODES:
            raise ValueError(f"Resample: mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample_conv = Conv2d(dim, out_dim or dim // 2, dtype=dtype, rngs=rngs)
        else:
            self.resample_conv = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
        time_conv = None
        if mode == "upsample3d":
            time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, rngs=rngs)
        elif mode == "downsample3d":
            time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), dtype=dtype, rngs=rngs)
        self.time_conv = time_conv

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, F, H, W, C)
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact) x2
        x = self.resample_conv(x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, F, ...) -> (B, 2F, ...), F at first
        if cache.first:
            cache.put(jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype))
            return x
        y = self.time_conv.cached(x, cache)
        return rearrange(y, "b f h w (two c) -> b (f two) h w c", two=2)

    def _time_downsample(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, F, ...) -> (B, F/2, ...), F at first
        past = cache.take()
        cache.put(x[:, -1:])
        if past is None:
            return x
        return self.time_conv(jnp.concatenate([past, x], axis=1))


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet, at the lowest resolution."""

    def __init__(self, dim: int, *, dtype=F32, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)
