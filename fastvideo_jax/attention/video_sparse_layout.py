"""Video sparse attention (VSA) layout: 4x4x4 token cubes, their valid-token counts, and top-k from sparsity.

Static numpy, one set per latent grid (cached).

Token layout (FastVideo ``video_sparse_attn``: ``get_tile_partition_indices`` / ``get_non_pad_index``)
------------------------------------------------------------------------------------------------------
The DiT keeps video tokens in row-major (t, h, w) order. VSA works in *cube-major* order: the (T, H, W) grid is
cut into cubes of ``tile = (4, 4, 4)`` tokens, numbered row-major over the cube grid; every cube occupies a slot
of 64 positions. A ragged grid (a side not a multiple of 4) makes its border cubes partial: such a cube's real
tokens come first in its slot (row-major inside the cube) and the rest of the slot is zero padding. So each cube's
valid tokens are a prefix of its slot, counted by ``cube_sizes`` (FastVideo's ``variable_block_sizes``): the
coarse stage divides the pooled sums by it and the fine stage masks keys past it. Every cube holds at least one
real token.

Top-k (FastVideo's current ``compute_topk``)
------------------------------------------
``k = clamp(ceil((1 - sparsity) * num_cubes), 1, num_cubes)``, computed exactly on the keep fraction in parts
per million (the float product overshoots at exact multiples: 0.2 * 455 = 91.00000000000001). FastVideo 0.1.7
used ``ceil((1 - sparsity) * T*H*W / 64)`` instead, which equals it when the grid is a cube multiple and keeps
fewer cubes than exist on ragged grids even at sparsity 0; the current rule (FastVideo PR #1517) makes sparsity 0
dense on every grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Int3 = tuple[int, int, int]

VSA_TILE: Int3 = (4, 4, 4)  # FastVideo VSA_TILE_SIZE
CUBE_TOKENS = 64  # positions per cube slot: the fine stage's block size

__all__ = ["CUBE_TOKENS", "CubeLayout", "VSA_TILE", "check_sparsity", "cube_layout", "topk_count",
           "traced_topk_count"]


def _int3(name: str, value) -> Int3:
    t = tuple(int(x) for x in value)
    if len(t) != 3 or any(x < 1 for x in t):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class CubeLayout:
    """Cube-major layout of a (T, H, W) token grid.

    ``src[s]``: the row-major token held by cube-major slot ``s`` (-1 for padding); ``inv[r]``: the slot of
    row-major token ``r``; ``sizes[c]``: real tokens in cube ``c`` (a prefix of its slot)."""

    grid: Int3
    tile: Int3
    src: np.ndarray
    inv: np.ndarray
    sizes: np.ndarray

    @property
    def cube_grid(self) -> Int3:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))  # type: ignore[return-value]

    @property
    def num_cubes(self) -> int:
        return math.prod(self.cube_grid)

    @property
    def video_len(self) -> int:
        return math.prod(self.grid)

    @property
    def padded_len(self) -> int:
        return self.num_cubes * CUBE_TOKENS

    @property
    def ragged(self) -> bool:
        return self.padded_len != self.video_len

    def valid(self) -> np.ndarray:
        """bool (padded_len,): which cube-major positions hold a real token."""
        return self.src >= 0

    def to_cubes(self, x: jax.Array) -> jax.Array:
        """(B, T*H*W, ...) row-major -> (B, padded_len, ...) cube-major, padding zero-filled."""
        if x.shape[1] != self.video_len:
            raise ValueError(f"sequence length {x.shape[1]} != T*H*W = {self.video_len} for grid {self.grid}")
        if not self.ragged:  # a cube-multiple grid is a pure reshape/transpose (no gather)
            return self._reshape_to(x)
        zero = jnp.zeros((x.shape[0], 1) + x.shape[2:], x.dtype)
        padded = jnp.concatenate([x, zero], axis=1)  # row L is the zero that padding slots read
        return jnp.take(padded, jnp.asarray(np.where(self.src >= 0, self.src, self.video_len)), axis=1)

    def from_cubes(self, y: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_cubes` (padding dropped): (B, padded_len, ...) -> (B, T*H*W, ...)."""
        if not self.ragged:
            return self._reshape_from(y)
        return jnp.take(y, jnp.asarray(self.inv), axis=1)

    def _reshape_to(self, x):
        (nt, nh, nw), (tt, th, tw) = self.cube_grid, self.tile
        rest = x.shape[2:]
        x = x.reshape(x.shape[0], nt, tt, nh, th, nw, tw, *rest)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + len(rest)))
        return x.reshape(x.shape[0], self.padded_len, *rest)

    def _reshape_from(self, y):
        (nt, nh, nw), (tt, th, tw) = self.cube_grid, self.tile
        rest = y.shape[2:]
        y = y.reshape(y.shape[0], nt, nh, nw, tt, th, tw, *rest)
        y = y.transpose(0, 1, 4, 2, 5, 3, 6, *range(7, 7 + len(rest)))
        return y.reshape(y.shape[0], self.video_len, *rest)


