"""Pipeline-level configuration: per-component precision and scheduler shift, frozen, overridable per call."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastvideo_jax.configs.sample import check_int, check_number
from fastvideo_jax.dtypes import PRECISION_TO_DTYPE
from fastvideo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What FastVideo's PipelineConfig fixes for a model family (field names as FastVideo's).

    ``vae_decode_precision`` is the VAE's precision (text-to-video only decodes). ``vae_tiling`` decodes in
    overlapping spatial tiles (the VAE config's tile sizes) so large frames fit devices with less memory.
    """

    flow_shift: float | None = None
    dit_precision: str = "bf16"
    vae_decode_precision: str = "bf16"
    vae_tiling: bool = False
    text_encoder_precisions: tuple[str, ...] = ("fp32",)
    # The image encoder's precision (image-to-video's CLIP vision tower; FastVideo runs it in fp32).
    image_encoder_precision: str = "fp32"
    text_len: int = 512
    # Whether the prompt is cleaned (ftfy + HTML unescape + whitespace) as Diffusers' WanPipeline does.
    clean_prompts: bool = True
    # Keep the text encoder's parameters in host memory between prompts (moved to the devices to encode), so
    # denoising has the device memory (UMT5-XXL in fp32: 22.7 GB over the mesh).
    text_encoder_offload: bool = False
    # Wan2.2 TI2V: the DiT takes one timestep per token, (B, L) (the clean first-frame tokens of image-to-video at 0).
    expand_timesteps: bool = False
    # Wan2.2 A14B: the high-noise expert ``transformer`` runs while the timestep is >= boundary_ratio * 1000,
    # the low-noise ``transformer_2`` after (with SamplingParam.guidance_scale_2). None: a single DiT.
    boundary_ratio: float | None = None
    # Two experts: keep only the active one's parameters on the devices (the idle one in pinned host memory,
    # moved once when the experts switch); off: both stay on the devices (sharded like any DiT).
    expert_offload: bool = False
    # FastWan: few-step DMD sampling over these fixed timesteps (strictly decreasing, in [1, 1000]); no CFG.
    dmd_denoising_steps: tuple[int, ...] | None = None
    # The DiTs' self-attention: "dense", or "video_sparse" (FastVideo's VIDEO_SPARSE_ATTN, what FastWan2.1 is
    # trained with): the transformers load with attention_backend="video_sparse_attn" at ``vsa_sparsity`` (the
    # fraction of KV cubes each query cube skips); their checkpoints carry each block's to_gate_compress.
    self_attention: str = "dense"
    vsa_sparsity: float = 0.0

    def replace(self, **overrides: Any) -> "PipelineConfig":
        """A copy with fields replaced; an unknown field is an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"{type(self).__name__} has no field(s) {bad}; fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def validate(self) -> "PipelineConfig":
        """``UserError`` naming the field for a value the pipeline cannot use (checked before any loading)."""
        if self.flow_shift is not None:
            check_number("flow_shift", self.flow_shift, low=0.0, low_open=True)
        precisions = {"dit_precision": self.dit_precision, "vae_decode_precision": self.vae_decode_precision,
                      "image_encoder_precision": self.image_encoder_precision}
        if not isinstance(self.text_encoder_precisions, tuple) or not self.text_encoder_precisions:
            raise UserError(f"text_encoder_precisions must be a non-empty tuple, got {self.text_encoder_precisions!r}")
        precisions.update({f"text_encoder_precisions[{i}]": p for i, p in enumerate(self.text_encoder_precisions)})
        for name, value in precisions.items():
            if value not in PRECISION_TO_DTYPE:
                raise UserError(f"{name} must be one of {sorted(PRECISION_TO_DTYPE)}, got {value!r}")
        check_int("text_len", self.text_len)
        if self.text_len < 1:
            raise UserError(f"text_len must be at least 1, got {self.text_len}")
        for name in ("vae_tiling", "clean_prompts", "text_encoder_offload", "expand_timesteps", "expert_offload"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.boundary_ratio is not None:
            check_number("boundary_ratio", self.boundary_ratio)
            if not 0 < self.boundary_ratio < 1:
                raise UserError(f"boundary_ratio must be in (0, 1) (the fraction of the 1000 training timesteps "
                                f"where the low-noise expert takes over), got {self.boundary_ratio}")
        if self.dmd_denoising_steps is not None:
            check_dmd_steps(self.dmd_denoising_steps)
        if self.self_attention not in ("dense", "video_sparse"):
            raise UserError(f"self_attention must be 'dense' or 'video_sparse', got {self.self_attention!r}")
        check_number("vsa_sparsity", self.vsa_sparsity)
        if not 0 <= self.vsa_sparsity < 1:
            raise UserError(f"vsa_sparsity must be in [0, 1) (the fraction of KV cubes video sparse attention "
                            f"skips), got {self.vsa_sparsity}")
        return self

    def dit_overrides(self) -> dict[str, Any]:
        """What the transformers' configs take from this pipeline config besides their precision."""
        if self.self_attention == "video_sparse":
            return {"attention_backend": "video_sparse_attn", "vsa_sparsity": float(self.vsa_sparsity)}
        return {}


def check_dmd_steps(steps: Any, name: str = "dmd_denoising_steps", num_train_timesteps: int = 1000) -> None:
    """A non-empty tuple of integer timesteps, strictly decreasing, in [1, num_train_timesteps]; else
    ``UserError`` naming ``name``."""
    if not isinstance(steps, tuple) or not steps:
        raise UserError(f"{name} must be a non-empty tuple of timesteps such as (1000, 757, 522), got {steps!r}")
    for i, t in enumerate(steps):
        check_int(f"{name}[{i}]", t)
        if not 1 <= t <= num_train_timesteps:
            raise UserError(f"{name}[{i}] must be in [1, {num_train_timesteps}], got {t}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise UserError(f"{name} must be strictly decreasing, got {steps}")
