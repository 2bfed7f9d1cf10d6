"""diffusers' VAE tiling, shared by the VAEs: overlapping tiles run separately, then linearly blended.

Layout is PyTorch's (B, C, F, H, W). As in diffusers, each tile is blended (in place there) into its already
blended predecessor, so the order of blending is part of the function.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["blend", "tile_and_blend", "temporal_tile_and_blend"]


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
