"""VAE decode split over every device of a mesh: spatial partitioning of the activations (with halos).

The Wan VAE is causal in time (a feature cache carried from latent frame to latent frame), so time is the
wrong axis to split; space is the natural one. The input and output of every convolution (B, F, H, W, C) are
constrained to rows (and, when the rows run out, columns) over the mesh axes, the batch over ``data``. XLA's
SPMD partitioner then runs each convolution on its slab and exchanges a one-row halo with its neighbours
(collective permutes), so each device computes and holds 1/n of every activation; the per-frame attention of
the mid block (at the lowest resolution) gathers its keys. The result is the single-device decode, not an
approximation: no tile seams. With ``tiled`` decoding each tile is itself decoded this way, so the output
equals the single-device tiled decode. (Every convolution is constrained, not only block boundaries: left to
propagation, the partitioner may split a two-wide dimension one row per shard, which it miscomputes; see
``MIN_ROWS``.)

Decoding under a mesh needs the mesh in scope (``parallel.activations.mesh_scope``); without one every
constraint here is a no-op and the decode runs as before.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fastvideo_jax.parallel.activations import active_mesh, mesh_scope

__all__ = ["MIN_ROWS", "SPATIAL_AXES", "constrain_video", "decode_on_mesh", "video_spec"]

# Rows first over every mesh axis (in this order) that divides them, then columns over the axes left; the batch
# over data when it divides. An axis that does not fit is left to the next dimension (or idle).
SPATIAL_AXES = ("sequence", "fsdp", "tensor", "data")
# Every shard keeps at least this many rows (columns). XLA's SPMD partitioner on jax 0.10.2 (CPU) miscomputes a
# 3x3 "same" convolution over a dimension of 2 split two ways while another mesh axis replicates it (one row
# per shard; tests/test_parallel_encoders.py::test_single_row_halo_xla_bug records it), and one-row slabs are
# all halo anyway.
MIN_ROWS = 2


def video_spec(shape: tuple[int, ...], mesh_shape) -> PartitionSpec:
    """The split of a channels-last (B, F, H, W, C) activation on a mesh of axis sizes ``mesh_shape``."""
    data = mesh_shape.get("data", 1)
    batch = "data" if data > 1 and shape[0] % data == 0 else None
    used = {batch} - {None}
    out: list = [batch, None]
    for size in shape[2:4]:
        kept, width = [], 1
        for axis in SPATIAL_AXES:
            n = mesh_shape.get(axis, 1)
            if n == 1 or axis in used:
                continue
            if size % (width * n) or size // (width * n) < MIN_ROWS:
                continue
            width *= n
            kept.append(axis)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out, None)


def constrain_video(x: jax.Array) -> jax.Array:
    """A channels-last (B, F, H, W, C) activation split over the mesh in scope (no-op without one)."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, video_spec(x.shape, dict(mesh.shape))))


def decode_on_mesh(vae, z: jax.Array, mesh: Mesh | None, *, tiled: bool | None = None) -> jax.Array:
    """``vae.decode(z)`` (latents (B, z, T, h, w)) with its work split over ``mesh``: video (B, C, F, H, W) as
    the decoder leaves it (split over the mesh; nothing is gathered here). ``mesh`` None (or one device) is the
    plain decode. The VAE's parameters must live on ``mesh`` (the pipeline loads every component on it)."""
    if mesh is None or mesh.devices.size == 1:
        return vae.decode(z, tiled=tiled)
    with mesh_scope(mesh):
        return vae.decode(jax.device_put(z, NamedSharding(mesh, PartitionSpec())), tiled=tiled)
