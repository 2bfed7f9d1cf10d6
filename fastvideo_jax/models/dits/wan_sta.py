"""Sliding-tile self-attention plan of the Wan DiT: per-layer windows as a static palette plus per-layer ids.

The DiT runs all layers as one scan; each layer's entry in the palette is scanned data (``StaLayer.index``),
so per-layer windows, and per-step windows a pipeline passes at run time, never add a compile.
"""

from __future__ import annotations

import dataclasses

import jax

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.attention.sliding_tile_mask import palette_of
from fastvideo_jax.configs.models.dits.wanvideo import WanVideoConfig


@dataclasses.dataclass(frozen=True)
class StaPlan:
    """Sliding-tile self-attention in every layer. ``palette``: the distinct per-head window sets (static);
    ``layer_ids[i]``: layer i's entry. The layers run as ONE scan that takes each layer's entry as scanned data,
    so per-layer (and, from the pipeline, per-step) windows never add a compile. ``tile``: (t, h, w) tokens,
    or "auto" (the tile that pads the latent grid least, see ``choose_tile``; windows count in those tiles)."""

    tile: tuple[int, int, int] | str
    palette: tuple[tuple[tuple[int, int, int], ...], ...]
    layer_ids: tuple[int, ...]


def sta_plan(config: WanVideoConfig) -> StaPlan | None:
    """The config's sliding-tile plan, or None for dense self-attention (see ``WanVideoConfig``)."""
    cfg = config.arch_config
    if AttentionBackend.parse(config.attention_backend) is AttentionBackend.SLIDING_TILE_ATTN:
        config = dataclasses.replace(config, self_attention_backend="sliding_tile")
    if config.self_attention_backend in (None, "dense"):
        return None
    if config.self_attention_backend != "sliding_tile":
        raise ValueError(f"self_attention_backend must be None, 'dense' or 'sliding_tile', "
                         f"got {config.self_attention_backend!r}")
    windows = config.sta_layer_windows
    if windows is None:
        windows = (config.sta_window,) * cfg.num_layers
    if len(windows) != cfg.num_layers:
        raise ValueError(f"sta_layer_windows has {len(windows)} entries for {cfg.num_layers} layers")
    tile = config.sta_tile if isinstance(config.sta_tile, str) else tuple(int(t) for t in config.sta_tile)
    if isinstance(tile, str) and tile != "auto":
        raise ValueError(f"sta_tile must be (t, h, w) or 'auto', got {tile!r}")
    return StaPlan(tile, *palette_of(windows, cfg.num_attention_heads))


@dataclasses.dataclass(frozen=True)
class StaLayer:
    """What one scanned layer's self-attention needs: static geometry and palette, and its traced index."""

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    palette: tuple
    index: jax.Array