@functools.lru_cache(maxsize=32)
def cube_layout(grid, tile: Int3 = VSA_TILE) -> CubeLayout:
    grid, tile = _int3("grid", grid), _int3("tile", tile)
    if math.prod(tile) != CUBE_TOKENS:
        raise ValueError(f"VSA cubes hold {CUBE_TOKENS} tokens (FastVideo's 4x4x4); tile {tile} holds "
                         f"{math.prod(tile)}")
    T, H, W = grid
    cube_grid = tuple(-(-g // t) for g, t in zip(grid, tile))
    r = np.arange(T * H * W)
    t, h, w = r // (H * W), (r // W) % H, r % W
    cube = (t // tile[0] * cube_grid[1] + h // tile[1]) * cube_grid[2] + w // tile[2]
    order = np.argsort(cube, kind="stable")  # tokens grouped by cube, row-major inside each cube
    n = math.prod(cube_grid)
    sizes = np.bincount(cube, minlength=n).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(r.size) - starts[cube[order]]
    slot = cube[order] * CUBE_TOKENS + rank
    src = np.full(n * CUBE_TOKENS, -1, np.int64)
    src[slot] = order
    inv = np.empty(r.size, np.int64)
    inv[order] = slot
    for a in (src, inv, sizes):
        a.setflags(write=False)
    return CubeLayout(grid, tile, src, inv, sizes)


def check_sparsity(sparsity) -> float:
    """A Python/NumPy number in [0, 1), returned as float; ``ValueError`` naming the value otherwise."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"vsa sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise ValueError(f"vsa sparsity must be in [0, 1) (the fraction of KV cubes each query cube skips), got {s}")
    return s


def topk_count(sparsity: float, num_cubes: int) -> int:
    """KV cubes each query cube keeps: ``clamp(ceil((1 - sparsity) * num_cubes), 1, num_cubes)``, exact."""
    keep_ppm = round((1.0 - check_sparsity(sparsity)) * 1_000_000)
    return max(1, min(-(-keep_ppm * num_cubes // 1_000_000), num_cubes))


def traced_topk_count(sparsity: jax.Array, num_cubes: int, capacity: int) -> jax.Array:
    """:func:`topk_count` for a traced sparsity (int32 scalar, clipped to [1, capacity]).

    Exact integer arithmetic on the keep fraction in units of 1/u, u the largest of 1e6, 1e5, ... with
    u * num_cubes < 2**31 (int32; 1e6 up to 2,147 cubes)."""
    unit = next((u for u in (10**6, 10**5, 10**4, 10**3) if u * num_cubes < 2**31), 100)
    keep = jnp.round((1.0 - jnp.asarray(sparsity, jnp.float32)) * unit).astype(jnp.int32)
    count = (keep * num_cubes + (unit - 1)) // unit
    return jnp.clip(count, 1, capacity).astype(jnp.int32)
