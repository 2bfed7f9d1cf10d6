"""Video sparse attention (VSA, FastVideo / arXiv 2505.13389) for the DiT's (B, L, N, E) video tokens.

Call it from a DiT self-attention layer with the latent token grid::

    out = video_sparse_attention(q, k, v, gate, grid=(T, H, W), sparsity=0.8)

``q/k/v/gate`` hold the video tokens in row-major (t, h, w) order. Inside, the tokens go to cube-major order
(4x4x4 cubes, ragged border cubes padded, see ``video_sparse_layout``) and two branches run:

* coarse: attention over the cube means of q, k and v (the pooled sums divided by each cube's real-token
  count), one output per query cube, broadcast to its tokens;
* fine: for each query cube, softmax attention over the tokens of its top-k KV cubes, chosen by the coarse
  scores (k from ``sparsity``, ``video_sparse_layout.topk_count``); padded keys are masked.

The output is ``fine + gate * coarse`` (``gate``: the DiT's ``to_gate_compress`` projection; None = 1), back in
the caller's order. Nothing of size (L, L) is built: the reference gathers each query cube's selected KV cubes.

``sparsity`` is a Python float (top-k static: its own compiled shape) or a traced scalar; a traced one needs
``max_topk`` (static: the index list width; default every cube) and picks the count at run time, so a new
sparsity does not recompile (entries past the count go to the fine stage as -1, "no block": the kernels skip
them, the jnp reference gathers ``max_topk`` cubes and masks them).
The selection is not differentiated (integer indices); gradients flow through both branches' softmaxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.attention.topk_block_sparse import topk_block_sparse_attention
from fastvideo_jax.attention.video_sparse_layout import (
    CUBE_TOKENS,
    VSA_TILE,
    CubeLayout,
    check_sparsity,
    cube_layout,
    topk_count,
    traced_topk_count,
)

__all__ = ["video_sparse_attention", "vsa_coarse", "vsa_selection", "vsa_topk_plan"]

F32 = jnp.float32


# ----------------------------------------------------------------------------------------------------------
# The two branches (inputs cube-major, (B, num_cubes * 64, N, E))
# ----------------------------------------------------------------------------------------------------------


def vsa_coarse(qt, kt, vt, sizes, scale: float) -> tuple[jax.Array, jax.Array]:
    """Coarse branch: ``(out (B, C, N, E), scores (B, N, C, C) fp32)`` over the C cube means."""
    B, Lp, N, E = qt.shape
    C = Lp // CUBE_TOKENS
    count = jnp.asarray(sizes, F32)[None, :, None, None]

    def pool(x):  # padding slots are zero: the sum over the slot is the sum over the cube's real tokens
        return (x.reshape(B, C, CUBE_TOKENS, N, E).astype(F32).sum(2) / count).astype(x.dtype)

    qc, kc, vc = pool(qt), pool(kt), pool(vt)
    scores = jnp.einsum("bqne,bkne->bnqk", qc, kc, preferred_element_type=F32) * scale
    p = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bnqk,bkne->bqne", p.astype(vc.dtype), vc, preferred_element_type=F32)
    return out.astype(qt.dtype), scores


def _select(scores: jax.Array, width: int) -> jax.Array:
    """(B, N, C, width) int32: each query cube's ``width`` highest-scoring KV cubes, best first."""
    return jax.lax.top_k(jax.lax.stop_gradient(scores), width)[1].astype(jnp.int32)


