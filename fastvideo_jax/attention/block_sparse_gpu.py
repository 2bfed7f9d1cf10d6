"""Block-sparse Triton-lowered Pallas flash attention (GPU).

* ``block_sparse_attention``: our Triton-lowered Pallas flash kernel that, for each q block, visits only the kv
  blocks listed in a precomputed table (count + ids), with per-key validity masking and a block-sparse backward
  (dQ over the same lists, dK/dV over the transposed lists). Used by sliding-tile attention on GPU.
* ``dense_block_sparse_attention``: dense attention on the same kernel (every block listed), for the key-only
  masks and cross lengths that ``pallas_gpu.triton_attention`` (JAX's ``mha``) cannot express.

All entry points take (B, L, N, E) and ``scale`` (default 1/sqrt(E)). ``interpret=True`` runs the Triton
kernels in Pallas interpret mode (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from fastvideo_jax.attention._gpu_common import (
    LOG2E,
    MASK_VALUE,
    TritonConfig,
    _is_pow2,
    _next_pow2,
    _pad_axis,
    current_triton_config,
)
from fastvideo_jax.attention._common import round_up
from fastvideo_jax.attention.sliding_tile_mask import BlockTables, dense_block_tables


@dataclasses.dataclass(frozen=True)
class _KernelStatic:
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    has_valid: bool
    num_warps: int | None
    num_stages: int
    interpret: bool


def _compiler_params(static: _KernelStatic, block_a: int, block_b: int, head_dim: int):
    from jax.experimental.pallas import triton as plgpu

    warps = static.num_warps
    if warps is None:
        warps = 4 if head_dim <= 64 or block_a * block_b < 128 * 128 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=static.num_stages)


def _fwd_kernel(table_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, st: _KernelStatic):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q, st.block_k
    E = q_ref.shape[-1]
    qk_scale = st.scale * LOG2E
    q = plgpu.load(q_ref)
    count = table_ref[0]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        kb = table_ref[j + 1]
        sl = pl.ds(kb * bk, bk)
        k = plgpu.load(k_ref.at[sl, :])
        s = plgpu.dot(q, k.T) * qk_scale  # (bq, bk), log2 domain
        if st.has_valid:
            ok = valid_ref[sl] != 0
            s = jnp.where(ok[None, :], s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if st.has_valid:  # a row with no valid key so far adds nothing (output 0 if it never gets one)
            p = jnp.where(ok[None, :], p, 0.0)
        l_next = corr * l_prev + jnp.sum(p, axis=-1)
        v = plgpu.load(v_ref.at[sl, :])
        acc = corr[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    acc = jnp.zeros((bq, E), jnp.float32)
    m = jnp.zeros((bq,), jnp.float32) + MASK_VALUE
    l = jnp.zeros((bq,), jnp.float32)
    acc, m, l = lax.fori_loop(0, count, body, (acc, m, l))
    l_safe = jnp.where(l == 0.0, 1.0, l)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype))
    lse_ref[...] = m + jnp.log2(l_safe)


def _sub_block(table_ref, j, sub: int):
    """Backward sub-block ``j`` of a table row listing forward blocks. ``lax.div`` / ``lax.rem`` (j >= 0), not
    ``//`` / ``%``: jnp's floor-division wrappers do not lower through Pallas Triton (jax 0.10: rem of i32 and i1)."""
    if sub == 1:
        return table_ref[j + 1]
    s = jnp.int32(sub)
    return table_ref[lax.div(j, s) + 1] * s + lax.rem(j, s)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _KernelStatic):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q_bwd, st.block_k_bwd
    E = q_ref.shape[-1]
    qk_scale = st.scale * LOG2E
    q = plgpu.load(q_ref)
    do = plgpu.load(do_ref)
    lse = lse_ref[...]
    delta = delta_ref[...]
    count = table_ref[0]
    sub = st.block_k // bk  # table ids are in forward kv blocks; the backward walks sub-blocks of them

    def body(j, dq):
        kb = _sub_block(table_ref, j, sub)
        sl = pl.ds(kb * bk, bk)
        k = plgpu.load(k_ref.at[sl, :])
        v = plgpu.load(v_ref.at[sl, :])
        s = plgpu.dot(q, k.T) * qk_scale
        p = jnp.exp2(s - lse[:, None])
        if st.has_valid:
            p = jnp.where((valid_ref[sl] != 0)[None, :], p, 0.0)
        dp = plgpu.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, count * sub, body, jnp.zeros((bq, E), jnp.float32))
    plgpu.store(dq_ref, (dq * st.scale).astype(dq_ref.dtype))


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                st: _KernelStatic):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q_bwd, st.block_k_bwd
    E = k_ref.shape[-1]
    qk_scale = st.scale * LOG2E
    k = plgpu.load(k_ref)
    v = plgpu.load(v_ref)
    ok = (valid_ref[...] != 0) if st.has_valid else None
    count = table_ref[0]
    sub = st.block_q // bq

    def body(j, carry):
        dk, dv = carry
        qb = _sub_block(table_ref, j, sub)
        sl = pl.ds(qb * bq, bq)
        q = plgpu.load(q_ref.at[sl, :])
        do = plgpu.load(do_ref.at[sl, :])
        lse = lse_ref[sl]
        delta = delta_ref[sl]
        s = plgpu.dot(q, k.T) * qk_scale  # (bq, bk)
        p = jnp.exp2(s - lse[:, None])
        if ok is not None:
            p = jnp.where(ok[None, :], p, 0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
        dp = plgpu.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
        return dk, dv

    zeros = jnp.zeros((bk, E), jnp.float32)
    dk, dv = lax.fori_loop(0, count * sub, body, (zeros, zeros))
    plgpu.store(dk_ref, (dk * st.scale).astype(dk_ref.dtype))
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype))


