"""DiT config bases: architecture fields every video DiT has, plus our DiT knobs."""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.models.base import ArchConfig, ModelConfig, derived, internal

# An ordered name mapping: (anchored regex, target). A target is a replacement string, or
# (replacement, part_index, num_parts) when several checkpoint tensors merge into one parameter.
NameMapping = tuple[tuple[str, "str | tuple[str, int, int]"], ...]


@dataclasses.dataclass(frozen=True)
class DiTArchConfig(ArchConfig):
    """Fields shared by video DiTs. Name mappings are class data, never read from config.json."""

    param_names_mapping: NameMapping = internal(())
    reverse_param_names_mapping: NameMapping = internal(())
    lora_param_names_mapping: NameMapping = internal(())
    # Prefixes whose numbered children are stacked into one scanned parameter tree ("blocks.N.*").
    scanned_prefixes: tuple[str, ...] = internal(())
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
