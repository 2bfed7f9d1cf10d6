"""Timestep preparation: the scheduler's tables for the requested step count, padded to a fixed length so a
new step count does not recompile the denoising step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.configs.sample import MAX_INFERENCE_STEPS
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["MAX_STEPS", "TimestepPreparationStage", "pad_tables"]

MAX_STEPS = MAX_INFERENCE_STEPS


def pad_tables(tables: Any, num_steps: int, length: int = MAX_STEPS) -> Any:
    """Every table leaf (leading axis ``num_steps`` or ``num_steps + 1``) padded by edge values to ``length``."""
    if not 1 <= num_steps <= length:
        raise ValueError(f"num_inference_steps must be in [1, {length}], got {num_steps}")

    def pad(a):  # on the host: an eager jnp.pad would compile once per step count
        a = np.asarray(a)
        return jax.device_put(np.pad(a, [(0, length - num_steps)] + [(0, 0)] * (a.ndim - 1), mode="edge"))

    return jax.tree.map(pad, tables)


class TimestepPreparationStage(PipelineStage):
    """``sigmas``: None for the scheduler's own spacing (``set_timesteps(n)``), or a function of the step count
    giving the unshifted sigmas the pipeline passes (``set_sigmas``; e.g. HunyuanVideo's ``linspace(1, 0, n+1)[:-1]``)."""

    def __init__(self, scheduler: Any, sigmas: Callable[[int], Any] | None = None):
        self.scheduler, self.sigmas = scheduler, sigmas

    def tables(self, num_steps: int) -> Any:
        if self.sigmas is None:
            return pad_tables(self.scheduler.set_timesteps(num_steps), num_steps)
        return pad_tables(self.scheduler.set_sigmas(self.sigmas(num_steps)), num_steps)

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        n = batch.param.num_inference_steps
        return batch.replace(tables=self.tables(n), num_steps=n)
