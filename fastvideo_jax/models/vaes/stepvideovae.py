"""StepVideo VAE (``AutoencoderKLStepvideo``; StepFun's vae_v2) in Flax NNX: 64 latent channels, 16x16 spatial and
8x temporal compression, chunked as the original.

How the pipeline uses it (the contract of ``docs/add_model.md``, "A new VAE")::

    z = vae.denormalize_latents(latents)  # DiT latents (B, 64, T, h, w) -> decoder input: z / 1.0 (no shift)
    video = vae.decode(z)                 # (B, 3, vae.num_frames(T), 16 h, 16 w), about [-1, 1], not clamped

- Latent layout is PyTorch's (B, C, T, h, w), channels at axis 1 (FastVideo's; the original's StepFun/diffsynth
  code takes (B, T, C, h, w) and transposes). ``scaling_factor`` 1.0, no shift: ``denormalize_latents`` and
  ``normalize_latents`` are the identity at the release's config, kept for the contract.
- Decode runs chunks of ``latent_len = 3`` latent frames, each on its own (no cache across chunks), each chunk
  giving 17 frames; then, at every chunk boundary, the chunk's last frame and the next chunk's first frame are
  blended (each keeps ``smooth_scale = 0.6`` of itself), as the original's ``mix``. So T = 3n latent frames give
  17 n frames (36 -> 204, the release's length). A last chunk of 1 or 2 latent frames (allowed by the original's
  decode) gives 1 or 9 frames: ``num_frames(T) = 17 (T // 3) + (8 (T % 3) - 7 if T % 3 else 0)``. (FastVideo 0.1.7
  crops the video to 17 (T // 3) frames and blends the boundary frames one after the other, not at once; we
  follow StepFun's / diffsynth's decode.)
- Encode runs chunks of ``frame_len = 17`` frames (17 -> 3 latent frames; 1 frame -> 1; a last chunk must give
  an odd count after two 2x reductions: 1-4 -> 1, 9-12 -> 2 latent frames). H and W must be multiples of 16.
  ``encode`` returns the posterior mean (the original samples; ``sample`` draws).
- Every chunk is one compiled call (one compile per chunk length); the work inside splits over the mesh by rows
  and columns under ``decode_on_mesh`` (every conv is ``constrain_video``-d). ``decode(z, tiled=True)`` (or
  ``use_tiling``) decodes each chunk in DiffSynth's overlapping spatial tiles (34 latents every 16 by default),
  blended by linear masks: the same chunks and boundary blend, less memory, a slightly different video.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from fastvideo_jax.configs.models.vaes.stepvideovae import StepVideoVAEConfig
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.layers.compiled import compiled_call
from fastvideo_jax.models.vaes.latents import ScaledLatents
from fastvideo_jax.models.vaes.step_codec import VideoDecoder, VideoEncoder
from fastvideo_jax.models.vaes.tiling import masked_tile_average

__all__ = ["AutoencoderKLStepvideo", "mix_chunk_boundaries"]

LOGVAR_RANGE = (-30.0, 20.0)


def _encode_traced(model: "AutoencoderKLStepvideo", x: jax.Array) -> jax.Array:
    """One chunk: video (B, C, F, H, W) -> moments (B, 2z, T, h, w)."""
    x = rearrange(x, "b c f h w -> b f h w c").astype(to_dtype(model.config.precision))
    return rearrange(model.encoder(x), "b t h w c -> b c t h w")


def _decode_traced(model: "AutoencoderKLStepvideo", z: jax.Array) -> jax.Array:
    """One chunk: latents (B, z, L, h, w) -> video (B, C, 8L - 7, 16h, 16w)."""
    z = rearrange(z, "b c t h w -> b t h w c").astype(to_dtype(model.config.precision))
    return rearrange(model.decoder(z), "b f h w c -> b c f h w")


def mix_chunk_boundaries(video: jax.Array, frame_len: int, keep: float) -> jax.Array:
    """The original's ``mix``: frames ``k frame_len - 1`` and ``k frame_len`` (k >= 1) become ``keep`` of
    themselves plus ``1 - keep`` of each other, both from the unblended values. video (B, C, F, H, W)."""
    video = jnp.asarray(video)
    front = np.arange(frame_len - 1, video.shape[2] - 1, frame_len)
    if front.size == 0:
        return video
    a, b = video[:, :, front], video[:, :, front + 1]
    video = video.at[:, :, front].set(a * keep + b * (1.0 - keep))
    return video.at[:, :, front + 1].set(b * keep + a * (1.0 - keep))


def _encoded_frames(n: int) -> int | None:
    """Latent frames the encoder makes of an n-frame chunk, or None when the original cannot encode it (two
    causal stride-2 stages give ceil(n / 4) frames; the 2x pixel-unshuffle after one zero frame needs it odd)."""
    t = -(-n // 4)
    return (t + 1) // 2 if t % 2 else None


class AutoencoderKLStepvideo(ScaledLatents, nnx.Module):
    """StepVideo's video VAE. ``encode``/``decode`` take PyTorch layout (B, C, F, H, W), video in [-1, 1]."""

    config_class = StepVideoVAEConfig

    def __init__(self, config: StepVideoVAEConfig, *, rngs: nnx.Rngs):
        cfg = config.arch_config
        self.config = config
        dtype = to_dtype(config.precision)
        block = config.attention_block
        self.encoder = VideoEncoder(cfg, block, dtype=dtype, rngs=rngs) if config.load_encoder else None
        self.decoder = VideoDecoder(cfg, block, dtype=dtype, rngs=rngs) if config.load_decoder else None

    # ---- frame bookkeeping (for pipelines) -----------------------------------------------------------------
    def num_frames(self, latent_frames: int) -> int:
        """Video frames ``decode`` makes of ``latent_frames`` latent frames (3 -> 17, 36 -> 204, 4 -> 18)."""
        cfg = self.config.arch_config
        full, rest = divmod(latent_frames, cfg.latent_len)
        return cfg.frame_len * full + (rest * cfg.temporal_compression_ratio - 7 if rest else 0)

    def num_latent_frames(self, frames: int) -> int:
        """Latent frames ``encode`` makes of ``frames`` frames (17 -> 3, 204 -> 36); UserError if it cannot."""
        cfg = self.config.arch_config
        full, rest = divmod(frames, cfg.frame_len)
        tail = _encoded_frames(rest) if rest else 0
        if tail is None or frames < 1:
            raise UserError(f"AutoencoderKLStepvideo: cannot encode {frames} frames: the video is cut into "
                            f"{cfg.frame_len}-frame chunks and a last chunk of {rest} frames is not encodable "
                            "(it must have 1-4 or 9-12 frames)")
        return cfg.latent_len * full + tail

    # ---- public, PyTorch layout ------------------------------------------------------------------------
    def encode(self, x: jax.Array, *, tiled: bool | None = None) -> jax.Array:
        """Video (B, C, F, H, W) in [-1, 1] -> posterior mean (B, z, ``num_latent_frames(F)``, H/16, W/16)."""
        return self.encode_distribution(x, tiled=tiled)[0]

    def encode_distribution(self, x: jax.Array, *, tiled: bool | None = None) -> tuple[jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)``, each (B, z, T, h, w); logvar clipped to [-30, 20] as the original. The
        video is encoded in independent ``frame_len``-frame chunks, as the original."""
        cfg = self.config.arch_config
        if self.encoder is None:
            raise RuntimeError("AutoencoderKLStepvideo.encode: the encoder was not loaded (load_encoder=False)")
        self._no_tiling(tiled)
        x = jnp.asarray(x)
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise UserError(f"AutoencoderKLStepvideo.encode: expected video (B, {cfg.in_channels}, F, H, W), "
                            f"got {x.shape}")
        r = cfg.spatial_compression_ratio
        if x.shape[3] % r or x.shape[4] % r:
            raise UserError(f"AutoencoderKLStepvideo.encode: height and width must be multiples of {r}, got "
                            f"{x.shape[3]}x{x.shape[4]}")
        self.num_latent_frames(x.shape[2])  # raises before any work
        n = cfg.frame_len
        moments = jnp.concatenate([compiled_call(_encode_traced, self, x[:, :, i:i + n])
                                   for i in range(0, x.shape[2], n)], axis=2)
        mean, logvar = jnp.split(moments, 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array, *, tiled: bool | None = None) -> jax.Array:
        """Latents (B, z, T, h, w) -> video (B, C, ``num_frames(T)``, 16h, 16w), not clamped: chunks of
        ``latent_len`` latent frames decoded independently, their boundary frames blended (``smooth_scale``).
        ``tiled`` (default ``config.use_tiling``): each chunk in DiffSynth's blended spatial tiles."""
        cfg = self.config.arch_config
        if self.decoder is None:
            raise RuntimeError("AutoencoderKLStepvideo.decode: the decoder was not loaded (load_decoder=False)")
        z = jnp.asarray(z)
        if z.ndim != 5 or z.shape[1] != cfg.z_channels or z.shape[2] < 1:
            raise UserError(f"AutoencoderKLStepvideo.decode: expected latents (B, {cfg.z_channels}, T, h, w), "
                            f"got {z.shape}")
        mc, n = self.config, cfg.latent_len
        decode = functools.partial(compiled_call, _decode_traced, self)
        if tiled or (tiled is None and mc.use_tiling):
            r = cfg.spatial_compression_ratio
            tile = (mc.tile_sample_min_height // r, mc.tile_sample_min_width // r)
            stride = (mc.tile_sample_stride_height // r, mc.tile_sample_stride_width // r)
            decode = functools.partial(masked_tile_average, decode, tile=tile, stride=stride, scale=r)
        video = jnp.concatenate([decode(z[:, :, i:i + n]) for i in range(0, z.shape[2], n)], axis=2)
        return mix_chunk_boundaries(video, cfg.frame_len, mc.smooth_scale)

    def _no_tiling(self, tiled: bool | None) -> None:
        if tiled:  # config.use_tiling is a decode knob (as in diffsynth, whose encode has no tiling)
            raise UserError("AutoencoderKLStepvideo.encode: spatial tiling is not implemented for encoding (only "
                            "decode tiles); encode whole frames (tiled=False)")


EntryClass = AutoencoderKLStepvideo
