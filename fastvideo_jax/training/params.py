"""A DiT split once for training: fp32 master copies of the trainable parameters, the rest frozen as loaded.

``ParamSplit(model, wrt)`` splits the NNX module a single time (``nnx.split(model, wrt, ...)``): the trainable
variables (those ``wrt`` selects: every ``nnx.Param`` by default; LoRA passes its adapter filter) become a flat
dict ``{"blocks.to_q.kernel": fp32 array}`` (the optimizer's and the checkpoint's tree), everything else stays
in the frozen state as it was loaded (a bf16 base under LoRA stays bf16). ``merge(params)`` rebuilds the module
for a forward with each trainable leaf cast back to the dtype it was loaded in: load the DiT at
``precision="bf16"`` for bf16 compute with fp32 master weights and optimizer state (norms, modulation tables and
the time embedder stay fp32, as the model's precision policy has them), at ``"fp32"`` for fp32 training.

The frozen part is data, not code: the trainer passes ``frozen`` to its jitted step as an argument (not donated,
keeping its shardings) and ``merge(params, frozen)`` rebuilds the module from those traced arrays. A jitted
function that closed over ``self.frozen`` would capture the base weights (28 GB for a LoRA on the 14B DiT) as
constants of the computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastvideo_jax.utils.nnx_vars import var_axes, var_value

__all__ = ["ParamSplit", "param_key"]

F32 = jnp.float32


def param_key(path: tuple) -> str:
    """The flat key of a variable path: its parts joined by dots."""
    return ".".join(map(str, path))


class ParamSplit:
    def __init__(self, model: nnx.Module, wrt: Any = nnx.Param):
        graphdef, trainable, frozen = nnx.split(model, wrt, ...)
        self.graphdef, self.frozen = graphdef, frozen
        self.config = getattr(model, "config", None)
        self._templates: list[tuple[tuple, nnx.Variable]] = []
        self.compute_dtypes: dict[str, jnp.dtype] = {}
        self.axes: dict[str, tuple | None] = {}
        self._initial: dict[str, jax.Array] = {}
        for path, var in nnx.to_flat_state(trainable):
            value = var_value(var)
            key = param_key(path)
            self._templates.append((path, var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype))))
            self.compute_dtypes[key] = jnp.dtype(value.dtype)
            self.axes[key] = var_axes(var)
            self._initial[key] = value
        if not self._templates:
            raise ValueError("the trainable-parameter filter selects no variable of the model: nothing to train")

    @property
    def keys(self) -> list[str]:
        return [param_key(p) for p, _ in self._templates]

    def count(self) -> int:
        """Number of trainable scalars."""
        return sum(int(v.size) for _, v in ((p, var_value(t)) for p, t in self._templates))

    def master_params(self) -> dict[str, jax.Array]:
        """fp32 copies of the trainable parameters as loaded, on the same devices and shardings (the module's
        own arrays are left untouched)."""
        initial, self._initial = self._initial, {}
        if not initial:
            raise RuntimeError("master_params() was already taken from this split")
        shardings = {k: v.sharding for k, v in initial.items()}
        return jax.jit(lambda d: {k: jnp.array(v, F32, copy=True) for k, v in d.items()},
                       out_shardings=shardings)(initial)

    def merge(self, params: Mapping[str, jax.Array], frozen: nnx.State | None = None,
              cast: bool = True) -> nnx.Module:
        """The module with ``params`` (fp32 masters) cast to their compute dtypes (``cast=False``: as given) and
        ``frozen`` (default: the frozen part as loaded; inside jit pass it as an argument, never close over it)."""
        def value(path):
            a = params[param_key(path)]
            return a.astype(self.compute_dtypes[param_key(path)]) if cast else a

        flat = [(path, var.replace(value(path))) for path, var in self._templates]
        # fresh Variable objects for the frozen part (same arrays): inside a trace, nnx.scan refuses Variables
        # made outside it (a LoRA run's frozen base weights)
        frozen = jax.tree.map(lambda a: a, self.frozen if frozen is None else frozen)
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat), frozen)

    def input_dtype(self) -> jnp.dtype:
        """The dtype the DiT's inputs are given in: its configured precision (bf16 or fp32)."""
        from fastvideo_jax.dtypes import to_dtype

        precision = getattr(self.config, "precision", "fp32")
        return jnp.dtype(to_dtype(precision))