def _fine(qt, kt, vt, kv_cube_indices, count, sizes, backend, interpret) -> jax.Array:
    """Fine branch: each query cube over the real tokens of its first ``count`` listed KV cubes (the top-k
    block-sparse op: entries past ``count`` become -1, "no block"; keys past each cube's size are masked)."""
    width = kv_cube_indices.shape[-1]
    if not isinstance(count, int) or count < width:
        kv_cube_indices = jnp.where(jnp.arange(width) < count, kv_cube_indices, -1)
    return topk_block_sparse_attention(qt, kt, vt, kv_cube_indices, block_size=CUBE_TOKENS,
                                       kv_valid_blocks=jnp.asarray(sizes), backend=backend, interpret=interpret)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def vsa_topk_plan(grid: Sequence[int], sparsity, max_topk: int | None = None) -> tuple[int, "int | jax.Array"]:
    """``(width, count)``: the index-list width (static) and the KV cubes used per query cube (a Python int for
    a Python sparsity, else a traced int32 clipped to ``width``). ``max_topk`` caps the width (default: the top-k
    of a Python sparsity, or every cube for a traced one)."""
    layout = cube_layout(tuple(grid))
    C = layout.num_cubes
    if max_topk is not None and not 1 <= int(max_topk) <= C:
        raise ValueError(f"max_topk must be in [1, {C}] (the cubes of grid {tuple(grid)}), got {max_topk}")
    if isinstance(sparsity, jax.core.Tracer):
        width = C if max_topk is None else int(max_topk)
        return width, traced_topk_count(sparsity, C, width)
    count = topk_count(check_sparsity(sparsity), C)
    if max_topk is not None and count > int(max_topk):
        raise ValueError(f"sparsity {float(sparsity)} keeps {count} of {C} cubes, more than max_topk={max_topk}")
    return count, count


def _prepare(q, k, v, grid) -> tuple[CubeLayout, float]:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"video_sparse_attention expects equal (B, L, N, E) q/k/v, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    layout = cube_layout(tuple(grid), VSA_TILE)
    if q.shape[1] != layout.video_len:
        raise ValueError(f"video_sparse_attention: sequence length {q.shape[1]} != T*H*W = {layout.video_len} for "
                         f"grid {tuple(grid)}")
    return layout, q.shape[-1] ** -0.5  # FastVideo: 1/sqrt(D) in both branches


def vsa_selection(q, k, *, grid: Sequence[int], sparsity,
                  max_topk: int | None = None) -> tuple[jax.Array, "int | jax.Array"]:
    """``(kv_cube_indices (B, N, C, width) int32, count)``: the KV cubes each query cube attends to (its first
    ``count`` entries, best first), in cube ids (row-major over the 4x4x4 cube grid)."""
    layout, scale = _prepare(q, k, k, grid)
    width, count = vsa_topk_plan(grid, sparsity, max_topk)
    qt, kt = layout.to_cubes(q), layout.to_cubes(k)
    _, scores = vsa_coarse(qt, kt, kt, layout.sizes, scale)
    return _select(scores, width), count


def video_sparse_attention(
    q: jax.Array,  # (B, L, N, E), L = T*H*W, row-major
    k: jax.Array,
    v: jax.Array,
    gate: jax.Array | None = None,  # (B, L, N, E): weight of the coarse branch (FastWan's to_gate_compress)
    *,
    grid: Sequence[int],
    sparsity,  # float in [0, 1), or a traced scalar (then max_topk is the static width)
    max_topk: int | None = None,
    backend: AttentionBackend | str | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # (B, L, N, E), caller's order
    """VSA: ``fine + gate * coarse`` (module docstring). ``backend`` / ``interpret``: the fine stage's
    implementation (``topk_block_sparse_attention``: "reference", "pallas_gpu", "pallas_tpu", None = the
    platform's kernel)."""
    layout, scale = _prepare(q, k, v, grid)
    if gate is not None and gate.shape != q.shape:
        raise ValueError(f"video_sparse_attention: gate must be shaped like q {q.shape}, got {gate.shape}")
    width, count = vsa_topk_plan(grid, sparsity, max_topk)
    qt, kt, vt = (layout.to_cubes(x) for x in (q, k, v))
    coarse, scores = vsa_coarse(qt, kt, vt, layout.sizes, scale)  # (B, C, N, E)
    fine = layout.from_cubes(_fine(qt, kt, vt, _select(scores, width), count, layout.sizes, backend, interpret))
    coarse = jnp.take(coarse, jnp.asarray(layout.inv // CUBE_TOKENS), axis=1).astype(F32)  # each token's cube
    if gate is not None:
        coarse = coarse * gate.astype(F32)
    return (fine.astype(F32) + coarse).astype(q.dtype)
