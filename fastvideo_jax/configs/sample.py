"""Sampling parameters: what one generation request asks for, with defaults per model."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from fastvideo_jax.errors import UserError

# An English rendering of the negative prompt Wan's authors and FastVideo use by default (theirs is Chinese).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
# The negative prompt as Wan2.2's authors ship it (and FastVideo's Wan2.2 / FastWan2.2 presets use it).
WAN_NEGATIVE_PROMPT_ZH = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Scheduler tables are padded to this many steps (pipelines/stages/timesteps.py), so this is the most a request may ask for.
MAX_INFERENCE_STEPS = 1000
_INT_FIELDS = ("height", "width", "num_frames", "num_inference_steps", "seed", "fps", "num_videos_per_prompt")


def check_int(name: str, value: Any) -> None:
    """An integer (a Python or numpy int, not a bool or a float such as 64.0), else ``UserError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be an integer, got {type(value).__name__} {value!r}")


def check_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False) -> None:
    """A finite real number (not a bool) at least ``low`` (above it when ``low_open``), else ``UserError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise UserError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class SamplingParam:
    prompt: str | None = None
    negative_prompt: str = ""
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    # Wan2.2 A14B: the guidance scale of the low-noise expert (None: guidance_scale for both experts).
    guidance_scale_2: float | None = None
    seed: int = 1024
    fps: int = 16
    num_videos_per_prompt: int = 1
    # TeaCache (FastVideo's, Wan): skip the DiT's blocks on steps whose timestep modulation moved less than this
    # (accumulated, rescaled relative L1). 0 = off; FastVideo uses 0.08 for Wan2.1-T2V-1.3B, 0.2 for 14B.
    teacache_thresh: float = 0.0

    def replace(self, **overrides: Any) -> "SamplingParam":
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown sampling option(s) {bad}; options: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self, spatial: int = 8, patch: int = 2, temporal: int = 4, frame_chunk: int | None = None) -> None:
        """Clear errors (``UserError`` naming the field) before any heavy work: types first, then ranges.
        ``frame_chunk``: a VAE that decodes fixed chunks of frames (StepVideo: 17) takes a multiple of it."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UserError(f"prompt must be a non-empty string, got {type(self.prompt).__name__} {self.prompt!r}"
                            if self.prompt else "a prompt is required")
        if not isinstance(self.negative_prompt, str):
            raise UserError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        for name in _INT_FIELDS:
            check_int(name, getattr(self, name))
        check_number("guidance_scale", self.guidance_scale, low=0.0)
        if self.guidance_scale_2 is not None:
            check_number("guidance_scale_2", self.guidance_scale_2, low=0.0)
        check_number("teacache_thresh", self.teacache_thresh, low=0.0)
        multiple = spatial * patch
        if self.height <= 0 or self.width <= 0 or self.height % multiple or self.width % multiple:
            raise UserError(f"height and width must be positive multiples of {multiple}, got {self.height}x{self.width}")
        if frame_chunk:
            if self.num_frames < frame_chunk or self.num_frames % frame_chunk:
                raise UserError(f"num_frames must be a multiple of {frame_chunk} ({frame_chunk}, {2 * frame_chunk}, "
                                f"..., {12 * frame_chunk}): this VAE decodes {frame_chunk}-frame chunks, got "
                                f"{self.num_frames}")
        elif self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise UserError(f"num_frames must be 1 + {temporal}k (1, 5, 9, ..., 81), got {self.num_frames}")
        if not 1 <= self.num_inference_steps <= MAX_INFERENCE_STEPS:
            raise UserError(f"num_inference_steps must be at least 1 and at most {MAX_INFERENCE_STEPS}, "
                            f"got {self.num_inference_steps}")
        if self.num_videos_per_prompt < 1:
            raise UserError(f"num_videos_per_prompt must be at least 1, got {self.num_videos_per_prompt}")
        if self.fps < 1:
            raise UserError(f"fps must be positive, got {self.fps}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be in [0, 2**32), got {self.seed}")
