"""Pipeline registry: ``model_index.json``'s ``_class_name`` -> our pipeline class, imported when asked for.

Entries are ``"module:Class"`` strings (lazy) or classes (registered out of tree with ``register_pipeline``).
An unknown name is a ``CheckpointError`` listing the supported pipelines, never a silent fallback to Wan.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastvideo_jax.errors import CheckpointError

__all__ = ["PipelineRegistry", "register_pipeline", "resolve_pipeline_cls", "supported_pipelines"]

_PIPELINES: dict[str, Any] = {
    "WanPipeline": "fastvideo_jax.pipelines.wan:WanPipeline",
    "HunyuanVideoPipeline": "fastvideo_jax.pipelines.hunyuan:HunyuanVideoPipeline",
    "WanDMDPipeline": "fastvideo_jax.pipelines.wan:WanDMDPipeline",
    "WanImageToVideoPipeline": "fastvideo_jax.pipelines.wan_i2v:WanImageToVideoPipeline",
    "StepVideoPipeline": "fastvideo_jax.pipelines.stepvideo:StepVideoPipeline",
}


class _PipelineRegistry:
    def __init__(self, entries: dict[str, Any]):
        self._entries = dict(entries)

    def register(self, name: str, target: Any) -> None:
        """``target``: a pipeline class, or ``"package.module:ClassName"`` imported on first use."""
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"register_pipeline({name!r}, {target!r}): a string target must look like 'module:Class'")
        self._entries[name] = target

    def supported(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name: str | None, source: str = "model_index.json") -> type:
        target = self._entries.get(name) if isinstance(name, str) else None
        if target is None:
            raise CheckpointError(f"{source}: pipeline {name!r} is not supported (supported: {self.supported()})")
        if not isinstance(target, str):
            return target
        module_name, _, cls_name = target.partition(":")
        try:
            return getattr(importlib.import_module(module_name), cls_name)
        except AttributeError:
            raise ImportError(f"pipeline registry entry {name!r}: {module_name} has no class {cls_name}") from None


PipelineRegistry = _PipelineRegistry(_PIPELINES)


def register_pipeline(name: str, target: Any) -> None:
    """Register a pipeline class (or ``"module:Class"``) under a ``model_index.json`` ``_class_name``."""
    PipelineRegistry.register(name, target)


def resolve_pipeline_cls(name: str | None, source: str = "model_index.json") -> type:
    return PipelineRegistry.resolve(name, source)


def supported_pipelines() -> list[str]:
    return PipelineRegistry.supported()
