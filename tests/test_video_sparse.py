"""Video sparse attention (VSA): the cube layout from token coordinates, top-k from sparsity as FastVideo computes
it, the selection vs a NumPy top-k of the coarse scores, the jnp reference vs a dense softmax under the token mask
of the same selection (fp32 <= 1e-5), its gradients vs jax.grad of that dense formulation, ragged grids, a
run-time (traced) sparsity that does not recompile, the fine stage on the Pallas kernels (interpret mode), and
FastVideo's own PyTorch VSA on the same inputs (tests/vsa_oracle.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.attention import AttentionBackend, resolve_backend
from fastvideo_jax.attention.video_sparse import video_sparse_attention, vsa_selection
from fastvideo_jax.attention.video_sparse_layout import cube_layout, topk_count, traced_topk_count
from tests.oracles import vsa_cube_ids, vsa_dense_oracle

EVEN, RAGGED = (4, 8, 8), (5, 6, 7)  # 8 whole cubes; 8 cubes with partial borders in every direction


def _inputs(grid, seed=0, B=2, N=2, E=8, gate=True):
    L = int(np.prod(grid))
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, g = (jax.random.normal(kk, (B, L, N, E), jnp.float32) for kk in keys)
    return q, k, v, (g if gate else None)


# ---- layout and top-k -------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [EVEN, RAGGED, (3, 9, 4)])
def test_cube_layout_from_coordinates(grid):
    """Every cube slot holds its cube's tokens (by coordinates) as a prefix, row-major; padding reads zero; the
    round trip is the identity."""
    layout = cube_layout(grid)
    cube = vsa_cube_ids(grid)
    np.testing.assert_array_equal(layout.sizes, np.bincount(cube))
    for c in range(layout.num_cubes):
        slot = layout.src[c * 64:(c + 1) * 64]
        n = layout.sizes[c]
        np.testing.assert_array_equal(slot[:n], np.nonzero(cube == c)[0])
        assert (slot[n:] == -1).all()
    x = jnp.arange(1, int(np.prod(grid)) + 1, dtype=jnp.float32)[None, :, None]
    tiled = layout.to_cubes(x)
    np.testing.assert_array_equal(np.asarray(tiled)[0, :, 0], np.where(layout.src >= 0, layout.src + 1, 0))
    np.testing.assert_array_equal(layout.from_cubes(tiled), x)


def test_topk_count_as_fastvideo():
    """clamp(ceil((1 - s) * cubes), 1, cubes), exact at multiples (FastVideo: (20, 28, 52) at 0.8 keeps 91 of 455)."""
    assert topk_count(0.8, 455) == 91
    assert topk_count(0.85, 20) == 3  # the float product gives 3.0000000000000004
    assert topk_count(0.0, 17) == 17 and topk_count(0.999, 17) == 1 and topk_count(0.5, 9) == 5
    with pytest.raises(ValueError, match="sparsity"):
        topk_count(1.0, 8)
    for C in (1, 8, 20, 455, 1440):
        for s in (0.0, 0.25, 0.5, 0.8, 0.85, 0.9, 0.95):
            assert int(traced_topk_count(jnp.float32(s), C, C)) == topk_count(s, C), (s, C)


def test_video_sparse_is_not_a_dense_backend():
    assert AttentionBackend.parse("video_sparse") is AttentionBackend.VIDEO_SPARSE_ATTN
    assert AttentionBackend.parse("VIDEO_SPARSE_ATTN") is AttentionBackend.VIDEO_SPARSE_ATTN
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="video_sparse_attention"):
        resolve_backend("video_sparse_attn", q, q, q)


# ---- selection, forward, backward -------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [EVEN, RAGGED])
def test_selection_is_numpy_topk_of_coarse_scores(grid):
    q, k, _, _ = _inputs(grid, seed=1)
    sel, count = vsa_selection(q, k, grid=grid, sparsity=0.6)
    cube = vsa_cube_ids(grid)
    C = cube.max() + 1
    assert count == topk_count(0.6, C) and sel.shape == (2, 2, C, count)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    qc = np.stack([qn[:, cube == c].mean(1) for c in range(C)], 1)  # (B, C, N, E)
    kc = np.stack([kn[:, cube == c].mean(1) for c in range(C)], 1)
    scores = np.einsum("bqne,bkne->bnqk", qc, kc)
    want = np.argsort(-scores, axis=-1, kind="stable")[..., :count]
    np.testing.assert_array_equal(np.asarray(sel), want)


@pytest.mark.parametrize("grid,sparsity", [(EVEN, 0.5), (EVEN, 0.0), (RAGGED, 0.6), (RAGGED, 0.9)])
def test_reference_equals_dense_under_the_selection_mask(grid, sparsity):
    q, k, v, g = _inputs(grid, seed=2)
    out = video_sparse_attention(q, k, v, g, grid=grid, sparsity=sparsity)
    sel, count = vsa_selection(q, k, grid=grid, sparsity=sparsity)
    want = vsa_dense_oracle(q, k, v, g, grid, sel, count)
    assert float(jnp.abs(out - want).max()) <= 1e-5
    if sparsity == 0.0:  # every cube kept: with a zero gate, exact dense attention
        s = jnp.einsum("bqne,bkne->bnqk", q, k) * q.shape[-1] ** -0.5
        dense = jnp.einsum("bnqk,bkne->bqne", jax.nn.softmax(s, axis=-1), v)
        fine = video_sparse_attention(q, k, v, jnp.zeros_like(g), grid=grid, sparsity=0.0)
        assert float(jnp.abs(fine - dense).max()) <= 1e-5


def test_gradients_equal_dense_formulation():
    grid = RAGGED
    q, k, v, g = _inputs(grid, seed=3)
    sel, count = vsa_selection(q, k, grid=grid, sparsity=0.7)
    w = jax.random.normal(jax.random.key(9), q.shape)

    def loss_vsa(q, k, v, g):
        return jnp.sum(video_sparse_attention(q, k, v, g, grid=grid, sparsity=0.7) * w)

    def loss_dense(q, k, v, g):
        return jnp.sum(vsa_dense_oracle(q, k, v, g, grid, sel, count) * w)

    got = jax.grad(loss_vsa, argnums=(0, 1, 2, 3))(q, k, v, g)
    want = jax.grad(loss_dense, argnums=(0, 1, 2, 3))(q, k, v, g)
    for name, a, b in zip("qkvg", got, want):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max())), name


def test_traced_sparsity_one_compile(count_compiles):
    """A run-time sparsity (max_topk = every cube) gives the static result at each value, compiled once."""
    grid = RAGGED
    q, k, v, g = _inputs(grid, seed=4)
    f = jax.jit(lambda s: video_sparse_attention(q, k, v, g, grid=grid, sparsity=s, max_topk=8))
    f(jnp.float32(0.5)).block_until_ready()
    with count_compiles() as n:
        for s in (0.3, 0.75, 0.9):
            want = video_sparse_attention(q, k, v, g, grid=grid, sparsity=s)
            got = f(jnp.float32(s))
            assert float(jnp.abs(got - want).max()) <= 1e-5, s
    assert f._cache_size() == 1
    with pytest.raises(ValueError, match="max_topk"):
        video_sparse_attention(q, k, v, g, grid=grid, sparsity=0.1, max_topk=4)


def test_bad_inputs_are_named():
    q, k, v, g = _inputs(EVEN)
    with pytest.raises(ValueError, match="T\\*H\\*W"):
        video_sparse_attention(q, k, v, g, grid=(4, 8, 4), sparsity=0.5)
    with pytest.raises(ValueError, match="gate"):
        video_sparse_attention(q, k, v, g[:, :8], grid=EVEN, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        video_sparse_attention(q, k, v, g, grid=EVEN, sparsity=-0.1)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_kernels_in_interpret_mode_equal_dense_under_the_selection_mask(backend):
    """The fine stage on the top-k block-sparse Pallas kernels (interpret mode), forward and gradients, against the
    same dense oracle (ragged grid: padded keys masked through the cube sizes)."""
    grid = RAGGED
    q, k, v, g = _inputs(grid, seed=5, B=1)
    sel, count = vsa_selection(q, k, grid=grid, sparsity=0.6)
    w = jax.random.normal(jax.random.key(8), q.shape)

    def loss(fn):
        return lambda q, k, v, g: jnp.sum(fn(q, k, v, g) * w)

    def kernel(q, k, v, g):
        return video_sparse_attention(q, k, v, g, grid=grid, sparsity=0.6, backend=backend, interpret=True)

    def dense(q, k, v, g):
        return vsa_dense_oracle(q, k, v, g, grid, sel, count)

    assert float(jnp.abs(kernel(q, k, v, g) - dense(q, k, v, g)).max()) <= 1e-5
    got = jax.grad(loss(kernel), argnums=(0, 1, 2, 3))(q, k, v, g)
    want = jax.grad(loss(dense), argnums=(0, 1, 2, 3))(q, k, v, g)
    for name, a, b in zip("qkvg", got, want):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max())), name


@pytest.mark.parametrize("grid,sparsity", [(EVEN, 0.5), (RAGGED, 0.6), ((6, 4, 9), 0.8)])
def test_equals_fastvideo_vsa(grid, sparsity):
    """FastVideo's own VSA (vsa 0.0.4's PyTorch video_sparse_attn on FastVideo 0.1.7's tiling; its GPU-only fine
    kernel replaced by dense PyTorch under the same block mask) on the same fp32 inputs, the same top-k."""
    import torch

    from tests.vsa_oracle import fastvideo_video_sparse_attention

    q, k, v, g = _inputs(grid, seed=6)
    topk = topk_count(sparsity, cube_layout(grid).num_cubes)
    want = fastvideo_video_sparse_attention(*(torch.from_numpy(np.array(x)) for x in (q, k, v, g)), grid, topk)
    got = video_sparse_attention(q, k, v, g, grid=grid, sparsity=sparsity)
    assert float(np.abs(np.asarray(got) - want.numpy()).max()) <= 1e-5
