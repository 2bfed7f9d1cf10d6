"""Top-k block-sparse attention as Pallas Mosaic TPU kernels (interpret mode on CPU), forward and backward.

Splash cannot serve here: its ``MaskInfo`` is computed in numpy from a static mask when the kernel is built, so
a selection that is traced data inside jit has no splash form. These kernels take the tables as scalar prefetch
(SMEM) and let the BlockSpec index maps fetch the selected blocks:

* forward and dQ: grid (heads, q blocks, topk); step (h, i, t) fetches KV block ``ids[h, i, t]``; steps past the
  row's count of distinct blocks repeat the last id (no new DMA) and compute nothing. Online softmax in fp32
  VMEM scratch; the log-sum-exp (natural log) is saved for the backward pass.
* dK/dV: grid (heads, S) over a list of (kv block, q block) pairs sorted by kv block, S = nq * topk + nk: every
  selected pair once, plus one empty pair per kv block (so blocks nobody selected are visited and written as
  zeros). Consecutive steps of one kv block accumulate in scratch; the output block is written back when the
  kv block changes. No width bound; the only idle steps are those of duplicate / -1 entries, trailing.

Layout: (B, L, N, D) is transposed to (B * N, L, D) heads. Every ``pallas_call``'s tables must fit
``SMEM_TABLE_WORDS`` int32 words of SMEM (the dK/dV pair list, 2 x (nq * topk + nk) words per head, dominates):
:func:`plan` groups heads per call (a ``lax.map`` over groups) when a head fits, else runs one head per call
with its query blocks in chunks (a ``lax.map`` / ``lax.scan`` over chunks; the dK/dV partials of the chunks are
summed in fp32; each chunk re-visits every kv block once through its empty pairs). E.g. Wan 14B 720p at
sparsity 0.9 (1,182 blocks of 64, topk 119) takes 3 query chunks per head. Only a budget below one query
block's tables (3 * nk + 2 * topk words) is refused by the capability check.
Not yet run on a TPU: block sizes, the SMEM budget and speed are unmeasured.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from fastvideo_jax.attention.topk_block_sparse import compact_kv_table

__all__ = ["Plan", "SMEM_TABLE_WORDS", "pair_lists", "plan", "topk_block_sparse_tpu"]

SMEM_TABLE_WORDS = 1 << 17  # 512 KiB of int32 tables per pallas_call
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class _Static:
    bs: int
    nq: int
    nk: int
    topk: int
    group: int  # heads per pallas_call
    chunks: int  # query chunks per head (nq above is the query blocks of one chunk)
    scale: float
    has_valid: bool
    interpret: bool


def _params(*semantics):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def _scores(q, k, st: _Static, ok):
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * st.scale
    return s if ok is None else jnp.where(ok, s, _NEG)


def _key_ok(vc_ref, h, kb, st: _Static):
    if not st.has_valid:
        return None
    return lax.broadcasted_iota(jnp.int32, (st.bs, st.bs), 1) < vc_ref[h * st.nk + kb]


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(ids_ref, cnt_ref, vc_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, st):
    from jax.experimental import pallas as pl

    g, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = g * st.nq + i

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(t < cnt_ref[row])
    def _step():
        ok = _key_ok(vc_ref, g, ids_ref[row * st.topk + t], st)
        s = _scores(q_ref[...], k_ref[...], st, ok)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        corr = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        l_sc[...] = corr * l_sc[...] + p.sum(axis=-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = corr * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(t == st.topk - 1)
    def _finish():
        l = l_sc[...]
        l_safe = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_safe)


def _dq_kernel(ids_ref, cnt_ref, vc_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, st):
    from jax.experimental import pallas as pl

    g, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = g * st.nq + i

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(t < cnt_ref[row])
    def _step():
        ok = _key_ok(vc_ref, g, ids_ref[row * st.topk + t], st)
        k, v, do = k_ref[...], v_ref[...], do_ref[...]
        p = jnp.exp(_scores(q_ref[...], k, st, ok) - lse_ref[...])
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(t == st.topk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(pkv_ref, pq_ref, vc_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, st):
    from jax.experimental import pallas as pl

    g, s_ = pl.program_id(0), pl.program_id(1)
    steps = st.nq * st.topk + st.nk
    idx = g * steps + s_
    kb = pkv_ref[idx]

    @pl.when((s_ == 0) | (pkv_ref[jnp.maximum(idx - 1, 0)] != kb))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(lax.bitwise_and(pq_ref[idx], 1) == 1)
    def _step():
        ok = _key_ok(vc_ref, g, kb, st)
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = jnp.exp(_scores(q, k, st, ok) - lse_ref[...])  # (bq, bk)
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)

    dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------------
# pallas_calls on one chunk of G heads: q/k/v (G, L, D), ids (G, nq, topk), cnt (G, nq), vc (G, nk)
# ----------------------------------------------------------------------------------------------------------


def _fwd_call(q, k, v, ids, cnt, vc, st: _Static):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    G, L, D = q.shape
    T = st.topk
    blk = (None, st.bs, D)
    qmap = lambda g, i, t, ids, cnt, vc: (g, i, 0)  # noqa: E731
    kmap = lambda g, i, t, ids, cnt, vc: (g, ids[(g * st.nq + i) * T + t], 0)  # noqa: E731
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(G, st.nq, T),
        in_specs=[pl.BlockSpec(blk, qmap), pl.BlockSpec(blk, kmap), pl.BlockSpec(blk, kmap)],
        out_specs=[pl.BlockSpec(blk, qmap), pl.BlockSpec((None, st.bs, 1), qmap)],
        scratch_shapes=[pltpu.VMEM((st.bs, 1), jnp.float32), pltpu.VMEM((st.bs, 1), jnp.float32),
                        pltpu.VMEM((st.bs, D), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st), grid_spec=spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((G, L, 1), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "arbitrary"), interpret=st.interpret,
        name="topk_block_sparse_fwd",
    )(ids.reshape(-1), cnt.reshape(-1), vc.reshape(-1), q, k, v)


def _dq_call(q, k, v, do, lse, delta, ids, cnt, vc, st: _Static):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    G, L, D = q.shape
    T = st.topk
    blk, row = (None, st.bs, D), (None, st.bs, 1)
    qmap = lambda g, i, t, ids, cnt, vc: (g, i, 0)  # noqa: E731
    kmap = lambda g, i, t, ids, cnt, vc: (g, ids[(g * st.nq + i) * T + t], 0)  # noqa: E731
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(G, st.nq, T),
        in_specs=[pl.BlockSpec(blk, qmap), pl.BlockSpec(blk, kmap), pl.BlockSpec(blk, kmap),
                  pl.BlockSpec(blk, qmap), pl.BlockSpec(row, qmap), pl.BlockSpec(row, qmap)],
        out_specs=pl.BlockSpec(blk, qmap), scratch_shapes=[pltpu.VMEM((st.bs, D), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st), grid_spec=spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params("parallel", "parallel", "arbitrary"), interpret=st.interpret,
        name="topk_block_sparse_dq",
    )(ids.reshape(-1), cnt.reshape(-1), vc.reshape(-1), q, k, v, do, lse, delta)


def pair_lists(ids, cnt, nk: int):
    """(pkv, pq) (G, nq * topk + nk) int32: (kv block, q block) pairs sorted by kv block, then q block; each kv
    block starts with an empty pair; unlisted slots trail as empty pairs of kv block nk - 1.

    ``pq = 2 * q + real``: ``real`` says whether the step computes; an empty step's ``q`` is the next real step's
    (else the previous one's), so it fetches the query block a neighbouring step needs anyway (no extra DMA)."""
    G, nq, T = ids.shape
    listed = jnp.arange(T) < cnt[..., None]
    real = jnp.where(listed, ids * (nq + 1) + jnp.arange(nq)[:, None] + 1, nk * (nq + 1)).reshape(G, nq * T)
    empty = jnp.broadcast_to(jnp.arange(nk) * (nq + 1), (G, nk))
    keys = jnp.sort(jnp.concatenate([empty, real], axis=-1), axis=-1)
    pkv = jnp.minimum(keys // (nq + 1), nk - 1)
    computes = (keys < nk * (nq + 1)) & (keys % (nq + 1) > 0)
    q = keys % (nq + 1) - 1
    S = keys.shape[-1]
    pos = jnp.arange(S)
    nxt = lax.cummin(jnp.where(computes, pos, S), axis=1, reverse=True)
    prv = lax.cummax(jnp.where(computes, pos, -1), axis=1)
    src = jnp.where(nxt < S, nxt, jnp.maximum(prv, 0))
    fetch = jnp.where(computes, q, jnp.take_along_axis(q, src, axis=1))
    fetch = jnp.where((nxt < S) | (prv >= 0), fetch, 0)  # a head that lists nothing fetches block 0
    return pkv.astype(jnp.int32), (2 * fetch + computes).astype(jnp.int32)


def _dkv_call(q, k, v, do, lse, delta, ids, cnt, vc, st: _Static, out_dtype=None):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    G, L, D = q.shape
    pkv, pq = pair_lists(ids, cnt, st.nk)
    S = pkv.shape[1]
    blk, row = (None, st.bs, D), (None, st.bs, 1)
    qmap = lambda g, s, pkv, pq, vc: (g, lax.shift_right_logical(pq[g * S + s], 1), 0)  # noqa: E731
    kmap = lambda g, s, pkv, pq, vc: (g, pkv[g * S + s], 0)  # noqa: E731
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(G, S),
        in_specs=[pl.BlockSpec(blk, qmap), pl.BlockSpec(blk, kmap), pl.BlockSpec(blk, kmap),
                  pl.BlockSpec(blk, qmap), pl.BlockSpec(row, qmap), pl.BlockSpec(row, qmap)],
        out_specs=[pl.BlockSpec(blk, kmap), pl.BlockSpec(blk, kmap)],
        scratch_shapes=[pltpu.VMEM((st.bs, D), jnp.float32), pltpu.VMEM((st.bs, D), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st), grid_spec=spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, out_dtype or k.dtype), jax.ShapeDtypeStruct(v.shape, out_dtype or v.dtype)],
        compiler_params=_params("parallel", "arbitrary"), interpret=st.interpret, name="topk_block_sparse_dkv",
    )(pkv.reshape(-1), pq.reshape(-1), vc.reshape(-1), q, k, v, do, lse, delta)