def _table_spec(table: jax.Array, rows_per_block: int = 1):
    """BlockSpec for a (H', R, 1 + width) table: grid step i reads row i // rows_per_block (of head h if H' > 1);
    a (B, N, R, 1 + width) table (data-dependent, per example and head) reads row i of example b, head h."""
    from jax.experimental import pallas as pl

    if table.ndim == 4:
        return pl.BlockSpec((None, None, None, table.shape[3]), lambda i, b, h: (b, h, i // rows_per_block, 0))
    if table.shape[0] == 1:
        return pl.BlockSpec((None, None, table.shape[2]), lambda i, b, h: (0, i // rows_per_block, 0))
    return pl.BlockSpec((None, None, table.shape[2]), lambda i, b, h: (h, i // rows_per_block, 0))


def _bs_forward(q, k, v, valid, kv_table, st: _KernelStatic):
    from jax.experimental import pallas as pl

    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    grid = (Lq // st.block_q, B, N)
    in_specs = [
        _table_spec(kv_table),
        pl.BlockSpec((None, st.block_q, None, E), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, Lk, None, E), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, Lk, None, E), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, Lk), lambda i, b, h: (b, 0)) if st.has_valid else None,
    ]
    out_specs = [
        pl.BlockSpec((None, st.block_q, None, E), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, st.block_q), lambda i, b, h: (b, h, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Lq), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_compiler_params(st, st.block_q, st.block_k, E),
        interpret=st.interpret, name="block_sparse_attention_fwd",
    )(kv_table, q, k, v, valid)


def _bs_backward(q, k, v, valid, kv_table, q_table, out, lse, do, st: _KernelStatic):
    from jax.experimental import pallas as pl

    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    delta = jnp.einsum("bqne,bqne->bnq", out.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(q.dtype)
    valid_full = pl.BlockSpec((None, Lk), lambda i, b, h: (b, 0)) if st.has_valid else None
    full_q = pl.BlockSpec((None, Lq, None, E), lambda i, b, h: (b, 0, h, 0))
    full_k = pl.BlockSpec((None, Lk, None, E), lambda i, b, h: (b, 0, h, 0))
    row_q = pl.BlockSpec((None, None, Lq), lambda i, b, h: (b, h, 0))

    # dQ: grid over backward q blocks; each reads the forward table row of its enclosing forward q block.
    bq, bk = st.block_q_bwd, st.block_k_bwd
    kv_table_spec = _table_spec(kv_table, st.block_q // bq)
    blk_q = pl.BlockSpec((None, bq, None, E), lambda i, b, h: (b, i, h, 0))
    blk_row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st), grid=(Lq // bq, B, N),
        in_specs=[kv_table_spec, blk_q, full_k, full_k, valid_full, blk_q, blk_row, blk_row],
        out_specs=blk_q, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(st, bq, bk, E), interpret=st.interpret,
        name="block_sparse_attention_dq",
    )(kv_table, q, k, v, valid, do, lse, delta)

    # dK/dV: grid over backward kv blocks, walking the transposed table.
    q_table_spec = _table_spec(q_table, st.block_k // bk)
    blk_k = pl.BlockSpec((None, bk, None, E), lambda i, b, h: (b, i, h, 0))
    valid_blk = pl.BlockSpec((None, bk), lambda i, b, h: (b, i)) if st.has_valid else None
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st), grid=(Lk // bk, B, N),
        in_specs=[q_table_spec, full_q, blk_k, blk_k, valid_blk, full_q, row_q, row_q],
        out_specs=[blk_k, blk_k],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(st, bq, bk, E), interpret=st.interpret,
        name="block_sparse_attention_dkv",
    )(q_table, q, k, v, valid, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _block_sparse_core(q, k, v, valid, kv_table, q_table, st: _KernelStatic):
    out, _ = _bs_forward(q, k, v, valid, kv_table, st)
    return out


def _core_fwd(q, k, v, valid, kv_table, q_table, st):
    out, lse = _bs_forward(q, k, v, valid, kv_table, st)
    return out, (q, k, v, valid, kv_table, q_table, out, lse)


def _core_bwd(st, res, do):
    q, k, v, valid, kv_table, q_table, out, lse = res
    dq, dk, dv = _bs_backward(q, k, v, valid, kv_table, q_table, out, lse, do, st)
    return dq, dk, dv, None, None, None


_block_sparse_core.defvjp(_core_fwd, _core_bwd)


def block_sparse_attention(
    q: jax.Array,  # (B, Lq, N, E), Lq a multiple of tables.block_q
    k: jax.Array,  # (B, Lk, N, E), Lk a multiple of tables.block_k
    v: jax.Array,
    kv_valid: jax.Array | None,  # (B, Lk) bool/int: False keys are never attended
    tables: BlockTables | tuple[jax.Array, jax.Array],
    *,
    scale: float | None = None,
    config: TritonConfig | None = None,
) -> jax.Array:
    """Flash attention that visits only the listed (q block, kv block) pairs. Differentiable.

    ``tables`` is a :class:`BlockTables` (static numpy) or a ``(kv_table, q_table)`` pair of int32 arrays in the
    same format (they may be traced, e.g. stacked per layer under a scan), either (H', R, 1 + width) with H' in
    (1, N) or (B, N, R, 1 + width) (data-dependent tables, e.g. top-k selections); block sizes then come from
    ``config.block_q`` / ``config.block_k``. A query row with no valid key in its blocks gets output 0.
    """
    config = config or current_triton_config()
    if isinstance(tables, BlockTables):
        bq, bk = tables.block_q, tables.block_k
        kv_table, q_table = jnp.asarray(tables.kv), jnp.asarray(tables.q)
    else:
        bq, bk = config.block_q, config.block_k
        kv_table, q_table = (jnp.asarray(t, jnp.int32) for t in tables)
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    if Lq % bq or Lk % bk:
        raise ValueError(f"block_sparse_attention: lengths ({Lq}, {Lk}) must be multiples of blocks ({bq}, {bk})")
    lead = kv_table.shape[:-2]
    if (kv_table.shape[-2] != Lq // bq or q_table.shape[-2] != Lk // bk or q_table.shape[:-2] != lead
            or lead not in ((1,), (N,), (B, N))):
        raise ValueError(f"block tables {kv_table.shape}/{q_table.shape} do not match q/k blocks "
                         f"({Lq // bq}, {Lk // bk}) and {N} heads")
    for name, b in (("block_q", bq), ("block_k", bk)):
        if not _is_pow2(b) or b < 16:
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    bq_bwd, bk_bwd = min(config.block_q_bwd, bq), min(config.block_k_bwd, bk)
    scale = E ** -0.5 if scale is None else float(scale)
    Ep = _next_pow2(E)  # Triton tensor shapes are powers of two: zero-pad the head dim (exact)
    qp, kp, vp = (_pad_axis(t, 3, Ep) for t in (q, k, v))
    valid = None if kv_valid is None else jnp.asarray(kv_valid).astype(jnp.int32)
    st = _KernelStatic(scale, bq, bk, bq_bwd, bk_bwd, valid is not None, config.num_warps, config.num_stages,
                       config.interpret)
    out = _block_sparse_core(qp, kp, vp, valid, kv_table, q_table, st)
    return out[..., :E]


def dense_block_sparse_attention(q, k, v, kv_mask=None, *, scale=None, config: TritonConfig | None = None):
    """Dense attention on the block-sparse kernel (all blocks listed): any lengths, key-only masks."""
    config = config or current_triton_config()
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    Lqp, Lkp = round_up(Lq, config.block_q), round_up(Lk, config.block_k)
    qp = _pad_axis(q, 1, Lqp)
    kp, vp = _pad_axis(k, 1, Lkp), _pad_axis(v, 1, Lkp)
    valid = None
    if kv_mask is not None or Lkp != Lk:
        valid = jnp.ones((B, Lk), bool) if kv_mask is None else kv_mask.astype(bool)
        valid = _pad_axis(valid, 1, Lkp)
    tables = dense_block_tables(Lqp // config.block_q, Lkp // config.block_k, config.block_q, config.block_k)
    out = block_sparse_attention(qp, kp, vp, valid, tables, scale=scale, config=config)
    return out[:, :Lq]
