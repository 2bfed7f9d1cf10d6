"""Top-k block-sparse attention (VSA's fine stage): every implementation against a dense softmax under the token
mask built (in numpy, independently) from the same indices; duplicates / order / -1 entries, partially valid KV
blocks, gradients vs jax.grad of the dense masked formulation, and no retrace when traced indices change.

On CPU the Pallas kernels run in interpret mode; on a GPU (TPU) the GPU (TPU) kernel runs for real.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.attention import TritonConfig, triton_config_scope
from fastvideo_jax.attention import topk_block_sparse as tbs
from fastvideo_jax.attention import topk_block_sparse_tpu as tpu
from fastvideo_jax.attention.topk_block_sparse import (
    TopkBackend,
    compact_kv_table,
    topk_block_sparse_attention,
    transposed_q_table,
)
from fastvideo_jax.errors import UserError

PLATFORM = jax.devices()[0].platform
INTERPRET = {TopkBackend.REFERENCE: None, TopkBackend.PALLAS_GPU: PLATFORM != "gpu",
             TopkBackend.PALLAS_TPU: PLATFORM != "tpu"}
IMPLS = list(INTERPRET)


def dense_token_mask(idx, L, bs, valid_counts=None) -> np.ndarray:
    """(B, N, L, L) bool from the indices: set semantics, entries outside [0, nb) list nothing."""
    idx = np.asarray(idx)
    B, N, nb, _ = idx.shape
    blocks = np.zeros((B, N, nb, nb), bool)
    for b, h, i, t in np.ndindex(idx.shape):
        if 0 <= idx[b, h, i, t] < nb:
            blocks[b, h, i, idx[b, h, i, t]] = True
    mask = np.repeat(np.repeat(blocks, bs, axis=2), bs, axis=3)
    if valid_counts is not None:
        c = np.broadcast_to(np.asarray(valid_counts), (B, nb))
        tok = (np.arange(bs)[None, None, :] < c[..., None]).reshape(B, L)
        mask &= tok[:, None, None, :]
    return mask


def dense_masked_attention(q, k, v, mask):
    """Softmax over the masked keys; rows with no key give 0 (the documented convention)."""
    s = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(jnp.where(mask, s, -1e30), axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    return jnp.einsum("bnqk,bknd->bqnd", p, v.astype(jnp.float32)).astype(q.dtype)


def _inputs(B, L, N, D, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(kk, (B, L, N, D), jnp.float32).astype(dtype) for kk in ks)


def _random_indices(B, N, nb, topk, seed, dup=True, neg=True):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(nb)[:topk] for _ in range(B * N * nb)]).reshape(B, N, nb, topk)
    if dup:  # duplicates and -1 entries in some rows, any order
        idx[0, 0, 0, -1] = idx[0, 0, 0, 0]
        idx[-1, -1, 1, :] = idx[-1, -1, 1, 0]
    if neg:
        idx[0, -1, -1, 0] = -1
    return idx.astype(np.int32)


def _assert_close(actual, expected, what, tol=1e-5):
    err = float(jnp.max(jnp.abs(actual.astype(jnp.float32) - expected.astype(jnp.float32))))
    scale = max(1.0, float(jnp.max(jnp.abs(expected.astype(jnp.float32)))))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _run(impl, q, k, v, idx, bs, counts):
    return topk_block_sparse_attention(q, k, v, idx, block_size=bs, kv_valid_blocks=counts, backend=impl,
                                       interpret=INTERPRET[impl])


@pytest.mark.parametrize("impl", IMPLS, ids=lambda b: b.value)
@pytest.mark.parametrize("ragged", [False, True], ids=["full_blocks", "partial_blocks"])
def test_matches_dense_masked_softmax_forward_and_grads(impl, ragged):
    _check_against_dense(impl, ragged)


@pytest.mark.parametrize("budget,expected", [(30, tpu.Plan(group=1, q_blocks=2, chunks=3)),
                                             (90, tpu.Plan(group=2, q_blocks=5, chunks=1))],
                         ids=["query_chunks_padded", "head_groups"])
def test_tpu_kernel_splits_to_the_smem_budget(monkeypatch, budget, expected):
    """Tables over budget: heads grouped per call, or one head per call in padded query chunks (dK/dV summed)."""
    monkeypatch.setattr(tpu, "SMEM_TABLE_WORDS", budget)
    assert tpu.plan(4, 5, 3) == expected
    _check_against_dense(TopkBackend.PALLAS_TPU, ragged=True)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda b: b.value)
def test_bf16_matches_dense_within_4_eps(impl):
    """bf16 in and out, fp32 softmax and accumulation: within 4 bf16 eps of max|dense| (the shared suite's bound:
    only the output and the P cast before P @ V round differently; observed <= 0.85 eps)."""
    B, N, D, bs, nb, topk = 2, 2, 64, 16, 5, 3
    q, k, v, ct = _inputs(B, nb * bs, N, D, seed=7, dtype=jnp.bfloat16)
    idx = _random_indices(B, N, nb, topk, seed=1)
    counts = np.array([[16, 9, 16, 0, 5], [3, 16, 1, 16, 12]], np.int32)
    mask = jnp.asarray(dense_token_mask(idx, nb * bs, bs, counts))
    out, grads = _value_and_grads(lambda q, k, v: _run(impl, q, k, v, jnp.asarray(idx), bs, counts), q, k, v, ct)
    ref, ref_grads = _value_and_grads(lambda q, k, v: dense_masked_attention(q, k, v, mask), q, k, v, ct)
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        b = b.astype(jnp.float32)
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        assert err <= 4 * eps * float(jnp.max(jnp.abs(b))), f"{name}: {err:.3g}"


def test_gpu_kernel_backward_in_sub_blocks():
    """Backward blocks smaller than the top-k block: dQ and dK/dV walk two sub-blocks per listed block."""
    with triton_config_scope(TritonConfig(block_q_bwd=16, block_k_bwd=16, interpret=PLATFORM != "gpu")):
        _check_against_dense(TopkBackend.PALLAS_GPU, ragged=True, bs=32)


def _check_against_dense(impl, ragged, bs=16):
    B, N, D, nb, topk = 2, 2, 32, 5, 3
    L = nb * bs
    q, k, v, ct = _inputs(B, L, N, D, seed=int(ragged))
    idx = _random_indices(B, N, nb, topk, seed=1)
    counts = None
    if ragged:  # partial blocks anywhere (cube-major ragged grid), one empty block, one partial last block
        counts = np.array([[16, 9, 16, 0, 5], [3, 16, 1, 16, 12]], np.int32) * (bs // 16)
        idx[0, 1, 2, :] = 3  # a query block whose only block has no valid key: output 0, no gradient
    mask = dense_token_mask(idx, L, bs, counts)
    assert resolve(impl, q, bs) is impl

    out, grads = _value_and_grads(lambda q, k, v: _run(impl, q, k, v, jnp.asarray(idx), bs, counts), q, k, v, ct)
    ref, ref_grads = _value_and_grads(lambda q, k, v: dense_masked_attention(q, k, v, jnp.asarray(mask)), q, k, v, ct)
    _assert_close(out, ref, "forward")
    for name, g, gr in zip("qkv", grads, ref_grads):
        _assert_close(g, gr, f"d{name}")


def _value_and_grads(fn, q, k, v, ct):
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    return jax.jit(run)(q, k, v)


def resolve(impl, q, bs):
    return tbs.resolve_topk_backend(impl, q, bs, INTERPRET[impl])


@pytest.mark.parametrize("impl", IMPLS, ids=lambda b: b.value)
def test_duplicates_and_order_do_not_matter(impl):
    B, N, D, bs, nb = 1, 2, 16, 16, 4
    q, k, v, _ = _inputs(B, nb * bs, N, D, seed=3)
    base = np.array([[[[2, 0], [1, 3], [0, 1], [3, 2]]] * N], np.int32)  # (1, N, 4, 2)
    shuffled = np.concatenate([base[..., ::-1], base[..., :1], -np.ones_like(base[..., :1])], axis=-1)
    f = jax.jit(lambda idx: _run(impl, q, k, v, idx, bs, None))
    a, b = f(jnp.asarray(base)), f(jnp.asarray(shuffled))
    _assert_close(b, a, "reordered + duplicated + -1", tol=1e-6)


def test_tables():
    idx = jnp.array([[[[3, 1, 3, -1], [0, 0, 0, 0], [-1, -1, -1, -1]]]], jnp.int32)  # (1, 1, 3, 4), nb = 4
    ids, count = compact_kv_table(idx, 4)
    np.testing.assert_array_equal(count, [[[2, 1, 0]]])
    np.testing.assert_array_equal(ids, [[[[1, 3, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]]]])
    qt = transposed_q_table(ids, count, 4)
    np.testing.assert_array_equal(qt[0, 0, :, 0], [1, 1, 0, 1])  # kv block 0 <- q 1; 1 <- q 0; 3 <- q 0
    np.testing.assert_array_equal(qt[0, 0, [0, 1, 3], 1], [1, 0, 0])
    pkv, pq = tpu.pair_lists(ids[0], count[0], 4)  # TPU dK/dV steps: kv-sorted pairs, an empty step per kv block
    np.testing.assert_array_equal(pkv, [[0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(pq % 2, [[0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # computes
    np.testing.assert_array_equal(pq // 2, [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # q block fetched


@pytest.mark.parametrize("impl", IMPLS, ids=lambda b: b.value)
def test_jit_traced_indices_do_not_retrace(impl):
    B, N, D, bs, nb, topk = 1, 1, 16, 16, 4, 2
    q, k, v, _ = _inputs(B, nb * bs, N, D, seed=4)
    traces = []

    @jax.jit
    def f(q, k, v, idx):
        traces.append(1)
        return _run(impl, q, k, v, idx, bs, None)

    for seed in (5, 6):
        idx = _random_indices(B, N, nb, topk, seed, dup=False, neg=False)
        out = f(q, k, v, jnp.asarray(idx))
        ref = dense_masked_attention(q, k, v, jnp.asarray(dense_token_mask(idx, nb * bs, bs)))
        _assert_close(out, ref, f"indices seed {seed}")
    assert len(traces) == 1


def test_bad_inputs_raise_clear_errors():
    q = jnp.zeros((1, 64, 1, 8))
    idx = jnp.zeros((1, 1, 4, 2), jnp.int32)
    with pytest.raises(UserError, match="multiple of block_size"):
        topk_block_sparse_attention(q[:, :60], q[:, :60], q[:, :60], idx, block_size=16)
    with pytest.raises(UserError, match=r"\(B, N, L // block_size, topk\)"):
        topk_block_sparse_attention(q, q, q, idx[:, :, :3], block_size=16)
    with pytest.raises(UserError, match=r"\[-1, 4\)"):
        topk_block_sparse_attention(q, q, q, idx.at[0, 0, 0, 0].set(4), block_size=16)
    with pytest.raises(UserError, match="kv_valid_blocks"):
        topk_block_sparse_attention(q, q, q, idx, block_size=16, kv_valid_blocks=jnp.array([16, 16, 17, 1]))
    with pytest.raises(UserError, match="unknown backend"):
        topk_block_sparse_attention(q, q, q, idx, block_size=16, backend="dense")


def test_unavailable_kernel_falls_back_with_warning(caplog):
    tbs.warn_once.cache_clear()
    q = jnp.zeros((1, 32, 1, 8))
    other = TopkBackend.PALLAS_TPU if PLATFORM != "tpu" else TopkBackend.PALLAS_GPU
    with caplog.at_level("WARNING", logger="fastvideo_jax.attention"):
        assert tbs.resolve_topk_backend(other, q, 16, interpret=False) is TopkBackend.REFERENCE
    assert "falling back" in caplog.text


@pytest.mark.parametrize("impl,target,kernel", [(TopkBackend.PALLAS_GPU, "cuda", "__gpu$xla.gpu.triton"),
                                                (TopkBackend.PALLAS_TPU, "tpu", "tpu_custom_call")],
                         ids=["triton", "mosaic_tpu"])
def test_kernels_lower_for_their_hardware(monkeypatch, impl, target, kernel):
    """Forward + backward lower through the real (non-interpret) Pallas pipeline: fwd, dQ and dK/dV kernels."""
    monkeypatch.setattr(tbs, "platform", lambda: {"cuda": "gpu", "tpu": "tpu"}[target])
    x = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
    idx, counts = jnp.zeros((1, 2, 8, 3), jnp.int32), jnp.full((8,), 60, jnp.int32)

    def loss(q, k, v, idx, counts):
        out = topk_block_sparse_attention(q, k, v, idx, block_size=64, kv_valid_blocks=counts, backend=impl)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x, idx, counts).lower(
        lowering_platforms=(target,)).as_text()
    assert text.count(kernel) == 3
