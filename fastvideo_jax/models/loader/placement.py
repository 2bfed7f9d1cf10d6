"""Placing converted parameters on a mesh without a full host copy of the checkpoint.

Only the shards this process addresses are built (``addressable_devices_indices_map``; on a multi-host mesh
every process builds its own part of the global array). For one parameter, each source tensor is read once
(one layer row of a scanned parameter at a time), transformed as a view, and every local shard that covers it
is cut from it, the dtype cast happening in that copy. Then each shard goes to its device(s) and its host
buffer is dropped before the next parameter. Peak host memory: the local shards of one parameter (at most the
parameter in its target dtype; a replicated shard is built once for all its devices) plus one source tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from converters.engine import ConversionPlan

__all__ = ["place_leaf", "shard_slices"]


def shard_slices(shape: tuple[int, ...], sharding: NamedSharding) -> dict[tuple, list]:
    """Unique shard index (a tuple of (start, stop) per axis) -> the addressable devices that hold it."""
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
    """Build this process's shards of one parameter (each source tensor read once) and assemble the global
    array on the mesh."""
    shape = plan.leaves[path].spec.shape
    groups = shard_slices(shape, sharding)
    blocks = plan.leaf_blocks(path, read, [_as_slices(key) for key in groups])
    arrays = []
    for devices in groups.values():
        host = blocks.pop(0)
        arrays.extend(jax.device_put(host, device) for device in devices)
        del host  # the devices hold their copies
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
