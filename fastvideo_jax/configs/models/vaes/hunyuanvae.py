"""HunyuanVideo VAE (``AutoencoderKLHunyuanVideo``) configuration: checkpoint fields, tiling knobs and presets."""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

from fastvideo_jax.configs.models.base import derived
from fastvideo_jax.configs.models.vaes.base import VAEArchConfig, VAEConfig

DOWN_BLOCK = "HunyuanVideoDownBlock3D"
UP_BLOCK = "HunyuanVideoUpBlock3D"


def stage_strides(num_blocks: int, spatial: int, temporal: int) -> tuple[tuple[int, int], ...]:
    """(time, space) factor of each stage's down/upsampler, as diffusers derives them for a temporal ratio of 4:
    space x2 in the first log2(spatial) stages, time x2 in the log2(temporal) stages before the last one;
    (1, 1) means the stage has no resampler. The decoder's up blocks use the same list."""
    n_space, n_time = int(math.log2(spatial)), int(math.log2(temporal))
    out = []
    for i in range(num_blocks):
        last = i == num_blocks - 1
        time = 2 if (i >= num_blocks - 1 - n_time and not last) else 1
        out.append((time, 2 if i < n_space else 1))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class HunyuanVAEArchConfig(VAEArchConfig):
    """``AutoencoderKLHunyuanVideo`` config.json fields (defaults: hunyuanvideo-community/HunyuanVideo's vae)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
    up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True

    # Derived: the (time, space) stride of each stage's resampler (see ``stage_strides``).
    strides: tuple[tuple[int, int], ...] = derived(())

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        where = "HunyuanVAEArchConfig"
        bad = {t for t in self.down_block_types if t != DOWN_BLOCK} | {t for t in self.up_block_types if t != UP_BLOCK}
        if bad:
            raise ValueError(f"{where}: unsupported block types {sorted(bad)} (only {DOWN_BLOCK}/{UP_BLOCK})")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{where}: {len(self.down_block_types)} down / {len(self.up_block_types)} up block types "
                             f"for {n} block_out_channels")
        if self.act_fn != "silu":
            raise ValueError(f"{where}: act_fn {self.act_fn!r} is not supported (silu is)")
        if self.temporal_compression_ratio != 4:  # diffusers' decoder raises for any other ratio too
            raise ValueError(f"{where}: temporal_compression_ratio={self.temporal_compression_ratio}; only 4 is "
                             "supported (as in diffusers' HunyuanVideoDecoder3D)")
        strides = stage_strides(n, self.spatial_compression_ratio, self.temporal_compression_ratio)
        t = math.prod(s[0] for s in strides)
        s = math.prod(s[1] for s in strides)
        if (t, s) != (self.temporal_compression_ratio, self.spatial_compression_ratio):
            raise ValueError(
                f"{where}: {n} stages compress {t}x in time and {s}x in space, but the config says "
                f"temporal_compression_ratio={self.temporal_compression_ratio}, spatial_compression_ratio="
                f"{self.spatial_compression_ratio} (a 4x/8x VAE needs at least 3 block_out_channels)"
            )
        for c in (*self.block_out_channels,):
            if c % self.norm_num_groups:
                raise ValueError(f"{where}: norm_num_groups={self.norm_num_groups} does not divide channels {c}")
        object.__setattr__(self, "strides", strides)

    @property
    def z_dim(self) -> int:
        """Latent channels under the Wan VAE's name, for stages that read ``vae_arch.z_dim``."""
        return self.latent_channels


@dataclasses.dataclass(frozen=True)
class HunyuanVAEConfig(VAEConfig):
    """Our knobs, named as diffusers' attributes. ``use_tiling`` (spatial tiles, ``tile_sample_*_height/width``) is
    off by default as in diffusers; ``use_framewise_encoding/decoding`` (temporal tiles of
    ``tile_sample_min_num_frames`` (+1) frames at a stride of ``tile_sample_stride_num_frames``, blended) are ON
    by default as in diffusers, so a long clip never decodes as one piece unless asked."""

    arch_config: HunyuanVAEArchConfig = dataclasses.field(default_factory=HunyuanVAEArchConfig)
    prefix: str = "Hunyuan"
    tile_sample_min_num_frames: int = 16
    tile_sample_stride_num_frames: int = 12
    use_framewise_encoding: bool = True
    use_framewise_decoding: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.arch_config
        checks = (
            ("height", self.tile_sample_min_height, self.tile_sample_stride_height, a.spatial_compression_ratio),
            ("width", self.tile_sample_min_width, self.tile_sample_stride_width, a.spatial_compression_ratio),
            ("num_frames", self.tile_sample_min_num_frames, self.tile_sample_stride_num_frames,
             a.temporal_compression_ratio),
        )
        for name, size, stride, r in checks:
            if not 0 < stride <= size or size % r or stride % r:
                raise ValueError(
                    f"HunyuanVAEConfig: tile_sample_min_{name}={size} and tile_sample_stride_{name}={stride} must be "
                    f"positive multiples of {r} (the compression) with the stride at most the tile"
                )
        skipped = (() if self.load_encoder else (r"^encoder\.", r"^quant_conv\.")) + (
            () if self.load_decoder else (r"^decoder\.", r"^post_quant_conv\.")
        )
        if skipped != a.ignored_param_patterns:
            object.__setattr__(self, "arch_config", dataclasses.replace(a, ignored_param_patterns=skipped))


# Presets as data: config.json contents. ``tiny`` (3 stages: the fewest that give 4x/8x) builds in milliseconds.
HUNYUAN_VAE_PRESETS = MappingProxyType(
    {
        "tiny": dict(
            block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
            down_block_types=(DOWN_BLOCK,) * 3, up_block_types=(UP_BLOCK,) * 3,
        ),
        # hunyuanvideo-community/HunyuanVideo vae/config.json (the diffusers defaults).
        "hunyuanvideo": dict(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=(DOWN_BLOCK,) * 4,
            up_block_types=(UP_BLOCK,) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            act_fn="silu", norm_num_groups=32, scaling_factor=0.476986, spatial_compression_ratio=8,
            temporal_compression_ratio=4, mid_block_add_attention=True,
        ),
    }
)


def hunyuan_vae_preset(name: str) -> HunyuanVAEArchConfig:
    """The ArchConfig of a preset by name; an unknown name lists the presets."""
    if name not in HUNYUAN_VAE_PRESETS:
        raise KeyError(f"unknown Hunyuan VAE preset {name!r}; presets: {sorted(HUNYUAN_VAE_PRESETS)}")
    return HunyuanVAEArchConfig().update_model_arch(HUNYUAN_VAE_PRESETS[name])
