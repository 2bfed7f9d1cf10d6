"""Validation videos during training: the existing pipeline with the DiT being trained.

The pipeline's other components (tokenizer, text encoder, VAE, scheduler) are loaded on the first validation
and kept; each validation builds the pipeline around the current DiT (its parameters in their compute dtypes)
and writes ``step<N>_<i>.mp4`` per prompt, with the model's default sampling parameters and the run's overrides.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

__all__ = ["Validator", "check_requests"]

log = logging.getLogger(__name__)


def check_requests(spec: Any, prompts, overrides: dict[str, Any], seed: int) -> None:
    """Every validation request fits the model (sizes, frames, steps): a ``UserError`` before training starts."""
    overrides = {k: v for k, v in dict(overrides).items() if v is not None}
    for prompt in prompts:
        spec.sampling_param(prompt=prompt, seed=seed, **overrides)


class Validator:
    def __init__(self, spec: Any, mesh: Mesh | None, directory: Path, prompts: tuple[str, ...],
                 overrides: dict[str, Any], seed: int):
        self.spec, self.mesh, self.directory = spec, mesh, Path(directory)
        self.prompts, self.seed = tuple(prompts), seed
        self.overrides = {k: v for k, v in dict(overrides).items() if v is not None}
        check_requests(spec, self.prompts, self.overrides, seed)
        self._parts = None

    def _components(self) -> dict[str, Any]:
        if self._parts is None:
            from fastvideo_jax.entrypoints.video_generator import component_precisions
            from fastvideo_jax.models.loader.pipeline_loader import load_components

            names = [n for n in self.spec.components if n != "transformer"]
            self._parts = load_components(self.spec.path, names, mesh=self.mesh,
                                          precisions=component_precisions(self.spec.config, tuple(names)))
        return self._parts

    def __call__(self, dit: Any, step: int) -> list[Path]:
        from fastvideo_jax.parallel.distributed import is_primary
        from fastvideo_jax.utils.video import write_videos

        pipeline = self.spec.pipeline_cls({**self._components(), "transformer": dit}, self.spec.config)
        paths, videos, fps = [], [], 16
        for i, prompt in enumerate(self.prompts):
            param = self.spec.sampling_param(prompt=prompt, seed=self.seed, **self.overrides)
            out = pipeline(param, progress=False)
            videos.append(out["frames"][0])
            paths.append(self.directory / f"step{step}_{i}.mp4")
            fps = param.fps
        if is_primary():
            self.directory.mkdir(parents=True, exist_ok=True)
            written = write_videos(paths, videos, fps=fps)
            log.info("validation videos at step %d: %s", step, [str(p) for p in written])
        return paths
