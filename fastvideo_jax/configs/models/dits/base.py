"""DiT config bases: architecture fields every video DiT has, plus our DiT knobs."""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.models.base import MappedArchConfig, ModelConfig, NameMapping, derived, internal

__all__ = ["DiTArchConfig", "DiTConfig", "NameMapping"]


@dataclasses.dataclass(frozen=True)
class DiTArchConfig(MappedArchConfig):
    """Fields shared by video DiTs. Name mappings are class data, never read from config.json."""

    lora_param_names_mapping: NameMapping = internal(())
    exclude_lora_layers: tuple[str, ...] = internal(())
    boundary_ratio: float | None = internal(None)
    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 1
    hidden_size: int = derived(0)
    num_channels_latents: int = derived(0)


@dataclasses.dataclass(frozen=True)
class DiTConfig(ModelConfig):
    """Our DiT knobs: parameter precision ("bf16" keeps norms, modulation and RoPE in fp32) and attention."""

    arch_config: DiTArchConfig = dataclasses.field(default_factory=DiTArchConfig)
    precision: str = "bf16"
    # An ``AttentionBackend`` name ("reference", "cudnn", ...) or None for the platform's best.
    attention_backend: str | None = None
