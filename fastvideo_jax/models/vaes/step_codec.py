"""The StepVideo VAE's encoder and decoder (the original's ``VideoEncoder`` / ``VideoDecoder``, version 2) on
one chunk, channels-last.

Encoder, on up to 17 frames: conv_in -> 4 levels of resnets (level 0 halves space per frame, levels 1 and 2
halve time and space with a strided causal conv) -> mid block -> GroupNorm, SiLU -> ``conv_patchify`` (a causal
conv and a 2x2x2 pixel-unshuffle) plus a channel-averaging shortcut -> ``conv_out`` plus another one; 17 frames
-> 3 latent frames of 2 z channels (mean, logvar), H -> H / 16.

Decoder, on up to 3 latent frames: conv_in plus a channel-duplicating shortcut -> ``conv_unpatchify`` (causal conv
and 2x2x2 pixel-shuffle, dropping the first frame) plus another one -> mid block -> 4 levels of ``num_res_blocks
+ 1`` resnets (levels 3 and 2 upsample 2x in time and space with a residual conv block, level 1 2x in space)
-> GroupNorm, SiLU, conv_out -> the first 3 frames dropped: L latent frames -> 8L - 7 frames (3 -> 17).
"""

from __future__ import annotations

import jax
from flax import nnx

from fastvideo_jax.configs.models.vaes.stepvideovae import LEVELS, StepVideoVAEArchConfig
from fastvideo_jax.models.vaes.step_blocks import (
    ConvPixelShuffle,
    ConvPixelUnshuffle,
    Downsample2D,
    Downsample3D,
    FrameGroupNorm,
    MidBlock,
    ResnetBlock,
    Upsample2D,
    Upsample3D,
    averaging_shortcut,
    causal_conv,
    duplicating_shortcut,
)

__all__ = ["VideoDecoder", "VideoEncoder"]

ENCODER_TEMPORAL_LEVELS = (1, 2)  # the original's down_sampling_layer
DECODER_TEMPORAL_LEVELS = (2, 3)  # the original's temporal_up_layers
DECODER_TRIM = 3  # temporal_downsample - 1 frames dropped at the end of a decode


class Level(nnx.Module):
    """``block`` (resnets) then an optional resampler, under the original's attribute names."""

    def __init__(self, dims: list[int], resample, name: str, *, dtype, rngs: nnx.Rngs):
        self.block = nnx.List([ResnetBlock(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims, dims[1:])])
        setattr(self, name, resample)
        self.resample_name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name)
        return x if resample is None else resample(x)


class VideoEncoder(nnx.Module):
    def __init__(self, cfg: StepVideoVAEArchConfig, attention_block: int, *, dtype, rngs: nnx.Rngs):
        ch, mult, n = cfg.encoder_ch, cfg.encoder_ch_mult, cfg.num_res_blocks
        widths = [ch * m for m in (1, *mult)]
        self.conv_in = causal_conv(cfg.in_channels, ch, dtype=dtype, rngs=rngs)
        levels = []
        for i in range(LEVELS):
            out = widths[i + 1]
            down = None
            if i != LEVELS - 1:
                down = (Downsample3D if i in ENCODER_TEMPORAL_LEVELS else Downsample2D)(out, dtype=dtype, rngs=rngs)
            levels.append(Level([widths[i]] + [out] * n, down, "downsample", dtype=dtype, rngs=rngs))
        self.down = nnx.List(levels)
        top = widths[-1]
        self.mid = MidBlock(top, attention_block, dtype=dtype, rngs=rngs)
        self.norm_out = FrameGroupNorm(top, rngs=rngs)
        self.patch, self.z2 = cfg.patch_channels, 2 * cfg.z_channels
        self.conv_patchify = ConvPixelUnshuffle(top, cfg.patch_channels, 2, dtype=dtype, rngs=rngs)
        self.conv_out = causal_conv(cfg.patch_channels, 2 * cfg.z_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, C) -> (B, T, H/16, W/16, 2z)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = jax.nn.silu(self.norm_out(self.mid(h)))
        h = self.conv_patchify(h) + averaging_shortcut(h, 2, self.patch)
        return self.conv_out(h) + averaging_shortcut(h, 1, self.z2)


class VideoDecoder(nnx.Module):
    def __init__(self, cfg: StepVideoVAEArchConfig, attention_block: int, *, dtype, rngs: nnx.Rngs):
        ch, mult, n = cfg.decoder_ch, cfg.decoder_ch_mult, cfg.num_res_blocks + 1
        top = ch * mult[-1]
        self.patch, self.top = cfg.patch_channels, top
        self.conv_in = causal_conv(cfg.z_channels, cfg.patch_channels, dtype=dtype, rngs=rngs)
        self.conv_unpatchify = ConvPixelShuffle(cfg.patch_channels, top, 2, dtype=dtype, rngs=rngs)
        self.mid = MidBlock(top, attention_block, dtype=dtype, rngs=rngs)
        levels, block_in = [None] * LEVELS, top
        for i in reversed(range(LEVELS)):
            out = ch * mult[i]
            up = None
            if i != 0:
                up = (Upsample3D if i in DECODER_TEMPORAL_LEVELS else Upsample2D)(out, dtype=dtype, rngs=rngs)
            levels[i] = Level([block_in] + [out] * n, up, "upsample", dtype=dtype, rngs=rngs)
            block_in = out
        self.up = nnx.List(levels)
        self.norm_out = FrameGroupNorm(block_in, rngs=rngs)
        self.conv_out = causal_conv(block_in, cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:  # (B, L, h, w, z) -> (B, 8L - 7, 16h, 16w, C)
        h = self.conv_in(z) + duplicating_shortcut(z, 1, self.patch)
        h = self.conv_unpatchify(h) + duplicating_shortcut(h, 2, self.top)
        h = self.mid(h)
        for i in reversed(range(LEVELS)):
            h = self.up[i](h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h[:, DECODER_TRIM:]
