"""Splash (TPU) sliding-tile mask: computed per block from the unit mask, never a dense token mask."""

from __future__ import annotations

import functools

import numpy as np

from fastvideo_jax.attention.sliding_tile_mask import Int3, TileGeometry, token_units, unit_mask


def make_splash_sta_mask(geom: TileGeometry, window: Int3):
    """A splash ``Mask`` (lazy, hashable) for one head: STA at unit level, sliced per kernel block.

    Splash reduces masks to block-level ``MaskInfo`` by slicing them block by block; uniform blocks return
    shared constant arrays, so processing a 90k-token mask costs O(blocks), not O(tokens^2) memory.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam

    return _make_splash_mask_class(sam.Mask)(geom, window)


@functools.lru_cache(maxsize=1)
def _make_splash_mask_class(base):
    class StaSplashMask(base):
        def __init__(self, geom: TileGeometry, window: Int3):
            self.geom = geom
            self.window = tuple(window)
            self.units = unit_mask(geom, self.window)

        @property
        def shape(self):
            return (self.geom.padded_len, self.geom.padded_len)

        def __getitem__(self, idx):
            if not isinstance(idx, tuple) or len(idx) != 2:
                raise NotImplementedError(f"unsupported slice {idx}")
            qs, ks = (_fill(s, n) for s, n in zip(idx, self.shape))
            uq0, uq1 = token_units(self.geom, np.array([qs.start, qs.stop - 1]))
            uk0, uk1 = token_units(self.geom, np.array([ks.start, ks.stop - 1]))
            shape = (qs.stop - qs.start, ks.stop - ks.start)
            if uq0 == uq1 and uk0 == uk1:
                return _constant_block(shape, bool(self.units[uq0, uk0]))
            uq = token_units(self.geom, np.arange(qs.start, qs.stop))
            uk = token_units(self.geom, np.arange(ks.start, ks.stop))
            return self.units[np.ix_(uq, uk)]

        def __eq__(self, other):
            return isinstance(other, StaSplashMask) and (self.geom, self.window) == (other.geom, other.window)

        def __hash__(self):
            return hash((StaSplashMask, self.geom, self.window))

    return StaSplashMask


def _fill(s, n: int) -> slice:
    if not isinstance(s, slice) or s.step not in (None, 1):
        raise NotImplementedError(f"unsupported index {s}")
    start = 0 if s.start is None else s.start
    stop = n if s.stop is None else s.stop
    return slice(start, stop)


@functools.lru_cache(maxsize=32)
def _constant_block(shape: tuple[int, int], value: bool) -> np.ndarray:
    a = np.full(shape, value, dtype=bool)  # contiguous: any()/all() are vectorised (broadcast views are ~25x slower)
    a.setflags(write=False)
    return a
