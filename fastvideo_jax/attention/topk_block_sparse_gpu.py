"""Top-k block-sparse attention on our Triton-lowered Pallas flash kernel (GPU; interpret mode on CPU).

The kernels are ``block_sparse_gpu``'s (forward; dQ over each query block's list; dK/dV over each KV block's
transposed list); here only the data-dependent tables are built inside jit, per (example, head):

* kv table (B, N, nq, 1 + topk): ``compact_kv_table`` (distinct ids ascending, duplicates and -1 dropped).
* q table (B, N, nk, 1 + nq): ``transposed_q_table``, width the exact bound nq.

Keys past each block's valid count are masked per token. Block size = the kernel's forward q and kv block
(a power of two >= 16); backward blocks are min(TritonConfig.block_*_bwd, block_size). Launch options
(num_warps, num_stages) come from the current ``triton_config_scope``.
"""

from __future__ import annotations

import dataclasses

import jax

from fastvideo_jax.attention._gpu_common import current_triton_config
from fastvideo_jax.attention.block_sparse_gpu import block_sparse_attention
from fastvideo_jax.attention.topk_block_sparse import compact_kv_table, kv_token_valid, transposed_q_table

__all__ = ["topk_block_sparse_gpu", "topk_tables"]


def topk_tables(kv_block_indices: jax.Array, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """(kv_table (B, N, nq, 1 + topk), q_table (B, N, nk, 1 + nq)) int32 in ``block_sparse_gpu``'s format."""
    ids, count = compact_kv_table(kv_block_indices, num_blocks)
    kv_table = jax.numpy.concatenate([count[..., None], ids], axis=-1)
    return kv_table, transposed_q_table(ids, count, num_blocks)


def topk_block_sparse_gpu(q, k, v, kv_block_indices, *, block_size: int = 64, kv_valid_blocks=None,
                          interpret: bool | None = None):
    """(B, L, N, D) attention of each query block over its listed KV blocks. Differentiable."""
    B, L, N, _ = q.shape
    nb = L // block_size
    config = current_triton_config()
    config = dataclasses.replace(
        config, block_q=block_size, block_k=block_size,
        block_q_bwd=min(config.block_q_bwd, block_size), block_k_bwd=min(config.block_k_bwd, block_size),
        interpret=config.interpret if interpret is None else bool(interpret))
    valid = kv_token_valid(kv_valid_blocks, B, nb, block_size)
    return block_sparse_attention(q, k, v, valid, topk_tables(kv_block_indices, nb), config=config)
