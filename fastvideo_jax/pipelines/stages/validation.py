"""Input validation: a request the model cannot run is a ``UserError`` naming the field, before any work."""

from __future__ import annotations

from typing import Any

from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.errors import UserError
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["InputValidationStage", "check_request", "latent_frames", "patch_of"]


def check_request(param: SamplingParam, dit_arch: Any, vae_arch: Any, config: Any = None) -> None:
    """``UserError`` for a request this model cannot run: field types and ranges, sizes that do not divide
    into latents and patches, a token grid longer on some axis than the DiT's RoPE table and, given the
    pipeline ``config``, sampling options it cannot use (a DMD model's step count, guidance_scale_2 without a
    second expert)."""
    spatial, temporal = vae_arch.spatial_compression_ratio, vae_arch.temporal_compression_ratio
    pt, ph, pw = patch_of(dit_arch)
    chunk = getattr(config, "frame_chunk", None)  # a VAE decoding fixed frame chunks (StepVideo's 17)
    param.validate(spatial, ph, temporal, frame_chunk=chunk)
    frames = latent_frames(param.num_frames, temporal, chunk)
    if frames % pt:
        raise UserError(f"num_frames={param.num_frames} gives {frames} latent frames, not a multiple of the "
                        f"patch's {pt}")
    grid = (frames // pt, param.height // spatial // ph, param.width // spatial // pw)
    limit = getattr(dit_arch, "rope_max_seq_len", None)
    if limit is not None and max(grid) > limit:
        axes = ", ".join(f"{name} {n}" for name, n in zip(("frames", "height", "width"), grid) if n > limit)
        raise UserError(
            f"{param.height}x{param.width} with {param.num_frames} frames is too large for this model: its RoPE "
            f"table covers {limit} tokens per axis, the request needs {axes} (at most "
            f"{limit * spatial * ph}x{limit * spatial * pw} pixels, {(limit * pt - 1) * temporal + 1} frames)"
        )
    if config is not None:
        _check_against_config(param, config)


def _check_against_config(param: SamplingParam, config: Any) -> None:
    steps = getattr(config, "dmd_denoising_steps", None)
    if steps is not None and param.num_inference_steps != len(steps):
        raise UserError(f"num_inference_steps={param.num_inference_steps}: this DMD model samples exactly "
                        f"{len(steps)} steps (dmd_denoising_steps={steps})")
    if param.guidance_scale_2 is not None and getattr(config, "boundary_ratio", None) is None:
        raise UserError(f"guidance_scale_2={param.guidance_scale_2} is for the low-noise expert of a two-expert "
                        f"model (boundary_ratio set); this model has one transformer")


def latent_frames(num_frames: int, temporal: int, frame_chunk: int | None = None) -> int:
    """Latent frames of ``num_frames``: causal (1 + (n - 1) / temporal), or per ``frame_chunk``-frame chunk of a
    chunked VAE (StepVideo: 17 frames -> 3 latent frames)."""
    if frame_chunk:
        return num_frames // frame_chunk * ((frame_chunk - 1) // temporal + 1)
    return (num_frames - 1) // temporal + 1


def patch_of(dit_arch: Any) -> tuple[int, int, int]:
    """A DiT's (t, h, w) patch: ``patch_size`` as a triple (Wan), or an int with ``patch_size_t`` (HunyuanVideo)."""
    patch = dit_arch.patch_size
    if isinstance(patch, int):
        return int(getattr(dit_arch, "patch_size_t", 1) or 1), patch, patch
    return tuple(patch)


class InputValidationStage(PipelineStage):
    def __init__(self, dit_arch: Any, vae_arch: Any, config: Any = None):
        self.dit_arch, self.vae_arch, self.config = dit_arch, vae_arch, config

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        check_request(batch.param, self.dit_arch, self.vae_arch, self.config)
        return batch
