"""Pipelines: stages over one batch, resolved from ``model_index.json``'s ``_class_name`` by the registry."""

from fastvideo_jax.pipelines.base import ComposedPipeline
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.registry import register_pipeline, resolve_pipeline_cls, supported_pipelines

__all__ = ["ComposedPipeline", "ForwardBatch", "register_pipeline", "resolve_pipeline_cls", "supported_pipelines"]
