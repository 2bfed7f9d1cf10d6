"""Wan VAE (``AutoencoderKLWan``) configuration: checkpoint fields, name mappings and presets."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from fastvideo_jax.configs.models.base import derived, internal
from fastvideo_jax.configs.models.dits.base import NameMapping
from fastvideo_jax.configs.models.vaes.base import VAEArchConfig, VAEConfig

# Diffusers name -> ours. ``resample`` is an ``nn.Sequential`` (index 0 is the parameter-free pad/upsample,
# index 1 the Conv2d); NNX attributes cannot be digits, so the conv is our ``resample_conv``.
WAN_VAE_PARAM_NAMES_MAPPING: NameMapping = ((r"^(.*)\.resample\.1\.(weight|bias)$", r"\1.resample_conv.\2"),)

# Ours -> Diffusers, for export.
WAN_VAE_REVERSE_PARAM_NAMES_MAPPING: NameMapping = ((r"^(.*)\.resample_conv\.(weight|bias)$", r"\1.resample.1.\2"),)

# Per-channel latent statistics of the Wan2.1 VAE (the diffusers defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# The Wan2.2 VAE's (48 channels; Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclasses.dataclass(frozen=True)
class WanVAEArchConfig(VAEArchConfig):
    """``AutoencoderKLWan`` config.json fields (defaults: the Wan2.1 VAE, 16 channels, 4x8x8).

    The Wan2.2 VAE sets ``is_residual`` (residual down/up stages with parameter-free average-pool / duplicate
    shortcuts, no channel halving in the decoder) and ``patch_size=2``: video is 2x2-patchified before the
    encoder and after the decoder, so ``in_channels``/``out_channels`` (12) count patch channels.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8
    clip_output: bool = True  # FastVideo's field: clamp decoded video to [-1, 1] (diffusers always does)

    param_names_mapping: NameMapping = internal(WAN_VAE_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(WAN_VAE_REVERSE_PARAM_NAMES_MAPPING)

    # Derived: the decoder's temporal upsampling flags and, as in FastVideo, the latent affine
    # ``z_norm = (z - shift_factor) * scaling_factor`` per channel (scaling_factor = 1 / latents_std).
    temperal_upsample: tuple[bool, ...] = derived(())
    shift_factor: tuple[float, ...] = derived(())

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temperal_upsample", self.temperal_downsample[::-1])
        object.__setattr__(self, "shift_factor", self.latents_mean)
        object.__setattr__(self, "scaling_factor", tuple(1.0 / s for s in self.latents_std))
        if self.scale_factor_temporal is not None:
            object.__setattr__(self, "temporal_compression_ratio", self.scale_factor_temporal)
        if self.scale_factor_spatial is not None:
            object.__setattr__(self, "spatial_compression_ratio", self.scale_factor_spatial)
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEArchConfig: temperal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                f"downsampling stage of dim_mult={self.dim_mult}), got {self.temperal_downsample}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"WanVAEArchConfig: {name} has {len(getattr(self, name))} values, z_dim={self.z_dim}")
        p = self.patch
        if p < 1 or self.in_channels % (p * p) or self.out_channels % (p * p):
            raise ValueError(
                f"WanVAEArchConfig: patch_size={self.patch_size} must be >= 1 and divide in_channels="
                f"{self.in_channels} and out_channels={self.out_channels} into {p}x{p} patches"
            )

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def patch(self) -> int:
        """Side of the square pixel patch folded into channels (1: no patchify)."""
        return self.patch_size or 1

    @property
    def video_channels(self) -> int:
        """Channels of the video ``encode`` takes and ``decode`` returns (3 for RGB, also with patchify)."""
        return self.in_channels // (self.patch * self.patch)

    @property
    def encode_size_multiple(self) -> int:
        """What the encoder's input height and width must be multiples of: the patch, and with residual
        stages also every average-pool shortcut's 2x2 (diffusers' ``view`` fails on other sizes)."""
        return self.patch * (2 ** (len(self.dim_mult) - 1) if self.is_residual else 1)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(VAEConfig):
    """Our knobs. ``use_feature_cache``: decode one latent frame (encode 4 frames) per step with a causal
    cache carried through ``lax.scan``, so memory does not grow with clip length; False runs all frames after
    the first as one chunk (same result, more memory, fewer kernel launches)."""

    arch_config: WanVAEArchConfig = dataclasses.field(default_factory=WanVAEArchConfig)
    prefix: str = "Wan"
    use_feature_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        # A half that is not built still has tensors in the checkpoint: consume and drop them by name.
        skipped = (() if self.load_encoder else (r"^encoder\.", r"^quant_conv\.")) + (
            () if self.load_decoder else (r"^decoder\.", r"^post_quant_conv\.")
        )
        if skipped != self.arch_config.ignored_param_patterns:
            arch = dataclasses.replace(self.arch_config, ignored_param_patterns=skipped)
            object.__setattr__(self, "arch_config", arch)


# Presets as data: config.json contents. ``tiny`` builds in milliseconds (tests, CPU benchmark).
WAN_VAE_PRESETS = MappingProxyType(
    {
        "tiny": dict(
            base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temperal_downsample=(False, True, True),
        ),
        "wan2.1": dict(
            base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True),
        ),
        # Wan2.2 layout (residual stages, 2x2 patchify, 4x16x16, the checkpoint's 48 statistics), tiny widths.
        "tiny-wan2.2": dict(
            base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
            temperal_downsample=(False, True, True), is_residual=True, patch_size=2, in_channels=12,
            out_channels=12, scale_factor_temporal=4, scale_factor_spatial=16,
            latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
        ),
        # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json.
        "wan2.2": dict(
            base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
            temperal_downsample=(False, True, True), is_residual=True, patch_size=2, in_channels=12,
            out_channels=12, scale_factor_temporal=4, scale_factor_spatial=16,
            latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
        ),
    }
)


def wan_vae_preset(name: str) -> WanVAEArchConfig:
    """The ArchConfig of a preset by name; an unknown name lists the presets."""
    if name not in WAN_VAE_PRESETS:
        raise KeyError(f"unknown Wan VAE preset {name!r}; presets: {sorted(WAN_VAE_PRESETS)}")
    return WanVAEArchConfig().update_model_arch(WAN_VAE_PRESETS[name])
