"""Device meshes over the four named axes every model uses: data, fsdp, tensor, sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


@dataclass(frozen=True)
class MeshConfig:
    """Sizes per axis; one axis may be -1 (all remaining devices). The default is the 1x1x1x1 mesh."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def sizes(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.tensor, self.sequence]
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"MeshConfig {self}: {num_devices} devices do not divide by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"MeshConfig {self} needs {math.prod(sizes)} devices, {num_devices} given")
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: list | None = None) -> Mesh:
    """A mesh with all four axes (Auto axis types, so GSPMD sharding constraints work on jax 0.10 and 0.11)."""
    config = config or MeshConfig()
    if devices is None:
        n = math.prod(s for s in (config.data, config.fsdp, config.tensor, config.sequence) if s != -1)
        devices = jax.devices() if -1 in (config.data, config.fsdp, config.tensor, config.sequence) else jax.devices()[:n]
    shape = config.sizes(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
