"""Ulysses sequence parallelism and per-shard attention under ``shard_map``.

Video tokens are split over the ``sequence`` mesh axis. For self-attention, an all-to-all turns the
sequence-sharded q/k/v (B, L/sp, N, E) into head-sharded full sequences (B, L, N/sp, E); each device runs the
ordinary attention kernel on its heads, and a second all-to-all brings the output back to sequence shards.
Cross-attention to the (replicated) text runs locally on each token shard. Either way the kernel only sees
per-device arrays: no kernel is ever called on a global array that GSPMD would have to gather.

Token counts that ``sequence`` does not divide are padded (``pad_length``) and the padded keys are masked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fastvideo_jax.errors import UserError
from fastvideo_jax.parallel.activations import active_mesh, axis_size, spec_for

__all__ = ["SEQUENCE_AXIS", "check_heads", "head_chunk_index", "head_chunks", "joint_ulysses_attention",
           "local_attention", "pad_length", "padding_mask", "shard_map", "ulysses_attention"]

SEQUENCE_AXIS = "sequence"
HEAD_AXIS = "tensor"

Attend = Callable[..., jax.Array]  # (q, k, v, kv_mask) -> out, all (B, L, N, E) per device


def shard_map(f, *, mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax >= 0.7) or ``jax.experimental.shard_map.shard_map``, replication checks off."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover (jax < 0.7)

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def pad_length(length: int, mesh=None) -> int:
    """``length`` rounded up to a multiple of the sequence-parallel degree."""
    sp = axis_size(SEQUENCE_AXIS, mesh)
    return -(-length // sp) * sp


def check_heads(num_heads: int, mesh=None) -> None:
    """Heads must split evenly over tensor x sequence (Ulysses gives each device N / (tp * sp) heads)."""
    sp, tp = axis_size(SEQUENCE_AXIS, mesh), axis_size(HEAD_AXIS, mesh)
    if num_heads % (sp * tp):
        what = f"sequence={sp}" if tp == 1 else f"tensor={tp} x sequence={sp} = {tp * sp}"
        raise UserError(f"{num_heads} attention heads do not divide over mesh {what}; "
                        f"choose a sequence size that divides {num_heads}")


def _specs(mesh, batch: int, num_heads: int):
    """(batch axes, head axis) of q/k/v (B, L, N, E) on ``mesh``: the same as the activation rules give."""
    spec = spec_for(("batch", "length", "heads", "head_dim"), (batch, 1 << 30, num_heads, 1), mesh)
    return spec[0], spec[2]


def ulysses_attention(q, k, v, attend: Attend, kv_mask: jax.Array | None = None) -> jax.Array:
    """Self-attention over sequence-sharded q/k/v (B, L, N, E) with ``attend`` run per device on N/sp heads.

    ``kv_mask`` (B, L) bool marks real keys (False for padding). ``L`` must be a multiple of sp (``pad_length``).
    Without a mesh in scope this is ``attend(q, k, v, kv_mask)``."""
    mesh = active_mesh()
    if mesh is None:
        return attend(q, k, v, kv_mask)
    B, L, N, _ = q.shape
    sp = axis_size(SEQUENCE_AXIS, mesh)
    check_heads(N, mesh)
    if L % sp:
        raise ValueError(f"ulysses_attention: {L} tokens do not divide over sequence={sp}; pad with pad_length")
    batch, heads = _specs(mesh, B, N)
    seq = SEQUENCE_AXIS if sp > 1 else None
    qkv_spec = PartitionSpec(batch, seq, heads, None)
    mask_spec = PartitionSpec(batch, None)

    def body(q, k, v, kv_mask):
        if sp > 1:  # (b, L/sp, n, E) -> (b, L, n/sp, E)
            q, k, v = (jax.lax.all_to_all(x, SEQUENCE_AXIS, 2, 1, tiled=True) for x in (q, k, v))
        out = _local(attend, q, k, v, kv_mask)
        if sp > 1:  # (b, L, n/sp, E) -> (b, L/sp, n, E)
            out = jax.lax.all_to_all(out, SEQUENCE_AXIS, 1, 2, tiled=True)
        return out

    if kv_mask is None:
        fn = shard_map(lambda q, k, v: body(q, k, v, None), mesh=mesh, in_specs=(qkv_spec,) * 3, out_specs=qkv_spec)
        return fn(q, k, v)
    fn = shard_map(body, mesh=mesh, in_specs=(qkv_spec,) * 3 + (mask_spec,), out_specs=qkv_spec)
    return fn(q, k, v, kv_mask)


def joint_ulysses_attention(video, text, attend: Attend, text_lengths: jax.Array, video_length: int):
    """Joint attention over [video; text] (MM-DiT: HunyuanVideo, Flux-style blocks) with the video tokens split
    over the sequence mesh axis and the text whole on every device.

    ``video`` = (q, k, v), each (B, Lp, N, E) sequence-sharded, the first ``video_length`` tokens real (Lp is
    ``pad_length(video_length)``); ``text`` = (q, k, v), each (B, Lt, N, E) replicated over sequence;
    ``text_lengths`` (B,) int: text tokens [0, text_lengths[b]) are real. Every query (padded text included)
    attends the keys [0, video_length + text_lengths[b]) of the joint sequence [video real; text], a prefix,
    so ``attend(q, k, v, kv_lengths)`` gets lengths (cuDNN takes them). Per device: an all-to-all gives the
    whole video for N/sp heads, the text is cut to the same heads, the video padding is dropped; afterwards the
    video output goes back to token shards and the text output is gathered over heads.
    Returns (video out (B, Lp, N, E) like ``video``'s q, text out (B, Lt, N, E) replicated)."""
    mesh = active_mesh()
    (qv, kv, vv), (qt, kt, vt) = video, text
    B, Lp, N, _ = qv.shape
    pad = Lp - video_length

    def joint(video, text, lengths, sp):
        if sp > 1:  # (b, Lp/sp, n, E) -> (b, Lp, n/sp, E); the text's heads cut to this device's chunk
            video = [jax.lax.all_to_all(x, SEQUENCE_AXIS, 2, 1, tiled=True) for x in video]
            n = video[0].shape[2]
            start = jax.lax.axis_index(SEQUENCE_AXIS) * n
            text = [jax.lax.dynamic_slice_in_dim(x, start, n, axis=2) for x in text]
        q, k, v = (jnp.concatenate([x[:, :video_length], t], axis=1) for x, t in zip(video, text))
        out = _local(attend, q, k, v, video_length + lengths)
        out_v, out_t = out[:, :video_length], out[:, video_length:]
        if pad:
            out_v = jnp.pad(out_v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        if sp > 1:
            out_v = jax.lax.all_to_all(out_v, SEQUENCE_AXIS, 1, 2, tiled=True)
            out_t = jax.lax.all_gather(out_t, SEQUENCE_AXIS, axis=2, tiled=True)
        return out_v, out_t

    lengths = jnp.asarray(text_lengths, jnp.int32)
    if mesh is None:
        return joint((qv, kv, vv), (qt, kt, vt), lengths, 1)
    sp = axis_size(SEQUENCE_AXIS, mesh)
    check_heads(N, mesh)
    if Lp % sp:
        raise ValueError(f"joint_ulysses_attention: {Lp} video tokens do not divide over sequence={sp}; pad with "
                         "pad_length")
    batch, heads = _specs(mesh, B, N)
    video_spec = PartitionSpec(batch, SEQUENCE_AXIS if sp > 1 else None, heads, None)
    text_spec = PartitionSpec(batch, None, heads, None)
    fn = shard_map(lambda qv, kv, vv, qt, kt, vt, lengths: joint((qv, kv, vv), (qt, kt, vt), lengths, sp),
                   mesh=mesh, in_specs=(video_spec,) * 3 + (text_spec,) * 3 + (PartitionSpec(batch),),
                   out_specs=(video_spec, text_spec))
    return fn(qv, kv, vv, qt, kt, vt, lengths)


def local_attention(q, k, v, attend: Attend, kv_mask: jax.Array | None = None) -> jax.Array:
    """Attention of sequence-sharded queries (B, L, N, E) to whole (replicated over sequence) keys/values
    (B, Lk, N, E), e.g. cross-attention to the text: each device attends its own token shard, no collective."""
    mesh = active_mesh()
    if mesh is None:
        return attend(q, k, v, kv_mask)
    B, L, N, _ = q.shape
    sp = axis_size(SEQUENCE_AXIS, mesh)
    batch, heads = _specs(mesh, B, N)
    q_spec = PartitionSpec(batch, SEQUENCE_AXIS if sp > 1 and L % sp == 0 else None, heads, None)
    kv_spec = PartitionSpec(batch, None, heads, None)
    if kv_mask is None:
        fn = shard_map(lambda q, k, v: _local(attend, q, k, v, None), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                       out_specs=q_spec)
        return fn(q, k, v)
    fn = shard_map(functools.partial(_local, attend), mesh=mesh,
                   in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(batch, None)), out_specs=q_spec)
    return fn(q, k, v, kv_mask)


def head_chunks(mesh=None) -> int:
    """How many head chunks the SP region splits the heads into (tensor x sequence; 1 without a mesh)."""
    return axis_size(HEAD_AXIS, mesh) * axis_size(SEQUENCE_AXIS, mesh)


def head_chunk_index() -> jax.Array | int:
    """Inside ``ulysses_attention``'s ``attend``: which chunk of ``head_chunks()`` heads this device holds
    (traced), so per-head settings (e.g. sliding-tile windows) can be picked with ``lax.switch``."""
    sp, tp = axis_size(SEQUENCE_AXIS), axis_size(HEAD_AXIS)
    index = 0
    if tp > 1:
        index = jax.lax.axis_index(HEAD_AXIS) * sp
    if sp > 1:
        index = index + jax.lax.axis_index(SEQUENCE_AXIS)
    return index


def _local(attend: Attend, q, k, v, kv_mask):
    """``attend`` on per-device arrays, with any mesh a kernel would shard over itself cleared."""
    from fastvideo_jax.attention import splash_tpu

    if splash_tpu.current_mesh() is None:
        return attend(q, k, v, kv_mask)
    with splash_tpu.config_scope(splash_tpu.current_config(), mesh=None):
        return attend(q, k, v, kv_mask)


def padding_mask(batch: int, length: int, padded: int) -> jax.Array | None:
    """(B, padded) bool, True on the first ``length`` tokens; None when nothing is padded."""
    if padded == length:
        return None
    return jnp.broadcast_to(jnp.arange(padded) < length, (batch, padded))
