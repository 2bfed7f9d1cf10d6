"""Logical axis names -> mesh axes, one table per model family.

Every parameter carries logical axis names (``out_sharding`` metadata). A rules table maps each name to a mesh
axis (or None = replicated). A dimension that the mesh axis does not divide, or a mesh axis already used by
an earlier dimension of the same parameter, stays replicated. A name mapped to several mesh axes takes the
longest leading run of them whose product divides the dimension (a batch of 2 on data=2, fsdp=2 goes on data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, "str | tuple[str, ...] | None"]

# DiT: the model dim of the weights is sharded over fsdp, then sequence, then data as far as it divides (ZeRO-3
# style: on a data=2, sequence=4 mesh each device holds 1/8 of the weights, gathered layer by layer inside the
# scan); tensor parallelism splits heads and the MLP hidden dim.
DIT_RULES: Rules = MappingProxyType(
    {
        "layers": None,
        "embed": ("fsdp", "sequence", "data"),
        "heads": "tensor",
        "mlp": "tensor",
        "modulation": "tensor",
        "norm": None,
        "conv_in": None,
        "vocab": "tensor",
    }
)

# Activations (DiT, text encoder, pipeline inputs): the batch (cond/uncond, videos per prompt) over data, then
# fsdp where the batch still divides; video tokens over sequence; heads and the MLP hidden dim over tensor.
# The model dim of activations stays whole (FSDP shards weights, not activations).
ACTIVATION_RULES: Rules = MappingProxyType(
    {
        "batch": ("data", "fsdp"),
        "length": "sequence",
        "text_length": None,
        "heads": "tensor",
        "mlp": "tensor",
        "embed": None,
        "head_dim": None,
    }
)

# Text encoders (UMT5/T5): like the DiT, the model dim over data, fsdp and sequence: the encoder runs once per
# prompt, so its weights (UMT5-XXL fp32: 22.7 GB) are split over every device and gathered a layer at a time.
# Axes in mesh order here and below, so the embedding lookup's output reshards by all-to-alls (t5.py).
# Grouped-query attention (LLaMA) names its key/value heads "kv_heads": over tensor like the query heads, so each
# device holds the KV heads its query heads read (query heads are grouped per KV head, contiguously).
TEXT_ENCODER_RULES: Rules = MappingProxyType(
    {**DIT_RULES, "embed": ("data", "fsdp", "sequence"), "kv_heads": "tensor"}
)

# Text-encoder activations: prompts over data (and fsdp when they divide it), the prompt's tokens over
# sequence (and fsdp when the batch left it), heads and the MLP hidden dim over tensor. Keys and values of
# self-attention are whole on every device (a text is short; each device attends its queries to all of it).
TEXT_ENCODER_ACTIVATION_RULES: Rules = MappingProxyType(
    {"batch": ("data", "fsdp"), "length": ("fsdp", "sequence"), "heads": "tensor", "kv_heads": "tensor",
     "mlp": "tensor", "embed": None}
)

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
        width, kept = 1, []
        for n in names:
            if size % (width * mesh.shape[n]):
                break
            width *= mesh.shape[n]
            kept.append(n)
        names = tuple(kept)
        if not names:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def named_sharding(axes, shape, rules: Rules, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, rules, mesh))
