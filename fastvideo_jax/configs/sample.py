"""Sampling parameters: what one generation request asks for, with defaults per model."""

from __future__ import annotations

import dataclasses
from typing import Any

# An English rendering of the negative prompt Wan's authors and FastVideo use by default (theirs is Chinese).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


@dataclasses.dataclass(frozen=True)
class SamplingParam:
    prompt: str | None = None
    negative_prompt: str = ""
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 1024
    fps: int = 16
    num_videos_per_prompt: int = 1

    def replace(self, **overrides: Any) -> "SamplingParam":
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown sampling option(s) {bad}; options: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self, spatial: int = 8, patch: int = 2, temporal: int = 4) -> None:
        """Clear errors before any heavy work."""
        multiple = spatial * patch
        if self.height <= 0 or self.width <= 0 or self.height % multiple or self.width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {self.height}x{self.width}")
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be 1 + {temporal}k (1, 5, 9, ..., 81), got {self.num_frames}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be at least 1, got {self.num_videos_per_prompt}")
        if self.fps < 1:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not self.prompt:
            raise ValueError("a prompt is required")
