from fastvideo_jax.pipelines.wan import WanT2VPipeline

__all__ = ["WanT2VPipeline"]
