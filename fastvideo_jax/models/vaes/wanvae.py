"""Wan VAE (``AutoencoderKLWan``) in Flax NNX: Wan2.1 (16 latent channels, 4x8x8 compression) and Wan2.2
(48 channels, 4x16x16: residual stages and 2x2 patchify, see ``wan22_blocks``).

The public API takes and returns PyTorch layout ``(B, C, F, H, W)``; inside, activations are channels-last.
As in the original, time is processed in chunks with a causal feature cache: the encoder sees the first frame
and then groups of 4 frames, the decoder one latent frame at a time. Chunk 0 runs on its own (its resample
layers behave differently and it fixes the cache shapes); the remaining, uniform chunks run under
``lax.scan`` with the cache list as carry, so compile time and memory do not grow with clip length.
Optional spatial tiling reproduces diffusers' ``tiled_encode``/``tiled_decode`` (linear blending).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from fastvideo_jax.configs.models.vaes.wanvae import WanVAEArchConfig, WanVAEConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.vaes.latents import gaussian_sample
from fastvideo_jax.models.vaes.tiling import tile_and_blend
from fastvideo_jax.models.vaes.wan22_blocks import ResidualDownBlock, ResidualUpBlock, patchify, unpatchify
from fastvideo_jax.models.vaes.wan_blocks import (
    AttentionBlock,
    CausalConv3d,
    FeatCache,
    MidBlock,
    PointwiseConv,
    Resample,
    ResidualBlock,
    RMSNorm,
)

__all__ = ["AutoencoderKLWan", "Encoder3d", "Decoder3d"]

ENCODE_CHUNK = 4  # frames per encoder step after the first frame
LOGVAR_RANGE = (-30.0, 20.0)


class Encoder3d(nnx.Module):
    """conv_in -> [residual (+attention) blocks, downsample] per stage -> mid block -> norm, SiLU, conv_out."""

    def __init__(self, cfg: WanVAEArchConfig, *, dtype, rngs: nnx.Rngs):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], dtype=dtype, rngs=rngs)
        layers: list[nnx.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(cfg.dim_mult) - 1
            if cfg.is_residual:  # Wan2.2: one stage per level (diffusers ignores attn_scales here)
                temporal = cfg.temperal_downsample[i] if not last else False
                layers.append(ResidualDownBlock(in_dim, out_dim, cfg.num_res_blocks, temporal=temporal, down=not last,
                                                dtype=dtype, rngs=rngs))
                continue
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
                if scale in cfg.attn_scales:  # built as diffusers does; Wan checkpoints have attn_scales=[]
                    layers.append(AttentionBlock(out_dim, dtype=dtype, rngs=rngs))
                in_dim = out_dim
            if not last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                layers.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs))
                scale /= 2.0
        self.down_blocks = nnx.List(layers)
        self.mid_block = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, F, H, W, C) -> (B, F', h, w, 2z)
        x = self.conv_in.cached(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out.cached(jax.nn.silu(self.norm_out(x)), cache)


class UpBlock(nnx.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, *, dtype, rngs: nnx.Rngs):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List(
            [ResidualBlock(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.upsamplers = None if mode is None else nnx.List([Resample(out_dim, mode, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsamplers is None else self.upsamplers[0](x, cache)


class Decoder3d(nnx.Module):
    """conv_in -> mid block -> up blocks (Wan2.1: each upsampler halves the channels; Wan2.2: residual stages
    that keep them) -> norm, SiLU, conv_out."""

    def __init__(self, cfg: WanVAEArchConfig, *, dtype, rngs: nnx.Rngs):
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(dims[0], dtype=dtype, rngs=rngs)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != len(mult) - 1
            temporal = up and cfg.temperal_upsample[i]
            if cfg.is_residual:
                blocks.append(ResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, temporal=temporal, up=up,
                                              dtype=dtype, rngs=rngs))
                continue
            in_dim = in_dim // 2 if i > 0 else in_dim
            mode = ("upsample3d" if temporal else "upsample2d") if up else None
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:  # (B, T, h, w, z) -> (B, F, H, W, C)
        x = self.conv_in.cached(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out.cached(jax.nn.silu(self.norm_out(x)), cache)


def _check_tile_sizes(size: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int], multiple: int) -> None:
    """Every encode tile (full and edge) must be a multiple of ``multiple`` (the residual encoder's pooling)."""
    for n, t, s, name in zip(size, tile, stride, ("height", "width")):
        sides = {min(t, n - i) for i in range(0, n, s)}
        if any(side % multiple for side in sides):
            raise ValueError(
                f"AutoencoderKLWan.encode: tiles of {t} and a stride of {s} (tile_sample_min_{name}, "
                f"tile_sample_stride_{name}, patchified pixels) cut {n} into sides {sorted(sides)}; each must be a "
                f"multiple of {multiple}"
            )


def _encode_traced(model: "AutoencoderKLWan", x: jax.Array, *, patched: bool = False) -> jax.Array:
    """(B, C, F, H, W) video (``patched``: already patchified) -> moments (B, 2z, T, h, w)."""
    x = rearrange(x, "b c f h w -> b f h w c")
    moments = model.encode_patches_cl(x) if patched else model.encode_moments_cl(x)
    return rearrange(moments, "b t h w c -> b c t h w")


def _decode_traced(model: "AutoencoderKLWan", z: jax.Array, *, patched: bool = False) -> jax.Array:
    """(B, z, T, h, w) -> video (B, C, F, H, W) (``patched``: left patchified)."""
    z = rearrange(z, "b c t h w -> b t h w c")
    video = model.decode_patches_cl(z) if patched else model.decode_cl(z)
    return rearrange(video, "b f h w c -> b c f h w")


class AutoencoderKLWan(nnx.Module):
    """Wan2.1 / Wan2.2 video VAE. ``encode``/``decode`` take PyTorch layout (B, C, F, H, W), video in [-1, 1];
    ``config.arch_config.spatial_compression_ratio`` / ``temporal_compression_ratio`` give the latent grid."""

    config_class = WanVAEConfig

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        self.config = config
        dtype = to_dtype(config.precision)
        z2, enc, dec = 2 * cfg.z_dim, config.load_encoder, config.load_decoder
        self.encoder = Encoder3d(cfg, dtype=dtype, rngs=rngs) if enc else None
        self.quant_conv = PointwiseConv(z2, z2, rank=5, dtype=dtype, rngs=rngs) if enc else None
        self.post_quant_conv = PointwiseConv(cfg.z_dim, cfg.z_dim, rank=5, dtype=dtype, rngs=rngs) if dec else None
        self.decoder = Decoder3d(cfg, dtype=dtype, rngs=rngs) if dec else None

    # ---- traced, channels-last -------------------------------------------------------------------------
    def _chunked(self, net: nnx.Module, x: jax.Array, chunk: int) -> jax.Array:
        """``net`` over frame 0, then over chunks of ``chunk`` frames under ``lax.scan`` (cache as carry)."""
        cache = FeatCache()
        first = net(x[:, :1], cache)
        rest = x[:, 1:]
        if rest.shape[1] == 0:
            return first
        t = chunk if self.config.use_feature_cache else rest.shape[1]
        chunks = rearrange(rest, "b (n t) h w c -> n b t h w c", t=t)

        def step(prev: list[jax.Array], xc: jax.Array) -> tuple[list[jax.Array], jax.Array]:
            c = FeatCache(prev)
            y = net(xc, c)
            return c.new, y

        _, ys = jax.lax.scan(step, cache.new, chunks)
        return jnp.concatenate([first, rearrange(ys, "n b t h w c -> b (n t) h w c")], axis=1)

    def encode_moments_cl(self, x: jax.Array) -> jax.Array:  # (B, F, H, W, C) -> (B, T, h, w, 2z)
        return self.encode_patches_cl(patchify(x, self.config.arch_config.patch))

    def encode_patches_cl(self, x: jax.Array) -> jax.Array:  # patchified (B, F, H/p, W/p, C*p*p) -> moments
        dtype = to_dtype(self.config.precision)
        return self.quant_conv(self._chunked(self.encoder, x.astype(dtype), ENCODE_CHUNK))

    def decode_cl(self, z: jax.Array) -> jax.Array:  # (B, T, h, w, z) -> (B, F, H, W, C), not clamped
        return unpatchify(self.decode_patches_cl(z), self.config.arch_config.patch)

    def decode_patches_cl(self, z: jax.Array) -> jax.Array:  # (B, T, h, w, z) -> (B, F, H/p, W/p, C*p*p)
        dtype = to_dtype(self.config.precision)
        return self._chunked(self.decoder, self.post_quant_conv(z.astype(dtype)), 1)

    # ---- public, PyTorch layout ------------------------------------------------------------------------
    def encode(self, x: jax.Array, *, tiled: bool | None = None) -> jax.Array:
        """Video (B, C, F, H, W) in [-1, 1], F = 1 + 4k -> posterior mean (B, z, 1 + k, H/s, W/s), s the
        spatial compression (8 for Wan2.1, 16 for Wan2.2)."""
        return self.encode_distribution(x, tiled=tiled)[0]

    def encode_distribution(self, x: jax.Array, *, tiled: bool | None = None) -> tuple[jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)``, each (B, z, T, h, w); logvar clipped to [-30, 20] as diffusers.
        ``tiled`` (default ``config.use_tiling``) splits frames larger than a tile as diffusers' tiled_encode.
        With a patch (Wan2.2) diffusers compares the video's size with the tile but then tiles the
        patchified frames (tile sizes and strides count patchified pixels); so does this."""
        cfg, mc = self.config.arch_config, self.config
        if self.encoder is None:
            raise RuntimeError("AutoencoderKLWan.encode: the encoder was not loaded (load_encoder=False)")
        x = jnp.asarray(x)
        c = cfg.video_channels
        if x.ndim != 5 or x.shape[1] != c:
            raise ValueError(f"AutoencoderKLWan.encode: expected video (B, {c}, F, H, W), got {x.shape}")
        frames, H, W = x.shape[2:]
        if (frames - 1) % cfg.temporal_compression_ratio:
            raise ValueError(
                f"AutoencoderKLWan.encode: got {frames} frames; the frame count must be 1 + 4k (1, 5, 9, ...)"
            )
        m, p = cfg.encode_size_multiple, cfg.patch
        if H % m or W % m:
            raise ValueError(f"AutoencoderKLWan.encode: got {H}x{W} frames; this VAE encodes heights and widths "
                             f"that are multiples of {m}")
        r = cfg.spatial_compression_ratio // p  # patchified pixels per latent
        use_tiles = mc.use_tiling if tiled is None else tiled
        if use_tiles and (H > mc.tile_sample_min_height or W > mc.tile_sample_min_width):
            tile = (mc.tile_sample_min_height, mc.tile_sample_min_width)
            stride = (mc.tile_sample_stride_height, mc.tile_sample_stride_width)
            keep = (stride[0] // r, stride[1] // r)
            blend = (tile[0] // r - keep[0], tile[1] // r - keep[1])
            x = patchify(x, p, "channels_first")
            _check_tile_sizes(x.shape[3:], tile, stride, m // p)
            encode = functools.partial(compiled_call, _encode_traced, self, patched=True)
            moments = tile_and_blend(encode, x, tile, stride, blend, keep, (x.shape[3] // r, x.shape[4] // r))
        else:
            moments = compiled_call(_encode_traced, self, x)
        mean, logvar = jnp.split(moments, 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array, *, tiled: bool | None = None) -> jax.Array:
        """Latents (B, z, T, h, w) -> video (B, C, 1 + 4(T-1), s*h, s*w), clamped to [-1, 1] (``clip_output``).
        ``tiled`` (default ``config.use_tiling``) splits latents larger than a tile as diffusers' tiled_decode
        (tiles blended in patchified pixels, then unpatchified)."""
        cfg, mc = self.config.arch_config, self.config
        if self.decoder is None:
            raise RuntimeError("AutoencoderKLWan.decode: the decoder was not loaded (load_decoder=False)")
        z = jnp.asarray(z)
        if z.ndim != 5:
            raise ValueError(f"AutoencoderKLWan.decode: expected latents (B, {cfg.z_dim}, T, h, w), got {z.shape}")
        if z.shape[1] != cfg.z_dim:
            raise ValueError(
                f"AutoencoderKLWan.decode: expected {cfg.z_dim} latent channels, got {z.shape[1]} (shape {z.shape})"
            )
        h, w = z.shape[3:]
        r, p = cfg.spatial_compression_ratio, cfg.patch
        tile = (mc.tile_sample_min_height // r, mc.tile_sample_min_width // r)
        use_tiles = mc.use_tiling if tiled is None else tiled
        if use_tiles and (h > tile[0] or w > tile[1]):
            keep = (mc.tile_sample_stride_height // p, mc.tile_sample_stride_width // p)
            stride = (mc.tile_sample_stride_height // r, mc.tile_sample_stride_width // r)
            blend = (mc.tile_sample_min_height // p - keep[0], mc.tile_sample_min_width // p - keep[1])
            decode = functools.partial(compiled_call, _decode_traced, self, patched=True)
            video = tile_and_blend(decode, z, tile, stride, blend, keep, (h * r // p, w * r // p))
            video = unpatchify(video, p, "channels_first")
        else:
            video = compiled_call(_decode_traced, self, z)
        return jnp.clip(video, -1.0, 1.0) if cfg.clip_output else video

    # ---- latent normalisation ----------------------------------------------------------------------------
    def _stats(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config.arch_config
        shape = (1, cfg.z_dim) + (1,) * (z.ndim - 2)
        mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(shape)
        std = jnp.asarray(cfg.latents_std, jnp.float32).reshape(shape)
        return mean, std

    def normalize_latents(self, z: jax.Array) -> jax.Array:
        """(z - latents_mean) / latents_std per channel (B, z, ...): VAE latents -> DiT latents."""
        mean, std = self._stats(z)
        return ((z.astype(jnp.float32) - mean) / std).astype(z.dtype)

    def denormalize_latents(self, z: jax.Array) -> jax.Array:
        """z * latents_std + latents_mean per channel: DiT latents -> VAE latents (before ``decode``)."""
        mean, std = self._stats(z)
        return (z.astype(jnp.float32) * std + mean).astype(z.dtype)

    sample = staticmethod(gaussian_sample)


EntryClass = AutoencoderKLWan
