from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import get_model_defaults, register_model_defaults
from fastvideo_jax.configs.pipelines.wan import WanT2V480PConfig, WanT2V720PConfig, WanTinyConfig

__all__ = [
    "PipelineConfig",
    "WanT2V480PConfig",
    "WanT2V720PConfig",
    "WanTinyConfig",
    "get_model_defaults",
    "register_model_defaults",
]
