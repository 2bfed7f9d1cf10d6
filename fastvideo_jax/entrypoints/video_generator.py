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
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.entrypoints.model_spec import ModelSpec, check_request
from fastvideo_jax.models.loader.lora_io import check_lora_for_component
from fastvideo_jax.models.loader.pipeline_loader import load_components
from fastvideo_jax.parallel.distributed import initialize_from_env, is_primary
from fastvideo_jax.parallel.mesh import MeshConfig
from fastvideo_jax.parallel.spec import resolve_mesh
from fastvideo_jax.pipelines.base import ComposedPipeline
from fastvideo_jax.pipelines.lora import check_lora_scale
from fastvideo_jax.utils.compile_cache import enable_persistent_cache
from fastvideo_jax.utils.paths import cache_dir
from fastvideo_jax.utils.video import check_output_path, numbered_paths, write_videos


class VideoGenerator:
    def __init__(self, pipeline: ComposedPipeline, defaults: SamplingParam, model_path: Path):
        self.pipeline = pipeline
        self.defaults = defaults
        self.model_path = model_path

    @classmethod
    def from_pretrained(cls, model: str | Path, *, mesh: Mesh | MeshConfig | str | None = None,
                        pipeline_config: PipelineConfig | None = None, lora: str | Path | None = None,
                        lora_scale: float = 1.0, lora_merge: bool = True, **overrides: Any) -> "VideoGenerator":
        """Load a pipeline from a local directory, a Hugging Face repo id (via the hub cache) or ``"tiny-wan"``
        (random weights, for smoke tests). ``mesh``: a Mesh, a MeshConfig or a spec such as "data=2,sequence=4",
        checked against the devices and the DiT's heads before any weight is read; None on several devices picks
        and logs a default (CFG on data, tokens on sequence). ``overrides`` replace PipelineConfig fields
        (``flow_shift``, ``dit_precision``, ``vae_decode_precision``, ``vae_tiling``, ``text_len``, ...). Defaults come from the
        model's id or, for a directory, from its DiT config. Configs, tokenizer and scheduler are checked
        before any weight is read. Turns on JAX's persistent compilation cache
        (``FASTVIDEO_JAX_COMPILATION_CACHE``: a directory, or 0 for off). Joins a multi-host run first when
        ``FASTVIDEO_JAX_COORDINATOR``/... or ``FASTVIDEO_JAX_DISTRIBUTED=auto`` ask for it (parallel.distributed).
        ``lora``: a Diffusers/PEFT (or original Wan) LoRA file or folder for the DiT, at ``lora_scale``, merged
        into the weights unless ``lora_merge=False`` (kept separate: ``set_lora`` then switches adapters of the
        same ranks on the compiled steps); checked against the DiT before any weight is read."""
        initialize_from_env()
        return cls.from_spec(ModelSpec.open(model, pipeline_config=pipeline_config, **overrides), mesh=mesh,
                             lora=lora, lora_scale=lora_scale, lora_merge=lora_merge)

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, mesh: Mesh | MeshConfig | str | None = None,
                  lora: str | Path | None = None, lora_scale: float = 1.0,
                  lora_merge: bool = True) -> "VideoGenerator":
        """Load the weights of a model already opened (and requests already checked) with ``ModelSpec.open``."""
        initialize_from_env()  # a no-op when already done (or not asked for)
        mesh = resolve_mesh(mesh, num_heads=spec.dit_arch.num_attention_heads)  # before any weight is read
        config = spec.config
        if lora is not None:  # the file fits the DiT: before any weight is read
            check_lora_scale(lora_scale)
            check_lora_for_component(lora, spec.path / "transformer", **config.dit_overrides())
        enable_persistent_cache(cache_dir() / "xla")
        parts = load_components(spec.path, list(spec.components), mesh=mesh,
                                precisions=component_precisions(config, spec.components),
                                overrides={n: config.dit_overrides() for n in spec.components
                                           if n.startswith("transformer")},
                                folders=dict(spec.folders))
        generator = cls(spec.pipeline_cls(parts, config), spec.defaults, spec.path)
        generator.lora_merge = lora_merge
        if lora is not None:
            generator.set_lora(lora, lora_scale)
        return generator

    lora_merge: bool = True  # how set_lora attaches a LoRA unless told (from_pretrained's lora_merge)

    def set_lora(self, path: str | Path | None, scale: float = 1.0, *, merge: bool | None = None,
                 component: str = "transformer") -> None:
        """Switch the DiT's LoRA without reloading the model: the file ``path`` at ``scale``, or None for none.
        ``merge``: into the weights (default: as ``from_pretrained``'s ``lora_merge``). ``component``:
        ``"transformer_2"`` for Wan2.2 A14B's low-noise expert (each expert has its own LoRA). A file that does
        not fit the DiT is refused (``CheckpointError`` naming its tensors) and the current LoRA stays."""
        self.pipeline.set_lora(path, scale, merge=self.lora_merge if merge is None else merge, component=component)

    def set_lora_scale(self, scale: float, *, component: str = "transformer") -> None:
        """The attached LoRA at another scale (its file is not read again)."""
        self.pipeline.set_lora_scale(scale, component=component)

    def sampling_param(self, **overrides: Any) -> SamplingParam:
        """This model's defaults with ``overrides`` (None values keep the default), checked against the model
        (``UserError`` naming the field)."""
        param = self.defaults.replace(**overrides)
        check_request(param, self.pipeline.transformer.config.arch_config, self.pipeline.vae.config.arch_config,
                      self.pipeline.config)
        return param

    def generate_video(self, prompt: str, *, image: Any | None = None, output_path: str | Path | None = None,
                       latents: Any | None = None, progress: bool = True, **overrides: Any) -> dict[str, Any]:
        """Generate one request. Returns ``frames`` (F, H, W, 3) uint8 (or (B, F, H, W, 3) when
        ``num_videos_per_prompt`` > 1), ``latents``, ``param``, ``seconds``; ``teacache`` (the steps it skipped)
        when ``teacache_thresh`` > 0; and, when ``output_path`` is given, ``paths``: the mp4s written,
        ``output_path`` itself for one video, ``<stem>_0.mp4``, ``<stem>_1.mp4``, ... beside it for several
        (``path`` is the first). The request and the output path are checked before any work; the videos are
        written all or none (``OutputPathError`` names the path and the cause).
        ``image``: the first frame of an image-to-video model (a path, a ``PIL.Image`` or a uint8 (H, W, 3) RGB
        array), resized to the requested height x width; required by such a model, refused by a text-to-video one."""
        param = self.sampling_param(prompt=prompt, **overrides)
        image = self.pipeline.check_image(image, self.pipeline.config)
        paths = None
        if output_path is not None:
            paths = [check_output_path(p) for p in numbered_paths(output_path, param.num_videos_per_prompt)]
        start = time.perf_counter()
        out = self.pipeline(param, latents=latents, progress=progress, image=image)
        frames = out["frames"]
        result = {"frames": frames[0] if frames.shape[0] == 1 else frames, "latents": out["latents"],
                  "param": dataclasses.asdict(param), "seconds": time.perf_counter() - start}
        if "teacache" in out:  # steps served from the cache
            result["teacache"] = out["teacache"]
        if paths is not None and is_primary():  # multi-host: process 0 writes
            result["paths"] = write_videos(paths, list(frames), fps=param.fps)
            result["path"] = result["paths"][0]
        return result


def component_precisions(config: PipelineConfig, names: tuple[str, ...]) -> dict[str, str]:
    """Each model component's precision from the pipeline config: DiTs ``dit_precision``, the VAE
    ``vae_decode_precision``, the n-th text encoder ``text_encoder_precisions[n]`` (the last one repeats)."""
    out = {}
    for name in names:
        if name.startswith("transformer"):
            out[name] = config.dit_precision
        elif name == "vae":
            out[name] = config.vae_decode_precision
        elif name.startswith("text_encoder"):
            suffix = name.removeprefix("text_encoder").lstrip("_")
            i = int(suffix) - 1 if suffix.isdigit() else 0
            precisions = config.text_encoder_precisions
            out[name] = precisions[min(i, len(precisions) - 1)]
        elif name == "image_encoder":
            out[name] = config.image_encoder_precision
    return out
