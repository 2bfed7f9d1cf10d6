"""VAE config bases."""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.models.base import MappedArchConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class VAEArchConfig(MappedArchConfig):
    scaling_factor: float = 1.0
    temporal_compression_ratio: int = 4
    spatial_compression_ratio: int = 8


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """Our VAE knobs: precisions, which halves to load, and spatial tiling (sizes in pixels / frames)."""

    arch_config: VAEArchConfig = dataclasses.field(default_factory=VAEArchConfig)
    precision: str = "fp32"
    load_encoder: bool = True
    load_decoder: bool = True
    use_tiling: bool = False
    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192
