"""Mesh specs from users ("data=2,sequence=4"), checked before any weight is read, and the default mesh.

``resolve_mesh(spec, num_heads=..., use_cfg=...)`` turns a spec string, a ``MeshConfig``, a ``Mesh`` or None
into a ``Mesh`` (or None for one device), raising ``UserError`` naming the problem: an unknown axis, a size
that is not a positive integer, sizes whose product does not divide the device count, or heads that the
tensor x sequence axes do not divide. With no spec and several devices the default puts the CFG batch on
``data`` (2 when the device count is even) and the rest on ``sequence`` (the largest degree that divides the
heads; what is left goes to ``fsdp``), and logs the choice.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
from jax.sharding import Mesh

from fastvideo_jax.errors import UserError
from fastvideo_jax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh

__all__ = ["default_mesh_config", "parse_mesh_spec", "resolve_mesh", "validate_mesh_config"]

log = logging.getLogger(__name__)


def parse_mesh_spec(spec: str) -> MeshConfig:
    """"data=2,sequence=4" -> MeshConfig(data=2, sequence=4); axes left out are 1; one axis may be -1."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise UserError(f"mesh spec {spec!r}: {part!r} is not axis=size (e.g. data=2,sequence=4)")
        if name not in MESH_AXES:
            raise UserError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise UserError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise UserError(f"mesh spec {spec!r}: size of {name!r} is {value.strip()!r}, not an integer") from None
        if size == 0 or size < -1:
            raise UserError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer (or -1), got {size}")
        sizes[name] = size
    if not sizes:
        raise UserError(f"mesh spec {spec!r} names no axis (e.g. data=2,sequence=4)")
    return MeshConfig(**sizes)


def validate_mesh_config(config: MeshConfig, num_devices: int, num_heads: int | None = None) -> tuple[int, ...]:
    """The concrete axis sizes (their product divides ``num_devices``; a -1 axis takes the rest), or a
    UserError naming what does not fit."""
    given = [getattr(config, a) for a in MESH_AXES]
    known = math.prod(s for s in given if s != -1)
    text = ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, given) if s != 1) or "all axes 1"
    if given.count(-1) > 1:
        raise UserError(f"mesh {text}: at most one axis may be -1 (all remaining devices)")
    if num_devices % known:
        raise UserError(f"mesh {text} needs {known} devices (the product of its sizes), which does not divide "
                        f"the {num_devices} devices available")
    sizes = config.sizes(num_devices if -1 in given else known)
    if num_heads is not None:
        named = dict(zip(MESH_AXES, sizes))
        width = named["tensor"] * named["sequence"]
        if num_heads % width:
            raise UserError(f"the DiT's {num_heads} attention heads do not divide over mesh tensor={named['tensor']} "
                            f"x sequence={named['sequence']} = {width}; pick sizes that divide {num_heads}")
    return sizes


def default_mesh_config(num_devices: int, num_heads: int | None = None, use_cfg: bool = True) -> MeshConfig:
    """CFG on data (2 when the count is even), the rest on sequence (largest degree dividing the heads), fsdp
    takes what the heads leave."""
    data = 2 if use_cfg and num_devices % 2 == 0 and num_devices > 1 else 1
    rest = num_devices // data
    sequence = max(d for d in range(1, rest + 1) if rest % d == 0 and (num_heads is None or num_heads % d == 0))
    return MeshConfig(data=data, fsdp=rest // sequence, sequence=sequence)


def resolve_mesh(mesh: "Mesh | MeshConfig | str | None", *, num_heads: int | None = None, use_cfg: bool = True,
                 devices: list | None = None) -> Mesh | None:
    """A checked Mesh for a user's mesh argument; the logged default for None on several devices."""
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(mesh, Mesh):
        config = MeshConfig(**{a: int(mesh.shape.get(a, 1)) for a in MESH_AXES})
        if set(mesh.axis_names) - set(MESH_AXES):
            raise UserError(f"mesh axes {mesh.axis_names}: unknown axis (axes: {', '.join(MESH_AXES)})")
        validate_mesh_config(config, mesh.devices.size, num_heads)
        return mesh
    if isinstance(mesh, str):
        mesh = parse_mesh_spec(mesh)
    if mesh is None:
        if len(devices) == 1:
            return None
        mesh = default_mesh_config(len(devices), num_heads, use_cfg)
        log.warning("no mesh given: using %s on %d devices (CFG on data, tokens on sequence); pass mesh= or "
                    "--mesh to choose", _describe(mesh), len(devices))
    if not isinstance(mesh, MeshConfig):
        raise UserError(f"mesh must be a Mesh, a MeshConfig or a spec like 'data=2,sequence=4', got {type(mesh).__name__}")
    sizes = validate_mesh_config(mesh, len(devices), num_heads)
    n = math.prod(sizes)
    if n == 1:
        return None
    if n < len(devices):
        log.warning("mesh %s uses %d of the %d devices", _describe(MeshConfig(*sizes)), n, len(devices))
    return make_mesh(MeshConfig(*sizes), devices[:n])


def _describe(config: MeshConfig) -> str:
    return ",".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))
