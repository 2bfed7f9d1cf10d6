"""DiT config bases: architecture fields every video DiT has, plus our DiT knobs."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastvideo_jax.configs.models.base import MappedArchConfig, ModelConfig, NameMapping, derived, internal

__all__ = ["DiTArchConfig", "DiTConfig", "NameMapping", "REMAT_POLICY_NAMES", "SlidingTileDiTConfig"]

# Rematerialisation policies of a DiT's scanned blocks (``models/layers/remat.py`` maps them to JAX policies).
REMAT_POLICY_NAMES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class DiTArchConfig(MappedArchConfig):
    """Fields shared by video DiTs. Name mappings are class data, never read from config.json."""

    lora_param_names_mapping: NameMapping = internal(())
    exclude_lora_layers: tuple[str, ...] = internal(())
    # Layers that get LoRA adapters for training: suffixes of our module paths (models/layers/lora.py).
    lora_target_modules: tuple[str, ...] = internal(())
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


@dataclasses.dataclass(frozen=True)
class SlidingTileDiTConfig(DiTConfig):
    """A DiT whose video self-attention can be sliding-tile (``models/dits/sta.py``). Dense (``attention_backend``)
    unless ``self_attention_backend`` is ``"sliding_tile"`` (or ``attention_backend`` is ``SLIDING_TILE_ATTN``):
    then sliding-tile attention in every attention layer with ``sta_tile`` tiles ((t, h, w) tokens, or "auto": the
    tile that pads the latent grid least) and, per layer, the window ``sta_layer_windows[i]`` if given (a
    (wt, wh, ww) in tiles, one per head, or None = the full window, i.e. dense), else ``sta_window`` for every
    layer (None = the full window). All layers run in one scan per block kind whatever their windows; a pipeline
    can also pick windows per step at run time (``mask_strategy=``)."""

    self_attention_backend: str | None = None
    sta_tile: tuple[int, int, int] | str = (6, 8, 8)
    sta_window: Any = None
    sta_layer_windows: tuple | None = None
