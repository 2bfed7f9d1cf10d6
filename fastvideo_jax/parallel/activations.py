"""Sharding constraints on activations by logical axis names, under the mesh in scope.

Model code names the axes of an activation (``constrain(x, ("batch", "length", "embed"))``); the rules table
(``ACTIVATION_RULES``) maps the names to mesh axes. The mesh comes from the context (``mesh_scope(mesh)``,
i.e. ``jax.set_mesh``), which is part of jit's cache key: a function traced under a mesh and called without
one retraces. Without a mesh, or on a one-device mesh, every call here is a no-op.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fastvideo_jax.parallel.rules import ACTIVATION_RULES, Rules, logical_to_spec

__all__ = ["active_mesh", "axis_size", "constrain", "mesh_scope", "params_mesh", "spec_for"]


def _abstract_mesh():
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    return None if mesh is None or getattr(mesh, "empty", False) or not mesh.shape else mesh


def active_mesh():
    """The mesh in scope (an AbstractMesh inside a trace), or None when there is none or it has one device."""
    mesh = _abstract_mesh()
    return None if mesh is None or math.prod(mesh.shape.values()) == 1 else mesh


@contextlib.contextmanager
def mesh_scope(mesh: Mesh | None):
    """Run model code with ``mesh`` in scope (no-op for None). ``jax.set_mesh`` on jax >= 0.7."""
    if mesh is None:
        yield
        return
    setter = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with setter(mesh):
        yield


def params_mesh(state) -> Mesh | None:
    """The multi-device mesh concrete parameters live on, when no mesh is in scope yet (an eager call of a
    model loaded on a mesh runs its work split the same way as the pipeline does); None otherwise."""
    if _abstract_mesh() is not None:
        return None
    leaf = next(iter(jax.tree.leaves(state)), None)
    sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) and not isinstance(
        leaf, jax.core.Tracer) else None
    if isinstance(sharding, NamedSharding) and sharding.mesh.devices.size > 1:
        return sharding.mesh
    return None


def axis_size(name: str, mesh=None) -> int:
    mesh = mesh if mesh is not None else active_mesh()
    return 1 if mesh is None else int(mesh.shape.get(name, 1))


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules = ACTIVATION_RULES) -> PartitionSpec:
    return logical_to_spec(tuple(axes), tuple(shape), rules, mesh)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = ACTIVATION_RULES) -> jax.Array:
    """``x`` constrained to the sharding its logical ``axes`` get on the mesh in scope (no-op without one)."""
    mesh = active_mesh()
    if mesh is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} axis names {tuple(axes)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))
