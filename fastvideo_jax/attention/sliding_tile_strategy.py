"""FastVideo sliding-tile attention mask strategy JSON (``FASTVIDEO_ATTENTION_CONFIG``).

``{"<step>_<layer>_<head>": [wt, wh, ww], ...}``: one window (in tiles) per denoising step index, layer and head.
:func:`load_mask_strategy` reads it into a :class:`MaskStrategy`. Window semantics: ``sliding_tile_mask``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fastvideo_jax.attention.sliding_tile_mask import Int3, _int3, palette_of


@dataclass(frozen=True)
class MaskStrategy:
    """Windows per (denoising step, layer, head), as in FastVideo's STA mask-strategy JSON."""

    table: Mapping[tuple[int, int, int], Int3]

    @property
    def num_steps(self) -> int:
        return 1 + max(k[0] for k in self.table)

    @property
    def num_layers(self) -> int:
        return 1 + max(k[1] for k in self.table)

    @property
    def num_heads(self) -> int:
        return 1 + max(k[2] for k in self.table)

    def windows(self, step: int, layer: int, num_heads: int | None = None) -> tuple[Int3, ...]:
        """Per-head windows for one step and layer (a tuple, hashable: pass it as ``window=``)."""
        n = self.num_heads if num_heads is None else num_heads
        missing = [h for h in range(n) if (step, layer, h) not in self.table]
        if missing:
            raise KeyError(f"mask strategy has no window for step {step}, layer {layer}, heads {missing[:8]}")
        return tuple(self.table[(step, layer, h)] for h in range(n))

    def layer_windows(self, step: int, num_layers: int | None = None, num_heads: int | None = None):
        """Per-layer per-head windows for one step: tuple (num_layers) of tuples (num_heads)."""
        L = self.num_layers if num_layers is None else num_layers
        return tuple(self.windows(step, layer, num_heads) for layer in range(L))

    def palette_schedule(self, num_steps: int, num_layers: int, num_heads: int):
        """``(palette, ids)``: the distinct per-head window sets (static, a tuple) and, for every step and layer,
        the index of its set (int32 (num_steps, num_layers), runtime data: steps then share one executable).
        A step, layer or head the strategy does not cover is a KeyError naming it."""
        if num_steps > self.num_steps:
            raise KeyError(f"mask strategy covers {self.num_steps} denoising steps; {num_steps} were requested")
        steps = [w for step in range(num_steps) for w in self.layer_windows(step, num_layers, num_heads)]
        palette, ids = palette_of(steps, num_heads)
        return palette, np.asarray(ids, np.int32).reshape(num_steps, num_layers)


def load_mask_strategy(source: str | os.PathLike | Mapping) -> MaskStrategy:
    """Read FastVideo's ``{"step_layer_head": [wt, wh, ww]}`` JSON (path, JSON text or dict)."""
    if isinstance(source, Mapping):
        raw = source
    else:
        text = str(source)
        if text.lstrip().startswith("{"):
            raw = json.loads(text)
        else:
            with open(source) as f:
                raw = json.load(f)
    table = {}
    for key, value in raw.items():
        parts = str(key).split("_")
        if len(parts) != 3:
            raise ValueError(f"mask strategy key {key!r} is not 'step_layer_head'")
        table[tuple(int(p) for p in parts)] = _int3(f"window for {key}", value)
    if not table:
        raise ValueError("empty mask strategy")
    return MaskStrategy(table)