# ----------------------------------------------------------------------------------------------------------
# Chunking (heads; query blocks when one head's tables exceed the SMEM budget) and the custom VJP
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the heads and query blocks are split into pallas_calls: ``group`` heads per call (a divisor of the
    head count), or, when one head's tables do not fit, one head per call and its query blocks in ``chunks``
    chunks of ``q_blocks`` (the query side zero-padded to ``chunks * q_blocks`` blocks that list nothing)."""

    group: int
    q_blocks: int
    chunks: int


def _words(q_blocks: int, nk: int, topk: int) -> int:
    """SMEM words of one head's call tables: the dK/dV pair list (2 x (q_blocks * topk + nk)) plus valid counts."""
    return 2 * (q_blocks * topk + nk) + nk


def plan(heads: int, nb: int, topk: int, budget: int | None = None) -> Plan | None:
    """The split that keeps every call's tables within ``budget`` (default ``SMEM_TABLE_WORDS``), None if even
    one query block's tables do not fit."""
    budget = SMEM_TABLE_WORDS if budget is None else budget
    per_head = _words(nb, nb, topk)
    if per_head <= budget:
        group = max(g for g in range(1, heads + 1) if heads % g == 0 and g * per_head <= budget)
        return Plan(group, nb, 1)
    fit = (budget - 3 * nb) // (2 * topk)
    if fit < 1:
        return None
    chunks = -(-nb // fit)
    return Plan(1, -(-nb // chunks), chunks)


def _per_group(fn, group: int, *arrays):
    """Run ``fn`` on groups of ``group`` heads (leading axis) with a lax.map; outputs re-joined."""
    H = arrays[0].shape[0]
    if group == H:
        return fn(*arrays)
    split = [a.reshape(H // group, group, *a.shape[1:]) for a in arrays]
    out = lax.map(lambda xs: fn(*xs), tuple(split))
    return jax.tree.map(lambda o: o.reshape(H, *o.shape[2:]), out)


def _q_chunks(x, chunks: int):
    """(1, chunks * n, ...) -> (chunks, 1, n, ...): one head's query-side array split into its chunks."""
    return x.reshape(chunks, 1, x.shape[1] // chunks, *x.shape[2:])


def _unchunk(x):
    return x.reshape(1, x.shape[0] * x.shape[2], *x.shape[3:])


def _fwd_group(q, k, v, ids, cnt, vc, st: _Static):
    if st.chunks == 1:
        return tuple(_fwd_call(q, k, v, ids, cnt, vc, st))
    xs = tuple(_q_chunks(a, st.chunks) for a in (q, ids, cnt))
    out, lse = lax.map(lambda a: tuple(_fwd_call(a[0], k, v, a[1], a[2], vc, st)), xs)
    return _unchunk(out), _unchunk(lse)


def _bwd_group(q, k, v, do, lse, delta, ids, cnt, vc, st: _Static):
    if st.chunks == 1:
        dq = _dq_call(q, k, v, do, lse, delta, ids, cnt, vc, st)
        return (dq, *_dkv_call(q, k, v, do, lse, delta, ids, cnt, vc, st))
    xs = tuple(_q_chunks(a, st.chunks) for a in (q, do, lse, delta, ids, cnt))

    def step(acc, a):  # partial dK/dV of one query chunk, summed in fp32
        qc, doc, lsec, dc, idc, cc = a
        dq = _dq_call(qc, k, v, doc, lsec, dc, idc, cc, vc, st)
        dk, dv = _dkv_call(qc, k, v, doc, lsec, dc, idc, cc, vc, st, jnp.float32)
        return (acc[0] + dk, acc[1] + dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = lax.scan(step, (zeros, zeros), xs)
    return _unchunk(dq), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, ids, cnt, vc, st: _Static):
    return _per_group(lambda *a: _fwd_group(*a, st), st.group, q, k, v, ids, cnt, vc)[0]


def _core_fwd(q, k, v, ids, cnt, vc, st):
    out, lse = _per_group(lambda *a: _fwd_group(*a, st), st.group, q, k, v, ids, cnt, vc)
    return out, (q, k, v, ids, cnt, vc, out, lse)


def _core_bwd(st, res, do):
    q, k, v, ids, cnt, vc, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    do = do.astype(q.dtype)
    dq, dk, dv = _per_group(lambda *a: _bwd_group(*a, st), st.group, q, k, v, do, lse, delta, ids, cnt, vc)
    return dq, dk, dv, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def topk_block_sparse_tpu(q, k, v, kv_block_indices, *, block_size: int = 64, kv_valid_blocks=None,
                          interpret: bool = False):
    """(B, L, N, D) attention of each query block over its listed KV blocks. Differentiable."""
    B, L, N, D = q.shape
    nb, topk = L // block_size, kv_block_indices.shape[-1]
    H = B * N
    split = plan(H, nb, topk)
    if split is None:
        raise ValueError(f"topk_block_sparse_tpu: one query block's tables ({_words(1, nb, topk)} words) exceed "
                         f"SMEM_TABLE_WORDS={SMEM_TABLE_WORDS}")
    ids, cnt = compact_kv_table(kv_block_indices, nb)
    ids, cnt = ids.reshape(H, nb, topk), cnt.reshape(H, nb)
    if kv_valid_blocks is None:
        vc = jnp.full((H, nb), block_size, jnp.int32)
    else:
        vc = jnp.broadcast_to(jnp.asarray(kv_valid_blocks, jnp.int32), (B, nb))
        vc = jnp.broadcast_to(vc[:, None], (B, N, nb)).reshape(H, nb)
    st = _Static(block_size, split.q_blocks, nb, topk, split.group, split.chunks, D ** -0.5,
                 kv_valid_blocks is not None, bool(interpret))

    def heads(x):  # (B, L, N, D) -> (B * N, L, D)
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(H, L, D)

    qh = heads(q)
    nq_pad = split.q_blocks * split.chunks
    if nq_pad != nb:  # padded query blocks list nothing: output 0, sliced off
        qh = jnp.pad(qh, ((0, 0), (0, (nq_pad - nb) * block_size), (0, 0)))
        ids = jnp.pad(ids, ((0, 0), (0, nq_pad - nb), (0, 0)))
        cnt = jnp.pad(cnt, ((0, 0), (0, nq_pad - nb)))
    out = _core(qh, heads(k), heads(v), ids, cnt, vc, st)[:, :L]
    return jnp.transpose(out.reshape(B, N, L, D), (0, 2, 1, 3))
