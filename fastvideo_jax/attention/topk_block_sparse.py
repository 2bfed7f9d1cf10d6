"""Data-dependent block-sparse attention driven by top-k block indices (VSA's fine stage).

::

    out = topk_block_sparse_attention(q, k, v, kv_block_indices, block_size=64, kv_valid_blocks=None,
                                      backend=None, interpret=None)

* ``q, k, v``: (B, L, N, D), ``L`` a multiple of ``block_size``. Query block ``i`` holds tokens
  ``[i * block_size, (i + 1) * block_size)``, and the same for KV blocks; putting tokens in tile-major (cube-major)
  order is the caller's business.
* ``kv_block_indices``: (B, N, L // block_size, topk) int: the KV blocks query block ``i`` of head ``h`` attends
  to. Traced data under jit (changing it never retraces). Semantics, the same in every implementation:
  the *set* of listed blocks counts: order is irrelevant and a duplicate is counted once; an entry outside
  ``[0, L // block_size)`` (e.g. ``-1``) lists nothing, so rows may select fewer than ``topk`` blocks.
  Concrete (non-traced) inputs are checked: entries below -1 or >= L // block_size raise ``UserError``.
* ``kv_valid_blocks``: None (every key valid) or int (L // block_size,) / (B, L // block_size): the number of
  valid tokens in each KV block, which are a prefix of the block (FastVideo's ``variable_block_sizes``; the
  cube-major layout of a ragged grid puts each partial cube's real tokens first in its slot). Keys past the count
  are never attended. Values in [0, block_size].
* A query row whose selected blocks hold no valid key gets output 0 (and zero gradients).
* Output (B, L, N, D) in q's dtype; logits, softmax and accumulation in fp32; scale 1/sqrt(D). Differentiable
  (dq, dk, dv; the indices and counts get no gradient).

Implementations (``backend``): ``"reference"`` (jnp: per query block a gather of its selected KV blocks, a
``lax.map`` over query blocks, never an (L, L) matrix; any platform), ``"pallas_gpu"`` (our Triton-lowered
block-sparse flash kernel, ``block_sparse_gpu``, with per-(batch, head) tables built inside jit; forward, dQ and
dK/dV kernels), ``"pallas_tpu"`` (Pallas Mosaic TPU kernels with the indices as scalar prefetch:
``topk_block_sparse_tpu``). ``None`` picks the platform's kernel (GPU, TPU) or the reference. A requested kernel
that cannot run the call (platform, dtype, head dim, block size, TPU SMEM budget) falls back to the reference with a logged warning.
``interpret=True`` runs the Pallas kernels in interpret mode (CPU tests); None = the platform's real kernels
(``pallas_gpu`` also honours ``triton_config_scope(TritonConfig(interpret=True))``).

Block tables (shared by the kernels, built inside jit from the indices):
* ``kv`` table (B, N, nq, 1 + topk): per query block its count of distinct valid blocks, then their ids in
  ascending order (the rest filled with the last id, so a pipelined kernel re-reads a block it already holds).
* transposed ``q`` table (B, N, nk, 1 + nq): per KV block the query blocks that selected it. Its width is the
  exact bound nq (every query block may select the same KV block): B * N * nk * (nq + 1) int32 words (e.g.
  Wan 14B 720p, 75,600 tokens in 1,182 blocks of 64: 5.6 MB per head, 224 MB for 40 heads, during the backward
  pass only), built from a scattered (B, N, nq, nk) bool block map, (L / block_size)^2 per head, never (L, L).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.attention._common import platform, warn_once
from fastvideo_jax.errors import UserError

__all__ = ["TopkBackend", "compact_kv_table", "kv_token_valid", "resolve_topk_backend", "topk_block_sparse_attention",
           "topk_block_sparse_reference", "transposed_q_table"]

_NEG = -0.7 * float(np.finfo(np.float32).max)


class TopkBackend(enum.Enum):
    REFERENCE = "reference"
    PALLAS_GPU = "pallas_gpu"
    PALLAS_TPU = "pallas_tpu"

    @classmethod
    def parse(cls, value) -> "TopkBackend | None":
        if value is None or isinstance(value, cls):
            return value
        name = getattr(value, "value", value)  # an AttentionBackend maps by platform kernel
        aliases = {"pallas_gpu_triton": cls.PALLAS_GPU, "splash_tpu": cls.PALLAS_TPU, "torch_sdpa": cls.REFERENCE}
        name = str(name).lower()
        if name in aliases:
            return aliases[name]
        try:
            return cls(name)
        except ValueError:
            raise UserError(f"topk_block_sparse_attention: unknown backend {value!r}; "
                            f"backends: {[b.value for b in cls]}") from None


# ----------------------------------------------------------------------------------------------------------
# Validation and tables
# ----------------------------------------------------------------------------------------------------------


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _validate(q, k, v, idx, block_size: int, kv_valid_blocks):
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise UserError(f"topk_block_sparse_attention: q, k, v must share one (B, L, N, D) shape; got "
                        f"{q.shape}, {k.shape}, {v.shape}")
    B, L, N, _ = q.shape
    if block_size < 1 or L % block_size:
        raise UserError(f"topk_block_sparse_attention: length {L} is not a multiple of block_size={block_size}")
    nb = L // block_size
    if idx.ndim != 4 or tuple(idx.shape[:3]) != (B, N, nb) or idx.shape[3] < 1:
        raise UserError(f"topk_block_sparse_attention: kv_block_indices must be (B, N, L // block_size, topk) = "
                        f"({B}, {N}, {nb}, topk>=1); got {tuple(idx.shape)}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise UserError(f"topk_block_sparse_attention: kv_block_indices must be integers, got {idx.dtype}")
    if _is_concrete(idx):
        bad = np.asarray(idx)
        if bad.size and (bad.min() < -1 or bad.max() >= nb):
            raise UserError(f"topk_block_sparse_attention: kv_block_indices must lie in [-1, {nb}) "
                            f"(-1 = no block); got min {bad.min()}, max {bad.max()}")
    if kv_valid_blocks is not None:
        shape = tuple(jnp.shape(kv_valid_blocks))
        if shape not in ((nb,), (B, nb)):
            raise UserError(f"topk_block_sparse_attention: kv_valid_blocks must be (L // block_size,) = ({nb},) or "
                            f"(B, L // block_size) = ({B}, {nb}) valid-token counts; got {shape}")
        if _is_concrete(kv_valid_blocks):
            c = np.asarray(kv_valid_blocks)
            if c.min() < 0 or c.max() > block_size:
                raise UserError(f"topk_block_sparse_attention: kv_valid_blocks counts must lie in [0, {block_size}]; "
                                f"got min {c.min()}, max {c.max()}")


def compact_kv_table(kv_block_indices: jax.Array, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """Distinct valid ids per row, ascending, then padding: returns ``(ids, count)``.

    ``ids`` (..., topk) int32: the ``count`` (...,) distinct entries of [0, num_blocks) first, the rest repeat
    the last of them (0 when there is none)."""
    idx = jnp.sort(kv_block_indices.astype(jnp.int32), axis=-1)
    ok = (idx >= 0) & (idx < num_blocks)
    dup = jnp.concatenate([jnp.zeros_like(ok[..., :1]), idx[..., 1:] == idx[..., :-1]], axis=-1)
    keep = ok & ~dup
    ids = jnp.sort(jnp.where(keep, idx, num_blocks), axis=-1)  # kept ids ascending, then the sentinel
    count = keep.sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(ids, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    ids = jnp.where(ids == num_blocks, last, ids)
    return ids.astype(jnp.int32), count


def transposed_q_table(ids: jax.Array, count: jax.Array, num_kv_blocks: int) -> jax.Array:
    """(B, N, nk, 1 + nq) int32: per KV block the count of query blocks that selected it, then their ids."""
    *lead, nq, topk = ids.shape
    listed = jnp.arange(topk) < count[..., None]  # (B, N, nq, topk)
    target = jnp.where(listed, ids, num_kv_blocks)  # unlisted slots scatter out of bounds (dropped)
    grids = jnp.meshgrid(*(jnp.arange(n) for n in (*lead, nq)), indexing="ij")
    sel = jnp.zeros((*lead, nq, num_kv_blocks), bool)
    sel = sel.at[(*(g[..., None] for g in grids), target)].set(True, mode="drop")  # (B, N, nq, nk)
    sel = jnp.swapaxes(sel, -1, -2)  # (B, N, nk, nq)
    order = jnp.argsort(~sel, axis=-1, stable=True).astype(jnp.int32)  # selecting q blocks first, ascending
    cnt = sel.sum(-1).astype(jnp.int32)
    return jnp.concatenate([cnt[..., None], order], axis=-1)


def kv_token_valid(kv_valid_blocks: jax.Array | None, B: int, nb: int, block_size: int) -> jax.Array | None:
    """(B, nb * block_size) bool from per-block valid-token counts (a prefix of each block), or None."""
    if kv_valid_blocks is None:
        return None
    c = jnp.broadcast_to(jnp.asarray(kv_valid_blocks, jnp.int32), (B, nb))
    return (jnp.arange(block_size) < c[..., None]).reshape(B, nb * block_size)


# ----------------------------------------------------------------------------------------------------------
# Reference (jnp)
# ----------------------------------------------------------------------------------------------------------


def topk_block_sparse_reference(q, k, v, kv_block_indices, *, block_size: int = 64, kv_valid_blocks=None):
    """jnp twin: per query block, softmax over the gathered keys of its distinct selected blocks.

    Memory per step O(B * N * topk * block_size * D) (a ``lax.map`` over query blocks; each step is
    rematerialised in the backward pass)."""
    B, L, N, D = q.shape
    nb = L // block_size
    scale = D ** -0.5
    ids, count = compact_kv_table(kv_block_indices, nb)  # (B, N, nb, topk), (B, N, nb)
    listed = jnp.arange(ids.shape[-1]) < count[..., None]
    tok_valid = kv_token_valid(kv_valid_blocks, B, nb, block_size)
    tok_valid = (jnp.ones((B, nb, block_size), bool) if tok_valid is None
                 else tok_valid.reshape(B, nb, block_size))

    def blocks(x):  # (B, L, N, D) -> (B, N, nb, bs, D)
        return jnp.transpose(x.reshape(B, nb, block_size, N, D), (0, 3, 1, 2, 4))

    kb, vb, qb = blocks(k), blocks(v), blocks(q)
    bidx = jnp.arange(B)[:, None, None]

    @jax.checkpoint
    def one(args):
        qi, idi, li = args  # (B, N, bs, D), (B, N, topk), (B, N, topk)
        hidx = jnp.arange(N)[None, :, None]
        ks, vs = kb[bidx, hidx, idi], vb[bidx, hidx, idi]  # (B, N, topk, bs, D)
        ok = tok_valid[bidx, idi] & li[..., None]  # (B, N, topk, bs)
        s = jnp.einsum("bnqd,bntkd->bnqtk", qi, ks, preferred_element_type=jnp.float32) * scale
        s = jnp.where(ok[:, :, None], s, _NEG)
        m = s.max(axis=(-2, -1), keepdims=True)
        p = jnp.where(ok[:, :, None], jnp.exp(s - m), 0.0)
        l = p.sum(axis=(-2, -1), keepdims=True)
        p = p / jnp.where(l == 0.0, 1.0, l)
        return jnp.einsum("bnqtk,bntkd->bnqd", p.astype(v.dtype), vs, preferred_element_type=jnp.float32)

    xs = (jnp.moveaxis(qb, 2, 0), jnp.moveaxis(ids, 2, 0), jnp.moveaxis(listed, 2, 0))
    out = jax.lax.map(one, xs)  # (nb, B, N, bs, D)
    return jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(B, L, N, D).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------


def _check(backend: TopkBackend, q, block_size: int, interpret: bool, topk: int) -> str | None:
    if backend is TopkBackend.REFERENCE:
        return None
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} unsupported"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if backend is TopkBackend.PALLAS_GPU:
        from fastvideo_jax.attention._gpu_common import _is_pow2, current_triton_config

        if not (interpret or current_triton_config().interpret) and platform() != "gpu":
            return f"needs a GPU or interpret=True (platform is {platform()})"
        if not _is_pow2(block_size) or block_size < 16:
            return f"block_size={block_size} must be a power of two >= 16 (Triton tensor shapes)"
        return None
    if not interpret and platform() != "tpu":
        return f"needs a TPU or interpret=True (platform is {platform()})"
    if block_size % 8:
        return f"block_size={block_size} must be a multiple of 8 (TPU sublanes)"
    from fastvideo_jax.attention import topk_block_sparse_tpu as tpu

    nb = q.shape[1] // block_size
    if tpu.plan(q.shape[0] * q.shape[2], nb, topk) is None:
        return (f"one query block's tables ({3 * nb + 2 * topk} words) exceed SMEM_TABLE_WORDS="
                f"{tpu.SMEM_TABLE_WORDS}; use larger blocks")
    return None


def resolve_topk_backend(backend, q, block_size: int = 64, interpret: bool | None = None,
                         topk: int = 1) -> TopkBackend:
    """The implementation that will run: the requested one if capable (else the reference, logged), or for
    None the platform's kernel when capable, else the reference."""
    requested = TopkBackend.parse(backend)
    if requested is None:
        plat = {"gpu": TopkBackend.PALLAS_GPU, "tpu": TopkBackend.PALLAS_TPU}.get(platform())
        if plat is not None and _check(plat, q, block_size, bool(interpret), topk) is None:
            return plat
        return TopkBackend.REFERENCE
    reason = _check(requested, q, block_size, bool(interpret), topk)
    if reason is None:
        return requested
    warn_once(f"topk_block_sparse_attention: backend {requested.value} cannot run this call ({reason}); "
              "falling back to the jnp reference (a gather per query block, no (L, L) matrix)")
    return TopkBackend.REFERENCE


