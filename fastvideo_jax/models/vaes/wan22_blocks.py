"""Wan2.2 VAE pieces in Flax NNX: 2x2 patchify, the parameter-free shortcuts, residual down/up stages.

Activations are channels-last ``(B, F, H, W, C)`` as in ``wan_blocks``. A Wan2.2 stage is a ``wan_blocks``
stage (residual blocks, then a resampler) plus a shortcut around the whole stage that has no parameters: the
encoder's averages groups of the (time, row, column) neighbourhood folded into channels, the decoder's
duplicates channels and unfolds them into that neighbourhood. Channel orders follow the checkpoint: the
flattened ``(c, t, row, col)`` index, grouped consecutively.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from flax import nnx

from fastvideo_jax.models.vaes.wan_blocks import F32, FeatCache, Resample, ResidualBlock

__all__ = ["ResidualDownBlock", "ResidualUpBlock", "avg_down", "dup_up", "patchify", "unpatchify"]

# (pixels, patches) per layout; the patch channel order is (c, column, row), the checkpoint's.
_PATCH = {
    "channels_last": ("b f (h ph) (w pw) c", "b f h w (c pw ph)"),
    "channels_first": ("b c f (h ph) (w pw)", "b (c pw ph) f h w"),
}


def patchify(x: jax.Array, p: int, layout: str = "channels_last") -> jax.Array:
    """Fold each p x p pixel patch into channels: (.., H, W, C) -> (.., H/p, W/p, C*p*p)."""
    if p == 1:
        return x
    pixels, patches = _PATCH[layout]
    return rearrange(x, f"{pixels} -> {patches}", ph=p, pw=p)


def unpatchify(x: jax.Array, p: int, layout: str = "channels_last") -> jax.Array:
    """The inverse of :func:`patchify`."""
    if p == 1:
        return x
    pixels, patches = _PATCH[layout]
    return rearrange(x, f"{patches} -> {pixels}", ph=p, pw=p)


def avg_down(x: jax.Array, out_dim: int, ft: int, fs: int) -> jax.Array:
    """diffusers' ``AvgDown3D``: (B, F, H, W, C) -> (B, ceil(F/ft), H/fs, W/fs, out_dim). Frames are zero-padded
    at the front to a multiple of ``ft``; each output channel is the mean of a consecutive group of the
    flattened (c, t, row, col) neighbourhood."""
    pad = -x.shape[1] % ft
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    y = rearrange(x, "b (t ft) (h fh) (w fw) c -> b t h w (c ft fh fw)", ft=ft, fh=fs, fw=fs)
    y = rearrange(y, "b t h w (o g) -> b t h w o g", o=out_dim)
    return jnp.mean(y.astype(F32), axis=-1).astype(x.dtype)


def dup_up(x: jax.Array, out_dim: int, ft: int, fs: int, *, first: bool) -> jax.Array:
    """diffusers' ``DupUp3D``: (B, T, h, w, C) -> (B, T*ft, h*fs, w*fs, out_dim). Each channel is repeated and
    the copies unfolded into the (t, row, col) neighbourhood; on the first chunk the ``ft - 1`` leading frames
    are dropped (the causal first frame is not upsampled in time)."""
    y = repeat(x, "b t h w c -> b t h w (c r)", r=out_dim * ft * fs * fs // x.shape[-1])
    y = rearrange(y, "b t h w (o ft fh fw) -> b (t ft) (h fh) (w fw) o", ft=ft, fh=fs, fw=fs)
    return y[:, ft - 1 :] if first else y


def _check_groups(kind: str, c_from: int, c_to: int, factor: int) -> None:
    if (c_from * factor) % c_to:
        raise ValueError(
            f"{kind}: {c_from} channels x a {factor}-fold neighbourhood do not divide into {c_to} channels "
            "(check base_dim / decoder_base_dim / dim_mult)"
        )


class ResidualDownBlock(nnx.Module):
    """``num_res_blocks`` residual blocks and a spatial (optionally also temporal) x2 downsampler, plus the
    average-pool shortcut from the stage input. The last stage has no downsampler and an identity-sized pool."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, *, temporal: bool, down: bool, dtype=F32,
        rngs: nnx.Rngs,
    ):
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if down else 1
        _check_groups("ResidualDownBlock", in_dim, out_dim, self.ft * self.fs * self.fs)
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nnx.List([ResidualBlock(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        mode = "downsample3d" if temporal else "downsample2d"
        self.downsampler = Resample(out_dim, mode, dtype=dtype, rngs=rngs) if down else None

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, F, H, W, Ci) -> (B, F', H/fs, W/fs, Co)
        y = x
        for resnet in self.resnets:
            y = resnet(y, cache)
        if self.downsampler is not None:
            y = self.downsampler(y, cache)
        return y + avg_down(x, self.out_dim, self.ft, self.fs)


class ResidualUpBlock(nnx.Module):
    """``num_res_blocks + 1`` residual blocks and a x2 upsampler keeping ``out_dim`` channels, plus the
    duplicating shortcut from the stage input (only on stages that upsample)."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, *, temporal: bool, up: bool, dtype=F32,
        rngs: nnx.Rngs,
    ):
        self.out_dim, self.ft, self.up = out_dim, 2 if temporal else 1, up
        if up:
            _check_groups("ResidualUpBlock", out_dim, in_dim, self.ft * 4)
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        mode = "upsample3d" if temporal else "upsample2d"
        self.upsampler = Resample(out_dim, mode, out_dim, dtype=dtype, rngs=rngs) if up else None

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, T, h, w, Ci) -> (B, T', 2h, 2w, Co)
        first = cache.first
        y = x
        for resnet in self.resnets:
            y = resnet(y, cache)
        if self.upsampler is None:
            return y
        return self.upsampler(y, cache) + dup_up(x, self.out_dim, self.ft, 2, first=first)
