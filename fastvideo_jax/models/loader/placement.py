"""Placing converted parameters on a mesh without a full host copy of the checkpoint.

Each device shard of a parameter is built on the host straight in the target dtype: source tensors are read
one at a time (one layer row of a scanned parameter at a time), transformed as views, and only the slice the
shard needs is copied (the dtype cast happens in that same copy). The shard goes to its device(s) and its host
buffer is dropped before the next shard is built, so peak host memory is one shard plus one source tensor on
top of what the devices hold. (With several shards per parameter a source tensor is read once per shard:
more reads, far less memory.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from converters.engine import ConversionPlan

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
    shape = plan.leaves[path].spec.shape
    arrays = []
    for key, devices in shard_slices(shape, sharding).items():
        host = plan.leaf_array(path, read, _as_slices(key))
        arrays.extend(jax.device_put(host, device) for device in devices)
        del host  # the device holds its copy; keep at most one shard on the host
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
