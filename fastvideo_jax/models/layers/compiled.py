"""Compiled entry points for NNX modules: one jitted pure function per (function, module structure, shapes).

A model's public method (``dit(x, t, ctx)``, ``vae.decode(z)``, ``encoder(ids, mask)``) calls
:func:`compiled_call` with a *module-level* function ``fn(module, *args, **static)``. The module is split into
(graphdef, state); ``fn``, the graphdef and the static keywords are the static part of one module-level
``jax.jit``, so a second eager call with the same shapes reuses the executable instead of re-tracing the
module's scans. Inside another trace (a pipeline's jitted step) the call simply inlines.

The component's matmul precision (``ModelConfig.matmul_precision``, see ``resolved_matmul_precision``) is
applied around ``fn`` with ``jax.default_matmul_precision``: every dot, conv and einsum traced inside, attention
included, carries it, and since the config lives in the graphdef it is part of the compile key.

Only for forwards that mutate no NNX state (parameters are read, never written): the state is not merged back.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def matmul_precision_scope(module: nnx.Module):
    """``jax.default_matmul_precision`` for ``module.config`` (a no-op context when it has no such knob)."""
    config = getattr(module, "config", None)
    resolve = getattr(config, "resolved_matmul_precision", None)
    precision = resolve() if resolve is not None else None
    return jax.default_matmul_precision(precision) if precision is not None else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pure_call(fn: Callable, graphdef: nnx.GraphDef, static: tuple, state: nnx.State, args: tuple) -> Any:
    module = nnx.merge(graphdef, state)
    with matmul_precision_scope(module):
        return fn(module, *args, **dict(static))


def compiled_call(fn: Callable, module: nnx.Module, *args: Any, **static: Any) -> Any:
    """``fn(module, *args, **static)`` under one cached ``jax.jit``; ``static`` values must be hashable."""
    graphdef, state = nnx.split(module)
    return _pure_call(fn, graphdef, tuple(sorted(static.items())), state, args)