def topk_block_sparse_attention(
    q: jax.Array,  # (B, L, N, D)
    k: jax.Array,  # (B, L, N, D)
    v: jax.Array,  # (B, L, N, D)
    kv_block_indices: jax.Array,  # (B, N, L // block_size, topk) int
    *,
    block_size: int = 64,
    kv_valid_blocks: jax.Array | None = None,  # (L // block_size,) or (B, L // block_size) valid tokens per block
    backend: "TopkBackend | str | None" = None,
    interpret: bool | None = None,
) -> jax.Array:  # (B, L, N, D)
    """Attention of each query block over the keys of its listed KV blocks (see the module docstring)."""
    kv_block_indices = jnp.asarray(kv_block_indices) if isinstance(kv_block_indices, np.ndarray) else kv_block_indices
    _validate(q, k, v, kv_block_indices, block_size, kv_valid_blocks)
    chosen = resolve_topk_backend(backend, q, block_size, interpret, kv_block_indices.shape[-1])
    if chosen is TopkBackend.PALLAS_GPU:
        from fastvideo_jax.attention.topk_block_sparse_gpu import topk_block_sparse_gpu

        return topk_block_sparse_gpu(q, k, v, kv_block_indices, block_size=block_size,
                                     kv_valid_blocks=kv_valid_blocks, interpret=interpret)
    if chosen is TopkBackend.PALLAS_TPU:
        from fastvideo_jax.attention.topk_block_sparse_tpu import topk_block_sparse_tpu

        return topk_block_sparse_tpu(q, k, v, kv_block_indices, block_size=block_size,
                                     kv_valid_blocks=kv_valid_blocks, interpret=bool(interpret))
    return topk_block_sparse_reference(q, k, v, kv_block_indices, block_size=block_size,
                                       kv_valid_blocks=kv_valid_blocks)
