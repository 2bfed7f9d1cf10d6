"""Pipeline-level configuration: per-component precision and scheduler shift, frozen, overridable per call."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What FastVideo's PipelineConfig fixes for a model family (field names as FastVideo's)."""

    flow_shift: float | None = None
    dit_precision: str = "bf16"
    vae_precision: str = "fp32"  # encode
    vae_decode_precision: str = "bf16"
    vae_tiling: bool = False
    text_encoder_precisions: tuple[str, ...] = ("fp32",)
    text_len: int = 512
    # Whether the prompt is cleaned (ftfy + HTML unescape + whitespace) as Diffusers' WanPipeline does.
    clean_prompts: bool = True

    def replace(self, **overrides: Any) -> "PipelineConfig":
        """A copy with fields replaced; an unknown field is an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"{type(self).__name__} has no field(s) {bad}; fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)
