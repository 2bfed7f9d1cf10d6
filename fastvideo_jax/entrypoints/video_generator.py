"""``VideoGenerator``: the Python API. Load a pipeline once, generate many videos.

    from fastvideo_jax import VideoGenerator
    gen = VideoGenerator.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    out = gen.generate_video("a cat playing piano", output_path="cat.mp4")
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import get_model_defaults
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.models.loader.component_loader import read_config
from fastvideo_jax.models.loader.pipeline_loader import load_components, read_model_index, resolve_model_path
from fastvideo_jax.pipelines.wan import WanT2VPipeline
from fastvideo_jax.testing.tiny_pipeline import TINY_WAN_ID, cache_dir, ensure_tiny_wan
from fastvideo_jax.utils.compile_cache import enable_persistent_cache
from fastvideo_jax.utils.video import write_mp4

_SUPPORTED = {"WanPipeline"}


class VideoGenerator:
    def __init__(self, pipeline: WanT2VPipeline, defaults: SamplingParam, model_path: Path):
        self.pipeline = pipeline
        self.defaults = defaults
        self.model_path = model_path

    @classmethod
    def from_pretrained(cls, model: str | Path, *, mesh: Mesh | None = None,
                        pipeline_config: PipelineConfig | None = None, **overrides: Any) -> "VideoGenerator":
        """Load a pipeline from a local directory, a Hugging Face repo id (via the hub cache) or ``"tiny-wan"``
        (random weights, for smoke tests). ``overrides`` replace PipelineConfig fields (``flow_shift``,
        ``dit_precision``, ``vae_decode_precision``, ``text_len``, ...). Turns on JAX's persistent
        compilation cache (``FASTVIDEO_JAX_COMPILATION_CACHE``: a directory, or 0 for off)."""
        enable_persistent_cache(cache_dir() / "xla")
        defaults_config, sampling = get_model_defaults(model)
        path = ensure_tiny_wan() if str(model) == TINY_WAN_ID else resolve_model_path(model)
        config = (pipeline_config or defaults_config).replace(**overrides)
        index = read_model_index(path)
        pipeline_class = read_config(path, "model_index.json").get("_class_name")
        if pipeline_class not in _SUPPORTED:
            raise ValueError(f"{path}: pipeline {pipeline_class!r} is not supported yet (supported: {sorted(_SUPPORTED)})")
        needed = ["transformer", "text_encoder", "tokenizer", "vae", "scheduler"]
        missing = [n for n in needed if n not in index or index[n][0] is None]
        if missing:
            raise ValueError(f"{path}/model_index.json: missing components {missing}")
        precisions = {"transformer": config.dit_precision, "text_encoder": config.text_encoder_precisions[0],
                      "vae": config.vae_decode_precision}
        parts = load_components(path, needed, mesh=mesh, precisions=precisions)
        pipeline = WanT2VPipeline(parts["tokenizer"], parts["text_encoder"], parts["transformer"], parts["vae"],
                                  parts["scheduler"], config)
        return cls(pipeline, sampling, path)

    def sampling_param(self, **overrides: Any) -> SamplingParam:
        """This model's defaults with ``overrides`` (None values keep the default)."""
        return self.defaults.replace(**overrides)

    def generate_video(self, prompt: str, *, output_path: str | Path | None = None, latents: Any | None = None,
                       progress: bool = True, **overrides: Any) -> dict[str, Any]:
        """Generate one request. Returns ``frames`` (F, H, W, 3) uint8 (or (B, F, H, W, 3) when
        ``num_videos_per_prompt`` > 1), ``latents``, ``timings`` and, when ``output_path`` is given, ``path``."""
        param = self.sampling_param(prompt=prompt, **overrides)  # the pipeline validates it before any work
        start = time.perf_counter()
        out = self.pipeline(param, latents=latents, progress=progress)
        frames = out["frames"]
        result = {"frames": frames[0] if frames.shape[0] == 1 else frames, "latents": out["latents"],
                  "param": dataclasses.asdict(param), "seconds": time.perf_counter() - start}
        if output_path is not None:
            result["path"] = write_mp4(output_path, frames[0], fps=param.fps)
        return result
