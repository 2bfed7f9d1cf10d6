"""Sliding-tile attention (STA) geometry, masks and block tables: static numpy, one set per shape.

Token layouts
-------------
The DiT keeps video tokens in row-major (t, h, w) order. STA works in *tile-major* order: the (T, H, W) grid is
cut into tiles of ``tile = (tt, th, tw)`` tokens, tiles are numbered row-major over the tile grid and the tokens
of one tile are contiguous (row-major inside the tile), exactly FastVideo's
``b (n_t ts_t n_h ts_h n_w ts_w) -> b (n_t n_h n_w ts_t ts_h ts_w)``. Grids that are not tile multiples are
padded up to whole tiles, and each tile occupies a *slot* of ``slot`` tokens (``tile_tokens`` rounded up to the
kernel alignment) so that kernel blocks never straddle two tiles. Padding positions are never attended to (the
kernels mask them as keys); their query rows are computed and dropped. Appended text tokens follow the video
slots, padded to a multiple of the slot (so one block size fits every region).

Window semantics (FastVideo STA, ``flex_sta_ref.py`` / the Triton mask kernel)
-----------------------------------------------------------------------------
Windows are counted in tiles per dimension, ``(wt, wh, ww)``. For a query tile at index ``i`` along a dimension
with ``n`` tiles the window centre is ``c = max(w // 2, min(i, n - 1 - w // 2))`` and key tile ``j`` is attended
iff ``|c - j| <= w // 2``. Windows are therefore clamped at the borders (every query tile sees the same number
of key tiles) and an even ``w`` covers ``w + 1`` tiles (``2 * (w // 2) + 1``), as in FastVideo; ``w >= n`` is the
full extent. Video queries also attend to every valid text token; text queries attend to every valid token.

The FastVideo mask-strategy JSON (per step/layer/head windows) is read by ``sliding_tile_strategy``; the lazy
splash (TPU) mask is built by ``sliding_tile_splash_mask``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastvideo_jax.attention._common import round_up

Int3 = tuple[int, int, int]

DEFAULT_TILE: Int3 = (6, 8, 8)  # FastVideo STA_base_tile_size: 384 tokens
# A window this large covers every tile along every dimension (FastVideo: w >= tiles -> full extent).
FULL_WINDOW: Int3 = (1 << 20, 1 << 20, 1 << 20)


def _int3(name: str, value: Sequence[int]) -> Int3:
    t = tuple(int(x) for x in value)
    if len(t) != 3 or any(x < 1 for x in t):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class TileGeometry:
    """Tile-major layout of a (T, H, W) token grid plus ``text_len`` appended text tokens.

    ``align``: kernel block alignment; every tile slot and the text region are padded to a multiple of it.
    """

    grid: Int3
    tile: Int3 = DEFAULT_TILE
    text_len: int = 0
    align: int = 1

    def __post_init__(self):
        object.__setattr__(self, "grid", _int3("grid", self.grid))
        object.__setattr__(self, "tile", _int3("tile", self.tile))
        if self.text_len < 0 or self.align < 1:
            raise ValueError(f"text_len must be >= 0 and align >= 1, got {self.text_len}, {self.align}")

    @property
    def tile_grid(self) -> Int3:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))  # type: ignore[return-value]

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tile_grid)

    @property
    def tile_tokens(self) -> int:
        return math.prod(self.tile)

    @property
    def slot(self) -> int:
        return round_up(self.tile_tokens, self.align)

    @property
    def video_len(self) -> int:
        return math.prod(self.grid)

    @property
    def padded_video_len(self) -> int:
        return self.num_tiles * self.slot

    @property
    def padded_text_len(self) -> int:
        return round_up(self.text_len, self.slot) if self.text_len else 0

    @property
    def seq_len(self) -> int:  # row-major sequence the caller passes
        return self.video_len + self.text_len

    @property
    def padded_len(self) -> int:  # tile-major sequence the kernels see
        return self.padded_video_len + self.padded_text_len

    @property
    def num_units(self) -> int:
        """Mask units: one per tile, plus one for the whole text region."""
        return self.num_tiles + (1 if self.text_len else 0)


# ----------------------------------------------------------------------------------------------------------
# Permutations (static numpy)
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _video_permutation(grid: Int3, tile: Int3, slot: int) -> tuple[np.ndarray, np.ndarray]:
    T, H, W = grid
    tt, th, tw = tile
    nT, nH, nW = (-(-g // t) for g, t in zip(grid, tile))
    t = (np.arange(nT)[:, None] * tt + np.arange(tt)[None, :])  # (nT, tt)
    h = (np.arange(nH)[:, None] * th + np.arange(th)[None, :])
    w = (np.arange(nW)[:, None] * tw + np.arange(tw)[None, :])
    # (nT, nH, nW, tt, th, tw) coordinates in tile-major order.
    tc = t[:, None, None, :, None, None]
    hc = h[None, :, None, None, :, None]
    wc = w[None, None, :, None, None, :]
    valid = (tc < T) & (hc < H) & (wc < W)
    rowmajor = (tc * H + hc) * W + wc
    src = np.where(valid, rowmajor, -1).reshape(nT * nH * nW, tt * th * tw)
    src = np.pad(src, ((0, 0), (0, slot - tt * th * tw)), constant_values=-1).reshape(-1)
    inv = np.empty(T * H * W, dtype=np.int64)
    slots = np.nonzero(src >= 0)[0]
    inv[src[slots]] = slots
    src.setflags(write=False)
    inv.setflags(write=False)
    return src, inv


def tile_permutation(geom: TileGeometry) -> tuple[np.ndarray, np.ndarray]:
    """``(perm, inv)`` for the whole sequence (video then text).

    ``perm[s]`` is the row-major token index held by tile-major slot ``s`` (``-1`` for padding), so
    ``tiled = x[perm]`` (with padding rows filled) and ``x = tiled[inv]``.
    """
    src, inv = _video_permutation(geom.grid, geom.tile, geom.slot)
    if geom.text_len:
        text = np.arange(geom.video_len, geom.seq_len)
        text = np.pad(text, (0, geom.padded_text_len - geom.text_len), constant_values=-1)
        src = np.concatenate([src, text])
        inv = np.concatenate([inv, geom.padded_video_len + np.arange(geom.text_len)])
    return src, inv


def slot_valid(geom: TileGeometry) -> np.ndarray:
    """bool (padded_len,): which tile-major positions hold a real token."""
    return tile_permutation(geom)[0] >= 0


def token_units(geom: TileGeometry, positions: np.ndarray) -> np.ndarray:
    """Mask unit (tile id, or ``num_tiles`` for text) of tile-major positions."""
    positions = np.asarray(positions)
    return np.where(positions < geom.padded_video_len, positions // geom.slot, geom.num_tiles)


# ----------------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------------


def _window_1d(n: int, w: int) -> np.ndarray:
    """(n, n) bool: query tile i attends key tile j along one dimension (FastVideo clamped window)."""
    half = w // 2
    i = np.arange(n)
    centre = np.maximum(half, np.minimum(i, n - 1 - half))
    return np.abs(centre[:, None] - i[None, :]) <= half


def normalize_windows(window, num_heads: int) -> tuple[Int3, ...]:
    """One (wt, wh, ww) per head from a single window or a per-head sequence of windows."""
    if window is None:
        raise ValueError("sliding-tile attention needs a window (in tiles), e.g. (3, 3, 3)")
    seq = list(window)
    if len(seq) == 3 and all(isinstance(x, (int, np.integer)) for x in seq):
        return (_int3("window", seq),) * num_heads
    if len(seq) != num_heads:
        raise ValueError(f"got {len(seq)} per-head windows for {num_heads} heads")
    return tuple(_int3("window", w) for w in seq)


def palette_of(layer_windows, num_heads: int) -> tuple[tuple, tuple[int, ...]]:
    """``(palette, ids)``: the distinct per-head window sets in first-seen order, and each entry's index in it,
    for a sequence of windows (a (wt, wh, ww), per-head windows, or None = full)."""
    palette: dict = {}
    ids = []
    for w in layer_windows:
        windows = normalize_windows(FULL_WINDOW if w is None else w, num_heads)
        ids.append(palette.setdefault(windows, len(palette)))
    return tuple(palette), tuple(ids)


@functools.lru_cache(maxsize=64)
def choose_tile(grid: Int3, base: Int3 = DEFAULT_TILE, align: int = 1) -> Int3:
    """The tile with the least padded video length for ``grid`` (slots rounded up to ``align``), each side within
    [base / 2, 2 * base] (capped by the grid); ties go to the tile closest to ``base`` in log scale. For a
    480x832 Wan latent grid (21, 30, 52) the 6x8x8 base pads 32,760 tokens to 43,008; a chosen tile pads less."""
    grid, base = _int3("grid", grid), _int3("base tile", base)
    sides = [range(max(1, min(g, b // 2)), max(1, min(g, 2 * b)) + 1) for g, b in zip(grid, base)]
    best = None
    for tile in itertools.product(*sides):
        tiles = math.prod(-(-g // t) for g, t in zip(grid, tile))
        key = (tiles * round_up(math.prod(tile), align), sum(abs(math.log(t / b)) for t, b in zip(tile, base)))
        if best is None or key < best[0]:
            best = (key, tile)
    return best[1]


def full_window(geom: TileGeometry) -> Int3:
    return geom.tile_grid


@functools.lru_cache(maxsize=256)
def _tile_mask(tile_grid: Int3, window: Int3) -> np.ndarray:
    at, ah, aw = (_window_1d(n, w) for n, w in zip(tile_grid, window))
    m = at[:, None, None, :, None, None] & ah[None, :, None, None, :, None] & aw[None, None, :, None, None, :]
    n = math.prod(tile_grid)
    m = m.reshape(n, n)
    m.setflags(write=False)
    return m


def unit_mask(geom: TileGeometry, window: Int3) -> np.ndarray:
    """bool (num_units, num_units): query unit attends key unit. Text is one dense unit."""
    m = _tile_mask(geom.tile_grid, window)
    if geom.text_len:
        m = np.pad(m, ((0, 1), (0, 1)), constant_values=True)
    return m


def window_tiles(geom: TileGeometry, window: Int3) -> int:
    """Key tiles per query tile (the same for every query tile)."""
    return math.prod(min(n, 2 * (w // 2) + 1) for n, w in zip(geom.tile_grid, window))


def sta_density(geom: TileGeometry, windows: Sequence[Int3]) -> float:
    """Fraction of the (padded) attention matrix that STA computes, averaged over heads."""
    dens = [unit_mask(geom, w) for w in windows]
    sizes = np.full(geom.num_units, geom.slot, dtype=np.float64)
    if geom.text_len:
        sizes[-1] = geom.padded_text_len
    total = sizes.sum() ** 2
    return float(np.mean([sizes @ d.astype(np.float64) @ sizes / total for d in dens]))


def dense_token_mask(geom: TileGeometry, window: Int3) -> np.ndarray:
    """bool (seq_len, seq_len) STA mask in the caller's row-major order, built from token coordinates.

    Independent of the permutation and block machinery: this is the oracle's mask (small shapes only).
    """
    T, H, W = geom.grid
    r = np.arange(geom.video_len)
    t, h, w = r // (H * W), (r // W) % H, r % W
    tiles = (t // geom.tile[0], h // geom.tile[1], w // geom.tile[2])
    allowed = np.ones((geom.video_len, geom.video_len), dtype=bool)
    for coord, n, win in zip(tiles, geom.tile_grid, window):
        allowed &= _window_1d(n, win)[coord[:, None], coord[None, :]]
    L = geom.seq_len
    mask = np.ones((L, L), dtype=bool)
    mask[: geom.video_len, : geom.video_len] = allowed
    return mask


# ----------------------------------------------------------------------------------------------------------
# Block tables for the block-sparse kernels
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockTables:
    """Per-head lists of non-empty blocks.

    ``kv``: int32 (H, num_q_blocks, 1 + max_kv): column 0 = count, then the kv block ids (padding repeats the
    last id, so a kernel that over-fetches re-reads a block it already has). ``q``: the transpose, int32
    (H, num_kv_blocks, 1 + max_q), used by the dK/dV pass. ``H`` is 1 when all heads share one mask.
    """

    kv: np.ndarray
    q: np.ndarray
    block_q: int
    block_k: int

    @property
    def num_heads(self) -> int:
        return self.kv.shape[0]

    @property
    def max_kv(self) -> int:
        return self.kv.shape[2] - 1

    def kv_blocks_visited(self) -> int:
        return int(self.kv[:, :, 0].sum())


def _lists(block: np.ndarray, min_width: int = 1) -> np.ndarray:
    """(H, R, C) bool -> (H, R, 1 + width) int32 [count, ids..., padded with the last id]."""
    H, R, C = block.shape
    counts = block.sum(-1)
    width = max(int(counts.max(initial=0)), min_width)
    order = np.argsort(~block, axis=-1, kind="stable")[..., :width]  # non-empty ids first, ascending
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
    cols = np.arange(width)[None, None, :]
    ids = np.where(cols < counts[..., None], order, last)
    return np.concatenate([counts[..., None], ids], axis=-1).astype(np.int32)


def tables_from_block_mask(block: np.ndarray, block_q: int, block_k: int, pad_pow2: bool = False) -> BlockTables:
    """Block tables from a bool (H, num_q_blocks, num_kv_blocks) block mask.

    ``pad_pow2`` pads the list width to a power of two (Triton refs prefer power-of-two shapes).
    """
    block = np.asarray(block, dtype=bool)
    if block.ndim == 2:
        block = block[None]

    def width(n):
        return 1 << max(0, (n - 1).bit_length()) if pad_pow2 else n

    kv = _lists(block)
    q = _lists(block.transpose(0, 2, 1))
    if pad_pow2:
        kv = _lists(block, width(kv.shape[2] - 1))
        q = _lists(block.transpose(0, 2, 1), width(q.shape[2] - 1))
    kv.setflags(write=False)
    q.setflags(write=False)
    return BlockTables(kv=kv, q=q, block_q=block_q, block_k=block_k)


def sta_block_mask(geom: TileGeometry, windows: Sequence[Int3], block_q: int, block_k: int,
                   prune_padding: bool = False) -> np.ndarray:
    """bool (H', nQb, nKb) block mask; H' = 1 when all windows are equal. Blocks must not straddle units.

    ``prune_padding`` also empties blocks made only of padding positions (ragged grids): their keys would be
    masked anyway and their query rows are dropped, so a kernel need not visit them. The kernel must then give
    rows with no blocks a finite output (ours writes 0).
    """
    if geom.slot % block_q or geom.slot % block_k:
        raise ValueError(f"tile slot {geom.slot} must be a multiple of block_q={block_q} and block_k={block_k}")
    if geom.padded_text_len % block_q or geom.padded_text_len % block_k:
        raise ValueError(f"padded text length {geom.padded_text_len} must be a multiple of the blocks")
    uq = token_units(geom, np.arange(0, geom.padded_len, block_q))
    uk = token_units(geom, np.arange(0, geom.padded_len, block_k))
    unique = list(dict.fromkeys(windows))
    if len(unique) == 1:
        block = unit_mask(geom, unique[0])[np.ix_(uq, uk)][None]
    else:
        block = np.stack([unit_mask(geom, w)[np.ix_(uq, uk)] for w in windows])
    if prune_padding:
        valid = slot_valid(geom)
        vq = valid.reshape(-1, block_q).any(-1)
        vk = valid.reshape(-1, block_k).any(-1)
        block = block & vq[None, :, None] & vk[None, None, :]
    return block


@functools.lru_cache(maxsize=128)
def sta_block_tables(geom: TileGeometry, windows: tuple[Int3, ...], block_q: int, block_k: int,
                     pad_pow2: bool = False, prune_padding: bool = False) -> BlockTables:
    mask = sta_block_mask(geom, windows, block_q, block_k, prune_padding)
    return tables_from_block_mask(mask, block_q, block_k, pad_pow2)


def dense_block_tables(num_q_blocks: int, num_kv_blocks: int, block_q: int, block_k: int,
                       pad_pow2: bool = False) -> BlockTables:
    return _dense_tables(num_q_blocks, num_kv_blocks, block_q, block_k, pad_pow2)


@functools.lru_cache(maxsize=64)
def _dense_tables(nq, nk, bq, bk, pad_pow2):
    return tables_from_block_mask(np.ones((1, nq, nk), dtype=bool), bq, bk, pad_pow2)
