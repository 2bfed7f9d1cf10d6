"""Version-tolerant access to NNX variables (flax 0.12.8 and 0.12.10)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def var_value(var: nnx.Variable) -> Any:
    """The raw value (an array, or a ShapeDtypeStruct in an abstract state)."""
    return var.get_value() if hasattr(var, "get_value") else var.value


def var_axes(var: nnx.Variable) -> tuple | None:
    """The logical axis names a parameter was created with."""
    meta = var.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def host_params(state: nnx.State) -> dict[tuple, np.ndarray]:
    """Every variable of a state copied to host numpy, keyed by its path."""
    return {path: np.asarray(jax.device_get(var[...])) for path, var in nnx.to_flat_state(state)}
