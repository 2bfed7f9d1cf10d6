"""Timestep preparation: the scheduler's tables for the requested step count, padded to a fixed length so a
new step count does not recompile the denoising step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fastvideo_jax.configs.sample import MAX_INFERENCE_STEPS
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["MAX_STEPS", "TimestepPreparationStage", "pad_tables"]

MAX_STEPS = MAX_INFERENCE_STEPS


def pad_tables(tables: Any, num_steps: int, length: int = MAX_STEPS) -> Any:
    """Every table leaf (leading axis ``num_steps`` or ``num_steps + 1``) padded by edge values to ``length``."""
    if not 1 <= num_steps <= length:
        raise ValueError(f"num_inference_steps must be in [1, {length}], got {num_steps}")

    def pad(a):
        a = jnp.asarray(a)
        return jnp.pad(a, [(0, length - num_steps)] + [(0, 0)] * (a.ndim - 1), mode="edge")

    return jax.tree.map(pad, tables)


class TimestepPreparationStage(PipelineStage):
    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def tables(self, num_steps: int) -> Any:
        return pad_tables(self.scheduler.set_timesteps(num_steps), num_steps)

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        n = batch.param.num_inference_steps
        return batch.replace(tables=self.tables(n), num_steps=n)
