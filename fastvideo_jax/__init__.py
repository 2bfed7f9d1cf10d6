"""fastvideo_jax: FastVideo's video diffusion models in JAX / Flax NNX.

Importing the package is cheap: model modules are imported by the registry only when a checkpoint asks for
them.
"""

__version__ = "0.1.0"

_LAZY = {
    "VideoGenerator": ("fastvideo_jax.entrypoints.video_generator", "VideoGenerator"),
    "SamplingParam": ("fastvideo_jax.configs.sample", "SamplingParam"),
    "PipelineConfig": ("fastvideo_jax.configs.pipelines.base", "PipelineConfig"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastvideo_jax' has no attribute {name!r}")


__all__ = ["VideoGenerator", "SamplingParam", "PipelineConfig", "__version__"]
