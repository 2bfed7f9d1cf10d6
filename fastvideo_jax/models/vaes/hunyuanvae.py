"""HunyuanVideo VAE (``AutoencoderKLHunyuanVideo``) in Flax NNX: 16 latent channels, 4x temporal and 8x spatial
compression, causal 3D convs with replicate padding, GroupNorm and a frame-causal mid-block attention.

The public API takes and returns PyTorch layout ``(B, C, F, H, W)``; inside, activations are channels-last.
The encoder and decoder see a whole clip at once (GroupNorm statistics and the mid-block attention span all
frames, so the Wan VAE's chunked, cached scan would compute a different function). Memory is bounded instead by
diffusers' tilings, reproduced here: temporal tiles (``use_framewise_encoding/decoding``, on by default as in
diffusers) and spatial tiles (``use_tiling``, or ``tiled=``), each run as one compiled call and blended.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.configs.models.vaes.hunyuanvae import HunyuanVAEArchConfig, HunyuanVAEConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.vaes.hunyuan_blocks import CausalConv3d, DownBlock, GroupNorm, MidBlock, UpBlock
from fastvideo_jax.models.vaes.latents import ScaledLatents
from fastvideo_jax.models.vaes.tiling import temporal_tile_and_blend, tile_and_blend
from fastvideo_jax.models.vaes.wan_blocks import PointwiseConv

__all__ = ["AutoencoderKLHunyuanVideo", "HunyuanVideoEncoder3D", "HunyuanVideoDecoder3D"]

LOGVAR_RANGE = (-30.0, 20.0)


class HunyuanVideoEncoder3D(nnx.Module):
    """conv_in -> down blocks (resnets, then a strided causal conv) -> mid block -> GroupNorm, SiLU, conv_out."""

    def __init__(self, cfg: HunyuanVAEArchConfig, *, dtype, rngs: nnx.Rngs):
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], n, g, stride, dtype=dtype, rngs=rngs)
            for i, stride in enumerate(cfg.strides)
        ])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(g, ch[-1], rngs=rngs)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, C) -> (B, T, h, w, 2z)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class HunyuanVideoDecoder3D(nnx.Module):
    """conv_in -> mid block -> up blocks (``layers_per_block + 1`` resnets, then upsampling) -> GroupNorm, SiLU,
    conv_out."""

    def __init__(self, cfg: HunyuanVAEArchConfig, *, dtype, rngs: nnx.Rngs):
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block + 1
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock(ch[max(i - 1, 0)], ch[i], n, g, stride, dtype=dtype, rngs=rngs)
            for i, stride in enumerate(cfg.strides)
        ])
        self.conv_norm_out = GroupNorm(g, ch[-1], rngs=rngs)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:  # (B, T, h, w, z) -> (B, F, H, W, C)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _encode_traced(model: "AutoencoderKLHunyuanVideo", x: jax.Array) -> jax.Array:
    """(B, C, F, H, W) video -> moments (B, 2z, T, h, w)."""
    dtype = to_dtype(model.config.precision)
    h = model.encoder(rearrange(x, "b c f h w -> b f h w c").astype(dtype))
    return rearrange(model.quant_conv(h), "b t h w c -> b c t h w")


def _decode_traced(model: "AutoencoderKLHunyuanVideo", z: jax.Array) -> jax.Array:
    """(B, z, T, h, w) -> video (B, C, 1 + 4(T-1), H, W)."""
    dtype = to_dtype(model.config.precision)
    z = model.post_quant_conv(rearrange(z, "b c t h w -> b t h w c").astype(dtype))
    return rearrange(model.decoder(z), "b f h w c -> b c f h w")


class AutoencoderKLHunyuanVideo(ScaledLatents, nnx.Module):
    """HunyuanVideo's video VAE. ``encode``/``decode`` take PyTorch layout (B, C, F, H, W), video in [-1, 1] (the
    decoded video is not clamped, as in diffusers); ``config.arch_config.spatial_compression_ratio`` /
    ``temporal_compression_ratio`` give the latent grid; ``denormalize_latents`` (z / scaling_factor) turns DiT
    latents into decoder input."""

    config_class = HunyuanVAEConfig

    def __init__(self, config: HunyuanVAEConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        self.config = config
        dtype = to_dtype(config.precision)
        z, z2, enc, dec = cfg.latent_channels, 2 * cfg.latent_channels, config.load_encoder, config.load_decoder
        self.encoder = HunyuanVideoEncoder3D(cfg, dtype=dtype, rngs=rngs) if enc else None
        self.quant_conv = PointwiseConv(z2, z2, rank=5, dtype=dtype, rngs=rngs) if enc else None
        self.post_quant_conv = PointwiseConv(z, z, rank=5, dtype=dtype, rngs=rngs) if dec else None
        self.decoder = HunyuanVideoDecoder3D(cfg, dtype=dtype, rngs=rngs) if dec else None

    # ---- one piece: spatial tiles or the whole frame -------------------------------------------------------
    def _encode_spatial(self, x: jax.Array, tiled: bool) -> jax.Array:  # (B, C, F, H, W) -> moments
        mc, r = self.config, self.config.arch_config.spatial_compression_ratio
        H, W = x.shape[3:]
        if not (tiled and (H > mc.tile_sample_min_height or W > mc.tile_sample_min_width)):
            return compiled_call(_encode_traced, self, x)
        tile = (mc.tile_sample_min_height, mc.tile_sample_min_width)
        stride = (mc.tile_sample_stride_height, mc.tile_sample_stride_width)
        keep = (stride[0] // r, stride[1] // r)
        extent = (tile[0] // r - keep[0], tile[1] // r - keep[1])
        encode = functools.partial(compiled_call, _encode_traced, self)
        return tile_and_blend(encode, x, tile, stride, extent, keep, (H // r, W // r))

    def _decode_spatial(self, z: jax.Array, tiled: bool) -> jax.Array:  # (B, z, T, h, w) -> video
        mc, r = self.config, self.config.arch_config.spatial_compression_ratio
        h, w = z.shape[3:]
        tile = (mc.tile_sample_min_height // r, mc.tile_sample_min_width // r)
        if not (tiled and (h > tile[0] or w > tile[1])):
            return compiled_call(_decode_traced, self, z)
        stride = (mc.tile_sample_stride_height // r, mc.tile_sample_stride_width // r)
        keep = (mc.tile_sample_stride_height, mc.tile_sample_stride_width)
        extent = (mc.tile_sample_min_height - keep[0], mc.tile_sample_min_width - keep[1])
        decode = functools.partial(compiled_call, _decode_traced, self)
        return tile_and_blend(decode, z, tile, stride, extent, keep, (h * r, w * r))

    # ---- public, PyTorch layout ------------------------------------------------------------------------
    def encode(self, x: jax.Array, *, tiled: bool | None = None, framewise: bool | None = None) -> jax.Array:
        """Video (B, C, F, H, W) in [-1, 1], F = 1 + 4k -> posterior mean (B, z, 1 + k, ceil(H/8), ceil(W/8))."""
        return self.encode_distribution(x, tiled=tiled, framewise=framewise)[0]

    def encode_distribution(
        self, x: jax.Array, *, tiled: bool | None = None, framewise: bool | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)``, each (B, z, T, h, w); logvar clipped to [-30, 20] as diffusers.
        ``framewise`` (default ``config.use_framewise_encoding``): clips longer than ``tile_sample_min_num_frames``
        are encoded in blended temporal tiles; ``tiled`` (default ``config.use_tiling``): frames larger than a
        tile in blended spatial tiles (inside each temporal tile), as diffusers' ``_encode``."""
        cfg, mc = self.config.arch_config, self.config
        if self.encoder is None:
            raise RuntimeError("AutoencoderKLHunyuanVideo.encode: the encoder was not loaded (load_encoder=False)")
        x = jnp.asarray(x)
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise UserError(f"AutoencoderKLHunyuanVideo.encode: expected video (B, {cfg.in_channels}, F, H, W), "
                             f"got {x.shape}")
        frames, rt = x.shape[2], cfg.temporal_compression_ratio
        if (frames - 1) % rt:
            raise UserError(f"AutoencoderKLHunyuanVideo.encode: got {frames} frames; the frame count must be 1 + "
                             f"{rt}k (1, 5, 9, ...)")
        tiled = mc.use_tiling if tiled is None else tiled
        framewise = mc.use_framewise_encoding if framewise is None else framewise
        if framewise and frames > mc.tile_sample_min_num_frames:
            tile, stride = mc.tile_sample_min_num_frames, mc.tile_sample_stride_num_frames
            keep = stride // rt
            moments = temporal_tile_and_blend(
                functools.partial(self._encode_spatial, tiled=tiled), x, tile, stride, tile // rt - keep, keep,
                (frames - 1) // rt + 1, lambda n: (n - 1) // rt + 1,
            )
        else:
            moments = self._encode_spatial(x, tiled)
        mean, logvar = jnp.split(moments, 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array, *, tiled: bool | None = None, framewise: bool | None = None) -> jax.Array:
        """Latents (B, z, T, h, w) -> video (B, C, 1 + 4(T-1), 8h, 8w), not clamped. ``framewise`` (default
        ``config.use_framewise_decoding``): more than ``tile_sample_min_num_frames / 4`` latent frames decode in
        blended temporal tiles; ``tiled`` (default ``config.use_tiling``): latents larger than a tile decode in
        blended spatial tiles (inside each temporal tile), as diffusers' ``_decode``."""
        cfg, mc = self.config.arch_config, self.config
        if self.decoder is None:
            raise RuntimeError("AutoencoderKLHunyuanVideo.decode: the decoder was not loaded (load_decoder=False)")
        z = jnp.asarray(z)
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            raise UserError(f"AutoencoderKLHunyuanVideo.decode: expected latents (B, {cfg.latent_channels}, T, h, w), "
                             f"got {z.shape}")
        rt, frames = cfg.temporal_compression_ratio, z.shape[2]
        tiled = mc.use_tiling if tiled is None else tiled
        framewise = mc.use_framewise_decoding if framewise is None else framewise
        tile = mc.tile_sample_min_num_frames // rt
        if framewise and frames > tile:
            stride = mc.tile_sample_stride_num_frames // rt
            keep = mc.tile_sample_stride_num_frames
            return temporal_tile_and_blend(
                functools.partial(self._decode_spatial, tiled=tiled), z, tile, stride,
                mc.tile_sample_min_num_frames - keep, keep, (frames - 1) * rt + 1, lambda n: (n - 1) * rt + 1,
            )
        return self._decode_spatial(z, tiled)


EntryClass = AutoencoderKLHunyuanVideo
