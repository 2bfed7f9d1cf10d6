from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import get_model_defaults, register_model_defaults
from fastvideo_jax.configs.pipelines.wan import (
    FastWan21T2V480PConfig, FastWan22TI2V5BConfig, Wan22I2VA14BConfig, Wan22T2VA14BConfig, Wan22TI2V5BConfig,
    WanI2V480PConfig, WanI2V720PConfig, WanT2V480PConfig, WanT2V720PConfig, WanTinyConfig,
)

__all__ = [
    "FastWan21T2V480PConfig",
    "FastWan22TI2V5BConfig",
    "PipelineConfig",
    "Wan22I2VA14BConfig",
    "Wan22T2VA14BConfig",
    "Wan22TI2V5BConfig",
    "WanI2V480PConfig",
    "WanI2V720PConfig",
    "WanT2V480PConfig",
    "WanT2V720PConfig",
    "WanTinyConfig",
    "get_model_defaults",
    "register_model_defaults",
]
