"""A LoRA on a pipeline's DiT: attached from a file, merged into the weights (no per-step cost) or kept
separate (switching to another adapter of the same ranks then reuses the compiled steps), rescaled, switched or
dropped without reloading the model. Merged weights are restored bit for bit before a switch."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from flax import nnx

from fastvideo_jax.errors import UserError
from fastvideo_jax.models.layers.lora import (
    MergedKernels, adapted_layers, attach_lora, merge_lora, remove_lora, set_lora_strength, unmerge_lora,
)
from fastvideo_jax.models.loader.lora_io import lora_file, read_lora

__all__ = ["LoRASlot", "check_lora_scale", "rescale_lora", "switch_lora"]


@dataclasses.dataclass(frozen=True)
class LoRASlot:
    """What is attached to a DiT: the file (None: nothing), its scale, and the kernels a merge replaced."""

    path: Path | None = None
    scale: float = 1.0
    merged: MergedKernels | None = None


def check_lora_scale(scale: float) -> float:
    """The LoRA scale as a float; ``UserError`` unless it is a finite number."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise UserError(f"lora_scale must be a number, got {scale!r}") from None
    if not math.isfinite(value):
        raise UserError(f"lora_scale must be finite, got {scale!r}")
    return value


def _detach(dit: nnx.Module, slot: LoRASlot) -> None:
    if slot.merged is not None:
        unmerge_lora(dit, slot.merged)
    if adapted_layers(dit):
        remove_lora(dit)


def switch_lora(dit: nnx.Module, slot: LoRASlot, path: str | os.PathLike | None, scale: float = 1.0, *,
                merge: bool = True) -> LoRASlot:
    """Replace the DiT's LoRA (``slot``) by the one in ``path`` (None: none) at ``scale``. The new file is read
    and checked against the DiT before anything changes."""
    scale = check_lora_scale(scale)
    weights = None if path is None else read_lora(path, dit)
    _detach(dit, slot)
    if weights is None:
        return LoRASlot()
    attach_lora(dit, weights, strength=scale)
    return LoRASlot(lora_file(path), scale, merge_lora(dit) if merge else None)


def rescale_lora(dit: nnx.Module, slot: LoRASlot, scale: float) -> LoRASlot:
    """The attached LoRA at another scale, without reading its file again (a merged one is unmerged exactly,
    rescaled and merged again)."""
    scale = check_lora_scale(scale)
    if slot.path is None:
        raise UserError("no LoRA is attached: load one first (lora=PATH / set_lora(PATH))")
    if slot.merged is not None:
        unmerge_lora(dit, slot.merged)
    set_lora_strength(dit, scale)
    return LoRASlot(slot.path, scale, merge_lora(dit) if slot.merged is not None else None)
