"""Logical axis names -> mesh axes, one table per model family.

Every parameter carries logical axis names (``out_sharding`` metadata). A rules table maps each name to a mesh
axis (or None = replicated). A dimension that the mesh axis does not divide, or a mesh axis already used by
an earlier dimension of the same parameter, stays replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, "str | tuple[str, ...] | None"]

# DiT: FSDP shards the model dim; tensor parallelism splits heads and the MLP hidden dim.
DIT_RULES: Rules = MappingProxyType(
    {
        "layers": None,
        "embed": "fsdp",
        "heads": "tensor",
        "mlp": "tensor",
        "modulation": "tensor",
        "norm": None,
        "conv_in": None,
        "vocab": "tensor",
    }
)

# Text encoders (UMT5/T5): same vocabulary.
TEXT_ENCODER_RULES: Rules = DIT_RULES

# VAE: convolutions are small next to activations; keep weights replicated.
VAE_RULES: Rules = MappingProxyType({})


def logical_to_spec(
    axes: Sequence[str | None] | None, shape: Sequence[int], rules: Rules, mesh: Mesh
) -> PartitionSpec:
    if not axes:
        return PartitionSpec()
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
        width = 1
        for n in names:
            width *= mesh.shape[n]
        if not names or size % width:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def named_sharding(axes, shape, rules: Rules, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, rules, mesh))
