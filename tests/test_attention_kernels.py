"""Attention kernels: the one shared suite. On CPU the Pallas kernels run in interpret mode (splash, Triton mha,
our block-sparse kernel); off Hopper the Mosaic-GPU *wrapper* runs around a jnp stand-in for the kernel
(monkeypatched here, ids ``mosaic_wrapper_jnp_stand_in``: they test padding, masking, the lse correction and the
dtype policy, never the kernel). On a GPU the Triton kernels (and on Hopper the Mosaic kernel) run for real, on
a TPU splash does. Also sliding-tile attention against a dense
oracle, and the dispatch fallbacks.

Tolerances are relative to max|reference| and scaled by the dtype's machine epsilon:
* fp32: 64 eps. Kernels and reference compute the same sums in fp32 in a different order (online softmax,
  blocked accumulation over <= 1000 keys); observed <= 10 eps.
* bf16/fp16: 4 eps. Both sides see the same low-precision inputs and accumulate in fp32; what differs is the
  rounding of the output and of the probabilities cast to the input dtype before P @ V (each <= 0.5 ulp), so
  the error is O(1) eps of max|out|; observed <= 1.02 eps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.attention import (
    FULL_WINDOW,
    AttentionBackend,
    MosaicConfig,
    SplashConfig,
    TritonConfig,
    attention,
    load_mask_strategy,
    mosaic_config_scope,
    reference_attention,
    resolve_backend,
    sliding_tile_attention,
    splash_config_scope,
    sta_reference_dense,
    triton_config_scope,
)
from fastvideo_jax.attention import block_sparse_gpu, pallas_gpu, sliding_tile, splash_tpu, tokamax_dpa
from fastvideo_jax.attention._gpu_common import LOG2E
from fastvideo_jax.attention.sliding_tile_mask import (
    TileGeometry,
    _window_1d,
    slot_valid,
    sta_block_mask,
    sta_block_tables,
    tile_permutation,
    unit_mask,
    window_tiles,
)
from fastvideo_jax.attention.sliding_tile_splash_mask import make_splash_sta_mask

PLATFORM = jax.devices()[0].platform
ON_HOPPER = PLATFORM == "gpu" and str(getattr(jax.devices()[0], "compute_capability", "")) == "9.0"
# Real kernels where the hardware exists, interpret mode / emulation elsewhere.
SPLASH_CPU = SplashConfig(block_q=256, block_kv=256, interpret=PLATFORM != "tpu")
TRITON_CPU = TritonConfig(interpret=PLATFORM != "gpu")
# 16-token blocks: tile slots (32 tokens for 2x4x4 tiles) span two blocks, so ragged grids produce
# padding-only blocks that the block tables prune.
TRITON_STA_CPU = TritonConfig(block_q=16, block_k=16, interpret=PLATFORM != "gpu")
MOSAIC = MosaicConfig()
# What the Mosaic cases test here: the kernel on Hopper, only our wrapper around a jnp stand-in elsewhere.
MOSAIC_ID = "pallas_gpu_mosaic" if ON_HOPPER else "mosaic_wrapper_jnp_stand_in"


def _stand_in_mgpu_fwd(q, k, v, config):
    """jnp model of ``attention_mgpu.attention(..., save_residuals=True)``: no scale, lse in log2 units."""
    s = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=jnp.float32)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    out = jnp.einsum("bnqk,bkne->bqne", (p / l).astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = (m * LOG2E + jnp.log2(l))[..., 0]
    return out.astype(q.dtype), lse


def _stand_in_mgpu_bwd(config, res, do):
    """jnp model of ``attention_mgpu._attention_bwd``: p = 2^(s log2e - lse), delta = rowsum(out * do)."""
    q, k, v, out, lse = res
    f32 = jnp.float32
    s = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=f32) * LOG2E
    p = jnp.exp2(s - lse[..., None])
    delta = jnp.einsum("bqne,bqne->bnq", out.astype(f32), do.astype(f32))
    dp = jnp.einsum("bqne,bkne->bnqk", do, v, preferred_element_type=f32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bnqk,bkne->bqne", ds.astype(k.dtype), k, preferred_element_type=f32)
    dk = jnp.einsum("bnqk,bqne->bkne", ds.astype(q.dtype), q, preferred_element_type=f32)
    dv = jnp.einsum("bnqk,bqne->bkne", p.astype(do.dtype), do, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@contextlib.contextmanager
def mosaic_kernel_or_stand_in(config: MosaicConfig = MOSAIC):
    """The real kernel on Hopper; elsewhere the jnp stand-in patched in for the kernel calls only."""
    with contextlib.ExitStack() as stack:
        if not ON_HOPPER:
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(pallas_gpu, "_mosaic_unavailable", lambda: None)
            mp.setattr(pallas_gpu, "_mosaic_fwd_raw", _stand_in_mgpu_fwd)
            mp.setattr(pallas_gpu, "_mosaic_bwd_raw", _stand_in_mgpu_bwd)
        stack.enter_context(mosaic_config_scope(config))
        yield

TOL_EPS = {jnp.float32: 64.0, jnp.bfloat16: 4.0, jnp.float16: 4.0}


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def assert_close(actual, expected, dtype, what=""):
    a, e = _f32(actual), _f32(expected)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    scale = max(float(np.abs(e).max()), 1e-6)
    err = float(np.abs(a - e).max()) / scale
    tol = TOL_EPS[jnp.dtype(dtype).type] * float(jnp.finfo(dtype).eps)
    assert err <= tol, f"{what}: max error {err:.3g} x max|ref| > {tol:.3g}"


def _inputs(B, L, N, E, dtype, seed, lk=None):
    ks = jax.random.split(jax.random.key(seed), 4)
    lk = L if lk is None else lk
    q = jax.random.normal(ks[0], (B, L, N, E), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, lk, N, E), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, lk, N, E), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (B, L, N, E), jnp.float32)
    return q, k, v, ct


def _value_and_grads(fn, q, k, v, ct):
    """Output and (dq, dk, dv) of sum(out * ct) from one jitted vjp (one compile for both)."""
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    return jax.jit(run)(q, k, v)


def _kv_mask(B, L, seed):
    m = jax.random.uniform(jax.random.key(seed + 99), (B, L)) > 0.3
    return m.at[:, 0].set(True)  # at least one valid key per example


# ----------------------------------------------------------------------------------------------------------
# Dense backends vs the reference: forward and gradients
# ----------------------------------------------------------------------------------------------------------

def tokamax_or_skip():
    """tokamax where it is installed and has hardware to run on (no stand-in: its 'xla' path is not a kernel)."""
    reason = tokamax_dpa.check_tokamax(*(jnp.zeros((1, 8, 1, 8), jnp.bfloat16),) * 3)
    if reason is not None:
        pytest.skip(f"tokamax: {reason}")
    return contextlib.nullcontext()


BACKENDS = {
    AttentionBackend.SPLASH_TPU: lambda: splash_config_scope(SPLASH_CPU),
    AttentionBackend.PALLAS_GPU_TRITON: lambda: triton_config_scope(TRITON_CPU),
    AttentionBackend.PALLAS_GPU_MOSAIC: mosaic_kernel_or_stand_in,
    AttentionBackend.TOKAMAX: tokamax_or_skip,
}


def _backend_id(b):
    return MOSAIC_ID if b is AttentionBackend.PALLAS_GPU_MOSAIC else b.value

# (length, head dim, dtype, key mask): odd lengths, both head dims, both precisions, with and without padding masks.
CASES = [
    (200, 64, jnp.float32, False),
    (1000, 128, jnp.bfloat16, True),
    (200, 128, jnp.float32, True),
    (1000, 64, jnp.bfloat16, False),
]


@pytest.mark.parametrize("backend", list(BACKENDS), ids=_backend_id)
@pytest.mark.parametrize("L,E,dtype,masked", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_dense_backend_matches_reference(backend, L, E, dtype, masked):
    if backend is AttentionBackend.PALLAS_GPU_MOSAIC and dtype == jnp.float32:
        dtype = jnp.float16  # fp16/bf16-only kernel; fp32 is refused (see test_mosaic_refuses_fp32)
    B, N = 2, 2
    q, k, v, ct = _inputs(B, L, N, E, dtype, seed=L + E)
    kv_mask = _kv_mask(B, L, L) if masked else None

    with BACKENDS[backend]():
        assert resolve_backend(backend, q, k, v, kv_mask) is backend
        out, grads = _value_and_grads(lambda q, k, v: attention(q, k, v, kv_mask, backend=backend), q, k, v, ct)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, kv_mask), q, k, v, ct)
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype, "forward")
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert_close(g, gr, dtype, f"d{name}")


def test_triton_cross_lengths_and_mosaic_mostly_masked_keys():
    """Lq != Lk runs on the block-sparse kernel; Mosaic's lse correction holds with 90% of keys masked (the
    wrapper around the jnp stand-in off Hopper)."""
    q, k, v, _ = _inputs(1, 100, 2, 64, jnp.float32, seed=5, lk=300)
    mask = jnp.arange(300)[None] < 250
    out = pallas_gpu.triton_attention(q, k, v, mask, config=TRITON_CPU)
    assert_close(out, reference_attention(q, k, v, mask), jnp.float32, "triton cross")
    qh, kh, vh = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mask = jnp.arange(300)[None] < 30
    with mosaic_kernel_or_stand_in():
        out = pallas_gpu.mosaic_attention(qh, kh, vh, mask, config=MOSAIC)
    assert_close(out, reference_attention(qh, kh, vh, mask), jnp.bfloat16, "mosaic masked")


def test_splash_head_sharded_one_device_mesh():
    from fastvideo_jax.parallel.mesh import make_mesh

    q, k, v, _ = _inputs(2, 130, 2, 64, jnp.float32, seed=3)
    out = splash_tpu.splash_attention(q, k, v, config=SPLASH_CPU, mesh=make_mesh())
    assert_close(out, reference_attention(q, k, v), jnp.float32, "splash shard_map")


@pytest.mark.skipif(os.environ.get("FASTVIDEO_SKIP_SUBPROCESS") == "1", reason="subprocess tests disabled")
def test_splash_heads_sharded_over_two_devices():
    """Heads split over a 2-device 'tensor' axis (fake CPU devices need a fresh process): dense splash, and STA
    whose two head shards carry different windows (each device picks its head grouping with lax.switch)."""
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp
        from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
        from fastvideo_jax.attention import (AttentionBackend, SplashConfig, reference_attention,
                                             sliding_tile_attention, sta_reference_dense)
        from fastvideo_jax.attention.splash_tpu import splash_attention
        mesh = make_mesh(MeshConfig(tensor=2))
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(s, (1, 136, 4, 64)) for s in ks)
        m = jnp.arange(136)[None] < 120
        out = jax.jit(lambda q, k, v: splash_attention(q, k, v, m, config=SplashConfig(128, 128, interpret=True),
                                                       mesh=mesh))(q, k, v)
        err = float(jnp.abs(out - reference_attention(q, k, v, m)).max())
        assert err < 1e-5, err
        grid, tile, wins = (2, 8, 8), (1, 4, 4), ((1, 1, 1), (1, 1, 1), (3, 3, 3), (1, 1, 3))
        q, k, v = (jax.random.normal(s, (2, 128, 4, 32)) for s in ks)
        kw = dict(grid=grid, tile=tile, window=wins)
        out = jax.jit(lambda q, k, v: sliding_tile_attention(
            q, k, v, backend=AttentionBackend.SPLASH_TPU, splash_config=SplashConfig(128, 128, interpret=True),
            mesh=mesh, **kw))(q, k, v)
        err2 = float(jnp.abs(out - sta_reference_dense(q, k, v, **kw)).max())
        assert err2 < 1e-5, err2
        print("ok", err, err2)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Dispatch: fallbacks and clear errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [AttentionBackend.SPLASH_TPU, AttentionBackend.PALLAS_GPU_TRITON,
                                     AttentionBackend.PALLAS_GPU_MOSAIC, AttentionBackend.CUDNN],
                         ids=lambda b: b.value)
def test_missing_backend_falls_back_with_warning(backend, caplog):
    if jax.devices()[0].platform != "cpu":
        pytest.skip("fallback test assumes a CPU-only host")
    q, k, v, _ = _inputs(1, 40, 2, 64, jnp.bfloat16, seed=1)
    with caplog.at_level(logging.WARNING):
        assert resolve_backend(backend, q, k, v) is AttentionBackend.REFERENCE
        out = attention(q, k, v, backend=backend)
    assert f"attention backend {backend.value} cannot run this call" in caplog.text
    assert "falling back to reference" in caplog.text
    assert_close(out, reference_attention(q, k, v), jnp.bfloat16, "fallback")


def test_mosaic_refuses_fp32_and_bf16_without_fp16_compute():
    q, k, v, _ = _inputs(1, 64, 1, 64, jnp.float32, seed=2)
    qb = q.astype(jnp.bfloat16)
    cfg = MosaicConfig(allow_fp16_compute=False)
    with mosaic_kernel_or_stand_in():
        assert "fp16/bf16" in pallas_gpu.check_mosaic(q, k, v, config=MOSAIC)
        assert "allow_fp16_compute" in pallas_gpu.check_mosaic(qb, qb, qb, config=cfg)
        with pytest.raises(ValueError, match="fp16/bf16"):
            pallas_gpu.mosaic_attention(q, k, v, config=MOSAIC)


def test_sta_unsupported_backend_falls_back(caplog):
    q, k, v, _ = _inputs(1, 2 * 4 * 4, 1, 16, jnp.float32, seed=4)
    with caplog.at_level(logging.WARNING):
        out = sliding_tile_attention(q, k, v, grid=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1),
                                     backend=AttentionBackend.CUDNN)
    assert "sliding-tile attention on cudnn cannot run this call" in caplog.text
    ref = sta_reference_dense(q, k, v, grid=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1))
    assert_close(out, ref, jnp.float32, "sta fallback")


def test_impossible_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 128"):
        SplashConfig(block_kv=192)
    with pytest.raises(ValueError, match="multiple of 8"):
        SplashConfig(block_q=100)
    with pytest.raises(ValueError, match="block_kv_compute"):
        SplashConfig(block_kv=256, block_kv_compute=384)
    cfg = SplashConfig(block_q=512, block_kv=512, pad_multiple=128, interpret=True)
    with pytest.raises(ValueError, match="does not divide the padded q length 256"):
        cfg.validate(*cfg.padded_lengths(200, 200), 128)
    q, k, v, _ = _inputs(1, 200, 1, 64, jnp.float32, seed=0)
    assert "does not divide" in splash_tpu.check_splash(q, k, v, config=cfg)
    with pytest.raises(ValueError, match="head dim 264"):
        SplashConfig(interpret=True).validate(512, 512, 264)
    with pytest.raises(ValueError, match="power of two"):
        TritonConfig(block_q=96)
    with pytest.raises(ValueError, match="multiple of 64"):
        MosaicConfig(block_q=32)
    with pytest.raises(ValueError, match="multiples of blocks"):
        block_sparse_gpu.block_sparse_attention(q, k, v, None, sta_block_tables(
            TileGeometry((1, 8, 8), (1, 4, 4), 0, 16), ((1, 1, 1),), 16, 16), config=TRITON_CPU)
    with pytest.raises(ValueError, match="T\\*H\\*W"):
        sliding_tile_attention(q, k, v, grid=(2, 10, 11), window=(1, 1, 1))
    with pytest.raises(ValueError, match="per-head windows"):
        sliding_tile_attention(q, k, v, grid=(2, 10, 10), window=[(1, 1, 1), (3, 3, 3)])
    with pytest.raises(ValueError, match="unknown attention backend"):
        AttentionBackend.parse("flash3")


# ----------------------------------------------------------------------------------------------------------
# Sliding-tile attention
# ----------------------------------------------------------------------------------------------------------

GEOMETRIES = [  # (grid, tile, text_len, align)
    ((4, 8, 8), (2, 4, 4), 0, 1),  # tile multiple
    ((5, 6, 7), (2, 4, 4), 9, 32),  # not a tile multiple, text, slot padding
    ((3, 9, 10), (6, 8, 8), 0, 128),  # FastVideo tile, one partial tile along t
]


@pytest.mark.parametrize("grid,tile,text_len,align", GEOMETRIES)
def test_tile_permutation_round_trip(grid, tile, text_len, align):
    geom = TileGeometry(grid, tile, text_len, align)
    perm, inv = tile_permutation(geom)
    assert perm.shape == (geom.padded_len,) and inv.shape == (geom.seq_len,)
    np.testing.assert_array_equal(perm[inv], np.arange(geom.seq_len))
    assert np.array_equal(np.sort(perm[perm >= 0]), np.arange(geom.seq_len))
    x = jax.random.normal(jax.random.key(0), (2, geom.seq_len, 3))
    xt = sliding_tile.to_tile_major(x, geom)
    expected = jnp.where((perm >= 0)[None, :, None], x[:, np.maximum(perm, 0)], 0)
    np.testing.assert_array_equal(np.asarray(xt), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(sliding_tile.from_tile_major(xt, geom)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(xt[:, inv]), np.asarray(x))


def test_window_semantics_match_fastvideo():
    # n=5 tiles, window 3: centre clamped to [1, 3] -> every query tile sees 3 tiles.
    w = _window_1d(5, 3)
    assert w[0].nonzero()[0].tolist() == [0, 1, 2] and w[4].nonzero()[0].tolist() == [2, 3, 4]
    assert w[2].nonzero()[0].tolist() == [1, 2, 3] and (w.sum(1) == 3).all()
    assert (_window_1d(10, 2).sum(1) == 3).all()  # even windows cover w + 1 tiles, as in FastVideo
    assert _window_1d(10, 10).all() and _window_1d(4, 100).all()
    geom = TileGeometry((12, 16, 16), (6, 8, 8))
    assert window_tiles(geom, (1, 1, 1)) == 1 and window_tiles(geom, FULL_WINDOW) == geom.num_tiles


def test_block_tables_list_only_nonempty_blocks():
    geom = TileGeometry((6, 12, 12), (2, 4, 4), text_len=20, align=32)
    windows = ((1, 1, 1), (3, 1, 3))
    block = sta_block_mask(geom, windows, 16, 32)
    tables = sta_block_tables(geom, windows, 16, 32)
    for h in range(2):
        for i in range(block.shape[1]):
            n = tables.kv[h, i, 0]
            assert sorted(tables.kv[h, i, 1:1 + n].tolist()) == np.nonzero(block[h, i])[0].tolist()
        for j in range(block.shape[2]):
            n = tables.q[h, j, 0]
            assert sorted(tables.q[h, j, 1:1 + n].tolist()) == np.nonzero(block[h, :, j])[0].tolist()
    assert tables.kv_blocks_visited() < block.size  # genuinely sparse
    # Padding-only blocks are pruned: (2,4,4) tiles over a 3-frame grid leave the second frame of the last
    # tile row empty, i.e. whole 16-token blocks of padding.
    ragged = TileGeometry((3, 8, 8), (2, 4, 4), align=16)
    pruned = sta_block_mask(ragged, ((3, 3, 3),), 16, 16, prune_padding=True)
    full = sta_block_mask(ragged, ((3, 3, 3),), 16, 16)
    empty = ~slot_valid(ragged).reshape(-1, 16).any(-1)
    assert empty.any() and not pruned[0, empty].any() and not pruned[0][:, empty].any()
    assert (pruned[0][~empty][:, ~empty] == full[0][~empty][:, ~empty]).all()
    # The lazy splash mask agrees with the unit mask on arbitrary (also tile-straddling) slices.
    mask = make_splash_sta_mask(geom, windows[1])
    units = unit_mask(geom, windows[1])
    uid = np.where(np.arange(geom.padded_len) < geom.padded_video_len,
                   np.arange(geom.padded_len) // geom.slot, geom.num_tiles)
    for a, b, c, d in [(0, 32, 0, 32), (10, 100, 50, 300), (geom.padded_video_len - 5, geom.padded_len, 0, 64)]:
        np.testing.assert_array_equal(mask[a:b, c:d], units[np.ix_(uid[a:b], uid[c:d])])


STA_CASES = [  # (grid, tile, windows, text_len, text mask)
    ((4, 8, 8), (2, 4, 4), (1, 3, 1), 0, False),
    ((5, 6, 7), (2, 4, 4), ((1, 1, 1), (3, 3, 3), (2, 1, 5)), 9, True),
    ((3, 9, 10), (2, 4, 4), ((3, 1, 1), (1, 2, 3), (1, 1, 1)), 0, False),
]
STA_BACKENDS = {
    AttentionBackend.REFERENCE: {},
    AttentionBackend.PALLAS_GPU_TRITON: {"triton_config": TRITON_STA_CPU},
    AttentionBackend.SPLASH_TPU: {"splash_config": None},  # default STA blocks: one tile slot, interpret mode
}


def _sta_inputs(grid, text_len, text_masked, N, E=32, seed=0, dtype=jnp.float32):
    L = int(np.prod(grid)) + text_len
    q, k, v, ct = _inputs(2, L, N, E, dtype, seed=seed)
    tm = None
    if text_masked:
        tm = jnp.arange(text_len)[None] < jnp.array([[text_len - 3], [text_len]])
    return q, k, v, ct, tm


@pytest.mark.parametrize("backend", list(STA_BACKENDS), ids=lambda b: b.value)
@pytest.mark.parametrize("grid,tile,windows,text_len,text_masked", STA_CASES, ids=["multiple", "text", "ragged"])
def test_sta_matches_dense_token_mask(backend, grid, tile, windows, text_len, text_masked):
    N = 3 if isinstance(windows[0], tuple) else 2
    q, k, v, _, tm = _sta_inputs(grid, text_len, text_masked, N, seed=len(grid) + text_len)
    kw = dict(grid=grid, tile=tile, window=windows, text_len=text_len, text_mask=tm)
    with splash_config_scope(SplashConfig(interpret=True)):
        assert sliding_tile.resolve_sta_backend(backend, q, k, v, **{k_: v_ for k_, v_ in
                                                                    STA_BACKENDS[backend].items()}) is backend
        out = sliding_tile_attention(q, k, v, backend=backend, **kw, **STA_BACKENDS[backend])
    assert_close(out, sta_reference_dense(q, k, v, **kw), jnp.float32, f"sta {backend.value}")


@pytest.mark.parametrize("backend", [AttentionBackend.PALLAS_GPU_TRITON, AttentionBackend.SPLASH_TPU],
                         ids=lambda b: b.value)
def test_sta_gradients_bf16(backend):
    grid, tile, windows, text_len = (3, 8, 6), (2, 4, 4), ((1, 1, 1), (3, 1, 2)), 7
    q, k, v, ct, tm = _sta_inputs(grid, text_len, True, 2, seed=7, dtype=jnp.bfloat16)
    kw = dict(grid=grid, tile=tile, window=windows, text_len=text_len, text_mask=tm)

    extra = {"triton_config": TritonConfig(block_q=32, block_k=32, interpret=PLATFORM != "gpu")}  # 32-token bwd blocks
    if backend is AttentionBackend.SPLASH_TPU:
        extra = STA_BACKENDS[backend]
    with splash_config_scope(SplashConfig(interpret=True)):
        fn = lambda q, k, v: sliding_tile_attention(q, k, v, backend=backend, **kw, **extra)
        out, grads = _value_and_grads(fn, q, k, v, ct)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: sta_reference_dense(q, k, v, **kw), q, k, v, ct)
    assert_close(out, ref_out, jnp.bfloat16, "forward")
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert_close(g, gr, jnp.bfloat16, f"d{name}")


def test_sta_full_window_equals_dense_attention():
    grid, tile, text_len = (3, 5, 6), (2, 4, 4), 5
    q, k, v, _, tm = _sta_inputs(grid, text_len, True, 2, seed=11)
    kv_mask = jnp.concatenate([jnp.ones((2, int(np.prod(grid))), bool), tm], axis=1)
    dense = reference_attention(q, k, v, kv_mask)
    out = sliding_tile_attention(q, k, v, grid=grid, tile=tile, window=FULL_WINDOW, text_len=text_len,
                                 text_mask=tm, backend=AttentionBackend.PALLAS_GPU_TRITON,
                                 triton_config=TRITON_STA_CPU)
    assert_close(out, dense, jnp.float32, "full window")


def test_mask_strategy_json(tmp_path):
    raw = {f"{t}_{l}_{h}": [1 + h, 2, 3] for t in range(2) for l in range(3) for h in range(2)}
    path = tmp_path / "mask_strategy.json"
    path.write_text(json.dumps(raw))
    for source in (path, str(path), json.dumps(raw), raw):
        s = load_mask_strategy(source)
        assert (s.num_steps, s.num_layers, s.num_heads) == (2, 3, 2)
        assert s.windows(1, 2) == ((1, 2, 3), (2, 2, 3))
    assert len(s.layer_windows(0)) == 3
    with pytest.raises(KeyError, match="step 5"):
        s.windows(5, 0)
    with pytest.raises(ValueError, match="step_layer_head"):
        load_mask_strategy({"0_0": [1, 1, 1]})


# ----------------------------------------------------------------------------------------------------------
# Kernel configuration scopes are part of the jit cache key
# ----------------------------------------------------------------------------------------------------------


def test_triton_config_scope_change_retraces_a_jitted_caller(monkeypatch):
    """One jitted function called under two Triton configs runs the kernel with each config's blocks (not the
    blocks it was first compiled with), and a config seen before is a cache hit again."""
    used, real = [], pallas_gpu.dense_block_sparse_attention

    def spy(*args, config, **kwargs):
        used.append(config.block_q)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(pallas_gpu, "dense_block_sparse_attention", spy)
    q, k, v, _ = _inputs(1, 64, 1, 16, jnp.float32, seed=3)
    f = jax.jit(lambda q, k, v: attention(q, k, v, backend=AttentionBackend.PALLAS_GPU_TRITON))
    outs = []
    for block in (16, 32, 16):
        with triton_config_scope(TritonConfig(block_q=block, block_k=block, interpret=PLATFORM != "gpu")):
            outs.append(f(q, k, v))
    assert used == [16, 32]
    for out in outs:
        assert_close(out, reference_attention(q, k, v), jnp.float32, "triton")


def test_splash_config_scope_change_retraces_a_jitted_caller(monkeypatch):
    used, real = [], splash_tpu.splash_masked

    def spy(q, k, v, seg, masks, config, *rest):
        used.append(config.block_q)
        return real(q, k, v, seg, masks, config, *rest)

    monkeypatch.setattr(splash_tpu, "splash_masked", spy)
    q, k, v, _ = _inputs(1, 128, 1, 64, jnp.float32, seed=4)
    f = jax.jit(lambda q, k, v: attention(q, k, v, backend=AttentionBackend.SPLASH_TPU))
    for block in (128, 256):
        with splash_config_scope(SplashConfig(block_q=block, block_kv=128, interpret=PLATFORM != "tpu")):
            out = f(q, k, v)
    assert used == [128, 256]
    assert_close(out, reference_attention(q, k, v), jnp.float32, "splash")


@pytest.mark.parametrize("bwd_block", [64, 32], ids=["one_sub_block", "two_sub_blocks"])
def test_sta_triton_gradient_lowers_for_cuda(monkeypatch, bwd_block):
    """The block-sparse kernels' backward (dQ, dK/dV walking sub-blocks of table rows) lowers through Pallas
    Triton for real, not only in interpret mode (jnp's // and % on the loop index once failed to lower)."""
    monkeypatch.setattr(pallas_gpu, "platform", lambda: "gpu")
    monkeypatch.setattr(sliding_tile, "platform", lambda: "gpu")
    x = jnp.zeros((1, 4 * 8 * 8, 2, 128), jnp.bfloat16)
    config = TritonConfig(block_q=64, block_k=64, block_q_bwd=bwd_block, block_k_bwd=bwd_block)

    def loss(q, k, v):
        out = sliding_tile_attention(q, k, v, grid=(4, 8, 8), tile=(2, 4, 4), window=(1, 1, 1),
                                     backend=AttentionBackend.PALLAS_GPU_TRITON, triton_config=config)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
