"""Sliding-tile attention plan of a DiT (Wan, HunyuanVideo): per-layer windows as a static palette plus per-layer
ids, the run-time inputs checked, and the per-device view of the palette under sequence parallelism.

The DiT runs its layers as scans; each layer's entry in the palette is scanned data (``StaLayer.index``), so
per-layer windows, and per-step windows a pipeline passes at run time, never add a compile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.attention.sliding_tile import auto_sta_tile
from fastvideo_jax.attention.sliding_tile_mask import normalize_windows, palette_of
from fastvideo_jax.configs.models.dits.base import SlidingTileDiTConfig
from fastvideo_jax.parallel.sequence import head_chunk_index, head_chunks

__all__ = ["StaLayer", "StaPlan", "chunked_palette", "sta_inputs", "sta_plan", "sta_scan_inputs"]


@dataclasses.dataclass(frozen=True)
class StaPlan:
    """Sliding-tile attention in every layer. ``palette``: the distinct per-head window sets (static);
    ``layer_ids[i]``: layer i's entry. The layers run as scans that take each layer's entry as scanned data,
    so per-layer (and, from the pipeline, per-step) windows never add a compile. ``tile``: (t, h, w) tokens,
    or "auto" (the tile that pads the latent grid least, see ``choose_tile``; windows count in those tiles)."""

    tile: tuple[int, int, int] | str
    palette: tuple[tuple[tuple[int, int, int], ...], ...]
    layer_ids: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)


def sta_plan(config: SlidingTileDiTConfig, num_layers: int | None = None) -> StaPlan | None:
    """The config's sliding-tile plan over ``num_layers`` attention layers (default: the arch's ``num_layers``),
    or None for dense attention (see ``SlidingTileDiTConfig``)."""
    cfg = config.arch_config
    num_layers = cfg.num_layers if num_layers is None else num_layers
    if AttentionBackend.parse(config.attention_backend) is AttentionBackend.SLIDING_TILE_ATTN:
        config = dataclasses.replace(config, self_attention_backend="sliding_tile")
    if config.self_attention_backend in (None, "dense"):
        return None
    if config.self_attention_backend != "sliding_tile":
        raise ValueError(f"self_attention_backend must be None, 'dense' or 'sliding_tile', "
                         f"got {config.self_attention_backend!r}")
    windows = config.sta_layer_windows
    if windows is None:
        windows = (config.sta_window,) * num_layers
    if len(windows) != num_layers:
        raise ValueError(f"sta_layer_windows has {len(windows)} entries for {num_layers} layers")
    tile = config.sta_tile if isinstance(config.sta_tile, str) else tuple(int(t) for t in config.sta_tile)
    if isinstance(tile, str) and tile != "auto":
        raise ValueError(f"sta_tile must be (t, h, w) or 'auto', got {tile!r}")
    return StaPlan(tile, *palette_of(windows, cfg.num_attention_heads))


def sta_inputs(plan: StaPlan | None, ids, palette, num_heads: int):
    """``(palette, ids)`` for one call: the run-time ``sta_palette`` / ``sta_layer_ids`` if given (checked on the
    host), else the plan's; ``(None, None)`` for a dense model (which refuses them)."""
    if plan is None:
        if ids is not None or palette is not None:
            raise ValueError("sta_layer_ids / sta_palette need a sliding-tile model "
                             "(self_attention_backend='sliding_tile')")
        return None, None
    if palette is None:
        palette = plan.palette
    else:
        palette = tuple(normalize_windows(w, num_heads) for w in palette)
    if ids is None:
        ids = np.asarray(plan.layer_ids, np.int32)
    if jnp.shape(ids) != (plan.num_layers,):
        raise ValueError(f"sta_layer_ids must have shape ({plan.num_layers},), got {jnp.shape(ids)}")
    if not isinstance(ids, jax.core.Tracer):
        ids = np.asarray(ids, np.int32)  # host data: checked here, no eager device ops
        if not ((ids >= 0) & (ids < len(palette))).all():
            raise ValueError(f"sta_layer_ids {ids.tolist()} must index the {len(palette)} window sets "
                             "of sta_palette")
    return palette, ids


def sta_scan_inputs(plan: StaPlan, palette, ids, grid, like: jax.ShapeDtypeStruct):
    """``(grid, tile, palette, ids)`` the layer scans take (traced ids clipped into the palette); an "auto" tile
    is chosen for q/k/v shaped like ``like`` (B, L, N, E)."""
    tile = plan.tile
    if tile == "auto":
        tile = auto_sta_tile(grid, like)
    return tuple(grid), tile, palette, jnp.clip(ids, 0, len(palette) - 1)


@dataclasses.dataclass(frozen=True)
class StaLayer:
    """What one scanned layer's attention needs: static geometry and palette, and its traced index."""

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    palette: tuple
    index: jax.Array

    def device_view(self) -> tuple[tuple, object]:
        """``(palette, index)`` for the heads one device holds inside a Ulysses region (call it there): the
        palette cut per head chunk (entry c * K + k: chunk c's heads under window set k) and this layer's entry
        for this device's chunk (the chunk is known inside the shard_map only)."""
        palette, chunks = chunked_palette(self.palette, len(self.palette[0]))
        index = self.index if chunks == 1 else head_chunk_index() * len(self.palette) + self.index
        return palette, index


def chunked_palette(palette, num_heads: int) -> tuple[tuple, int]:
    """``(palette cut per head chunk, chunks)`` for the current mesh's head chunks (tensor x sequence)."""
    chunks = head_chunks()
    per = num_heads // chunks
    return tuple(w[c * per:(c + 1) * per] for c in range(chunks) for w in palette), chunks
