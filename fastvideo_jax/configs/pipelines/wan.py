"""Wan pipeline presets (FastVideo's values, ``fastvideo/configs/pipelines/wan.py``): flow shift, per-component
precision and the Wan2.2 / FastWan sampling knobs."""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.pipelines.base import PipelineConfig

# FastWan's few-step DMD schedule (FastVideo's FastWan configs and its DmdDenoisingStage).
FASTWAN_DMD_STEPS = (1000, 757, 522)
# FastVideo's DmdDenoisingStage samples with its own FlowMatchEulerDiscreteScheduler(shift=8.0), whatever the
# config's flow_shift: the FastWan presets carry 8.0 as the shift their DMD sampling actually uses.
FASTWAN_DMD_SHIFT = 8.0


@dataclasses.dataclass(frozen=True)
class WanT2V480PConfig(PipelineConfig):
    flow_shift: float | None = 3.0
    dit_precision: str = "bf16"
    vae_decode_precision: str = "bf16"
    text_encoder_precisions: tuple[str, ...] = ("fp32",)


@dataclasses.dataclass(frozen=True)
class WanT2V720PConfig(WanT2V480PConfig):
    flow_shift: float | None = 5.0


@dataclasses.dataclass(frozen=True)
class WanI2V480PConfig(WanT2V480PConfig):
    """Wan2.1 image-to-video (CLIP vision features + the VAE-encoded first frame): the CLIP vision tower in fp32
    as FastVideo (``image_encoder_precision``); the VAE encodes the image at ``vae_decode_precision`` (one VAE
    serves both directions)."""

    image_encoder_precision: str = "fp32"


@dataclasses.dataclass(frozen=True)
class WanI2V720PConfig(WanI2V480PConfig):
    flow_shift: float | None = 5.0


@dataclasses.dataclass(frozen=True)
class Wan22TI2V5BConfig(WanT2V480PConfig):
    """Wan2.2 TI2V-5B: text- and image-to-video in one DiT with per-token timesteps (48-channel Wan2.2 VAE)."""

    flow_shift: float | None = 5.0
    expand_timesteps: bool = True


@dataclasses.dataclass(frozen=True)
class Wan22T2VA14BConfig(WanT2V480PConfig):
    """Wan2.2 T2V A14B: two experts, the low-noise one below timestep 0.875 * 1000."""

    flow_shift: float | None = 12.0
    boundary_ratio: float | None = 0.875


@dataclasses.dataclass(frozen=True)
class Wan22I2VA14BConfig(WanI2V480PConfig):
    """Wan2.2 I2V A14B: two 36-channel experts (no CLIP image branch), switching at 0.9 * 1000."""

    flow_shift: float | None = 5.0
    boundary_ratio: float | None = 0.900


@dataclasses.dataclass(frozen=True)
class FastWan21T2V480PConfig(WanT2V480PConfig):
    """FastWan2.1 T2V: 3-step DMD, no CFG, video sparse attention at sparsity 0.8 (the checkpoints are trained
    with VSA and carry each block's to_gate_compress; FastVideo's FastWan examples run VSA_sparsity=0.8)."""

    flow_shift: float | None = FASTWAN_DMD_SHIFT
    dmd_denoising_steps: tuple[int, ...] | None = FASTWAN_DMD_STEPS
    self_attention: str = "video_sparse"
    vsa_sparsity: float = 0.8


@dataclasses.dataclass(frozen=True)
class FastWan22TI2V5BConfig(Wan22TI2V5BConfig):
    """FastWan2.2 TI2V-5B: 3-step DMD on the TI2V-5B DiT, no CFG, dense attention (the "FullAttn" checkpoint's
    own mode; FastVideo's config keeps flow_shift 5.0 but its DMD stage samples with shift 8.0, used here)."""

    flow_shift: float | None = FASTWAN_DMD_SHIFT
    dmd_denoising_steps: tuple[int, ...] | None = FASTWAN_DMD_STEPS


@dataclasses.dataclass(frozen=True)
class WanTinyConfig(WanT2V480PConfig):
    """The random-weight tiny checkpoint: everything fp32 (it runs on CPU in seconds), short text."""

    dit_precision: str = "fp32"
    vae_decode_precision: str = "fp32"
    text_len: int = 32
