from fastvideo_jax.configs.models.dits.base import DiTArchConfig, DiTConfig
from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS, WanVideoArchConfig, WanVideoConfig

__all__ = ["DiTArchConfig", "DiTConfig", "WanVideoArchConfig", "WanVideoConfig", "WAN_PRESETS"]
