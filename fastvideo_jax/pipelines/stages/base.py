"""``PipelineStage``: one step of a pipeline, ``stage(batch) -> batch`` over the ``ForwardBatch`` pytree."""

from __future__ import annotations

from fastvideo_jax.pipelines.batch import ForwardBatch

__all__ = ["PipelineStage"]


class PipelineStage:
    """A stage holds the components it needs (given at construction) and turns a batch into the next batch.
    It never mutates the batch: it returns ``batch.replace(...)``."""

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def __repr__(self) -> str:
        return type(self).__name__
