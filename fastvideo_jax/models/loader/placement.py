"""Placing converted parameters on a mesh without a full host copy of the checkpoint.

For each parameter, every device's shard is built on the host straight in the target dtype: source tensors
are read one at a time (one layer row of a scanned parameter at a time), transformed as views, and only the
slice each shard needs is copied (the dtype cast happens in that same copy). Shards go to their devices and
the host buffers are dropped before the next parameter, so peak host memory stays near the size of one
parameter on top of what the devices hold.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from converters.engine import ConversionPlan, LeafPlan, assemble_row

__all__ = ["place_leaf", "shard_slices"]


def shard_slices(shape: tuple[int, ...], sharding: NamedSharding) -> dict[tuple, list]:
    """Unique shard index (a tuple of slices, hashable form) -> the addressable devices that hold it."""
    groups: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) if isinstance(s, slice) else (s, s + 1) for s in _normalise(index, shape))
        groups.setdefault(key, []).append(device)
    return groups


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) if isinstance(s, slice) else s for s, n in zip(index, shape))


def _as_slices(key: tuple) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in key)


def place_leaf(
    plan: ConversionPlan, path: tuple, sharding: NamedSharding, read: Callable[[str], np.ndarray]
) -> jax.Array:
    """Build one parameter's shards from the checkpoint and assemble the global array on the mesh."""
    leaf: LeafPlan = plan.leaves[path]
    shape = leaf.spec.shape
    groups = shard_slices(shape, sharding)
    buffers = {key: np.empty([b - a for a, b in key], dtype=leaf.spec.dtype) for key in groups}
    for layer, sources in leaf.rows.items():
        row = assemble_row(sources, leaf.leaf, read)  # one source tensor (or merged parts) at a time
        for key, buf in buffers.items():
            sl = _as_slices(key)
            if layer is None:
                buf[...] = row[sl]
            elif sl[0].start <= layer < sl[0].stop:
                buf[layer - sl[0].start] = row[sl[1:]]
        del row
    arrays = [jax.device_put(buffers[key], device) for key, devices in groups.items() for device in devices]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
