"""diffusers' VAE tiling, shared by the VAEs: overlapping tiles run separately, then linearly blended.

Layout is PyTorch's (B, C, F, H, W). As in diffusers, each tile is blended (in place there) into its already
blended predecessor, so the order of blending is part of the function.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["blend", "masked_tile_average", "temporal_tile_and_blend", "tile_and_blend", "tile_starts"]


def blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' blend_v/blend_h/blend_t: the first ``extent`` entries of ``b`` along ``axis`` fade in over the
    last entries of ``a``."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    w = np.arange(extent, dtype=np.float64) / extent
    bshape = (extent,) + (1,) * (b.ndim - axis - 1)
    w_b, w_a = (jnp.asarray(v.reshape(bshape), b.dtype) for v in (w, 1.0 - w))
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head, b_rest = jnp.split(b, [extent], axis=axis)
    return jnp.concatenate([a_tail * w_a + b_head * w_b, b_rest], axis=axis)


def tile_and_blend(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,  # (B, C, F, H, W)
    tile: tuple[int, int],
    stride: tuple[int, int],
    extent: tuple[int, int],
    keep: tuple[int, int],
    size: tuple[int, int],
) -> jax.Array:  # (B, C', F', size[0], size[1])
    """Run ``fn`` on overlapping spatial tiles, blend each tile into its (already blended) upper and left
    neighbours over ``extent``, keep the top-left ``keep`` of every tile and crop to ``size`` (diffusers' order)."""
    rows: list[list[jax.Array]] = []
    for i in range(0, x.shape[3], stride[0]):
        row: list[jax.Array] = []
        for j in range(0, x.shape[4], stride[1]):
            out = fn(x[..., i : i + tile[0], j : j + tile[1]])
            if rows:
                out = blend(rows[-1][len(row)], out, extent[0], axis=3)
            if row:
                out = blend(row[-1], out, extent[1], axis=4)
            row.append(out)
        rows.append(row)
    kept = [jnp.concatenate([t[..., : keep[0], : keep[1]] for t in row], axis=4) for row in rows]
    return jnp.concatenate(kept, axis=3)[..., : size[0], : size[1]]


def temporal_tile_and_blend(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,  # (B, C, F, H, W)
    tile: int,
    stride: int,
    extent: int,
    keep: int,
    size: int,
    out_frames: Callable[[int], int],
) -> jax.Array:  # (B, C', size, H', W')
    """diffusers' ``_temporal_tiled_encode/decode``: ``fn`` on frames [i, i + tile] (one extra frame) every
    ``stride``; every tile but the first loses its first output frame, is blended into its (blended)
    predecessor over ``extent`` frames and keeps ``keep`` frames (the first keeps ``keep + 1``); cropped to
    ``size``. ``out_frames(n)`` is the output length of ``n`` input frames: a tile left with no frames after its
    first is dropped is not run (it would contribute nothing)."""
    row: list[jax.Array] = []
    for i in range(0, x.shape[2], stride):
        part = x[:, :, i : i + tile + 1]
        if i > 0 and out_frames(part.shape[2]) <= 1:
            continue
        out = fn(part)
        if i > 0:
            out = blend(row[-1], out[:, :, 1:], extent, axis=2)
        row.append(out)
    kept = [t[:, :, : keep + (1 if n == 0 else 0)] for n, t in enumerate(row)]
    return jnp.concatenate(kept, axis=2)[:, :, :size]


def _ramp_mask(length: int, first: bool, last: bool, border: int) -> np.ndarray:
    """diffsynth's ``build_1d_mask``: ones, ramping up over the first ``border`` entries unless the tile is
    ``first`` and down over the last ``border`` unless it is ``last`` (the down ramp written last). A tile that
    is neither first nor last is at least ``border`` long (``tile_starts`` skips any shorter one)."""
    mask = np.ones((length,), np.float32)
    ramp = (np.arange(border, dtype=np.float32) + 1) / border
    if not first:
        mask[:border] = ramp
    if not last:
        mask[length - border:] = ramp[::-1]
    return mask


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins every ``stride`` along ``size``, skipping those after a tile that already reached the end."""
    return [i for i in range(0, size, stride) if not (i - stride >= 0 and i - stride + tile >= size)]


def masked_tile_average(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,  # (B, C, F, h, w)
    tile: tuple[int, int],
    stride: tuple[int, int],
    scale: int,
) -> jax.Array:  # (B, C', F', h scale, w scale)
    """DiffSynth's tiled decode (its StepVideo VAE): ``fn`` on overlapping ``tile`` latent tiles every ``stride``,
    each weighted by a mask that ramps linearly over the overlap (``(tile - stride) scale`` pixels) on every side
    that is not the frame's edge, summed, and divided by the summed masks."""
    H, W = x.shape[3:]
    border = ((tile[0] - stride[0]) * scale, (tile[1] - stride[1]) * scale)
    values = weight = None
    for i in tile_starts(H, tile[0], stride[0]):
        for j in tile_starts(W, tile[1], stride[1]):
            out = fn(x[..., i : i + tile[0], j : j + tile[1]])
            if values is None:
                values = jnp.zeros((*out.shape[:3], H * scale, W * scale), out.dtype)
                weight = jnp.zeros((H * scale, W * scale), out.dtype)
            rows, cols = out.shape[3:]
            mask = np.minimum(_ramp_mask(rows, i == 0, i + tile[0] >= H, border[0])[:, None],
                              _ramp_mask(cols, j == 0, j + tile[1] >= W, border[1])[None, :])
            mask = jnp.asarray(mask, out.dtype)
            at = (slice(i * scale, i * scale + rows), slice(j * scale, j * scale + cols))
            values = values.at[..., at[0], at[1]].add(out * mask)
            weight = weight.at[at].add(mask)
    return values / weight
