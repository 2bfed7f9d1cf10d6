"""Attention dispatch: the reference is right, backends resolve by enum, fallback is logged, not an error."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fastvideo_jax.attention import AttentionBackend, attention, reference_attention, resolve_backend


def _qkv(seed, B=2, Lq=37, Lk=53, N=3, E=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, Lq, N, E), dtype)
    k = jax.random.normal(ks[1], (B, Lk, N, E), dtype)
    v = jax.random.normal(ks[2], (B, Lk, N, E), dtype)
    return q, k, v


def _torch_sdpa(q, k, v, mask=None):
    t = [torch.from_numpy(np.array(x)).permute(0, 2, 1, 3) for x in (q, k, v)]
    m = None if mask is None else torch.from_numpy(np.asarray(mask))[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=m)
    return out.permute(0, 2, 1, 3).numpy()


def test_reference_matches_torch_sdpa():
    q, k, v = _qkv(0)
    err = np.abs(np.asarray(reference_attention(q, k, v)) - _torch_sdpa(q, k, v)).max()
    assert err < 1e-5, f"max-abs {err:.3e}"


def test_reference_kv_mask_matches_torch():
    q, k, v = _qkv(1)
    mask = np.ones((2, 53), bool)
    mask[0, 40:] = False
    mask[1, ::3] = False
    err = np.abs(np.asarray(reference_attention(q, k, v, jnp.asarray(mask))) - _torch_sdpa(q, k, v, mask)).max()
    assert err < 1e-5, f"max-abs {err:.3e}"


def test_default_on_cpu_is_reference():
    q, k, v = _qkv(2)
    assert resolve_backend(None, q, k, v) is AttentionBackend.REFERENCE


def test_unavailable_backend_falls_back_with_warning(caplog):
    q, k, v = _qkv(3, dtype=jnp.bfloat16)
    with caplog.at_level(logging.WARNING):
        out = attention(q, k, v, backend=AttentionBackend.CUDNN)
        assert resolve_backend("cudnn", q, k, v) is AttentionBackend.REFERENCE
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference_attention(q, k, v)))
    assert "falling back to reference" in caplog.text


def test_unknown_backend_name_is_clear():
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="unknown attention backend 'flashy'"):
        attention(q, k, v, backend="flashy")


def test_shape_errors_are_clear():
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match="attention expects"):
        attention(q, k[:, :, :2], v)


@pytest.mark.parametrize("lq,lk,masked", [(200, 200, False), (37, 300, True), (129, 128, False), (256, 256, True)])
def test_cudnn_padding_and_masking_path(lq, lk, masked):
    """The cuDNN wrapper pads to a multiple of 128 and masks padded keys by length (plus the caller's prefix
    lengths); run the same path through XLA on CPU and compare with the reference under the equivalent mask."""
    from fastvideo_jax.attention.cudnn import cudnn_attention

    q, k, v = _qkv(6, Lq=lq, Lk=lk)
    lengths = mask = None
    if masked:
        lengths = jnp.array([lk, lk - 77])
        mask = jnp.arange(lk)[None, :] < lengths[:, None]
    ours = cudnn_attention(q, k, v, lengths, implementation="xla")
    ref = reference_attention(q, k, v, mask)
    assert ours.shape == ref.shape
    err = float(jnp.abs(ours - ref).max())
    assert err < 1e-5, f"max-abs {err:.3e}"


@pytest.fixture
def cudnn_through_xla(monkeypatch):
    """Dispatch as on a GPU, with the cuDNN backend running its wrapper through XLA (same padding/lengths)."""
    import functools

    from fastvideo_jax.attention import api
    from fastvideo_jax.attention.cudnn import cudnn_attention

    monkeypatch.setattr(api, "platform", lambda: "gpu")
    entry = api._BACKENDS[AttentionBackend.CUDNN]
    monkeypatch.setitem(api._BACKENDS, AttentionBackend.CUDNN, api._Backend(
        functools.partial(cudnn_attention, implementation="xla"), entry.check, entry.takes_lengths))


def test_cudnn_runs_prefix_masks_given_as_lengths_and_refuses_other_masks(cudnn_through_xla, caplog):
    q, k, v = _qkv(11, Lq=50, Lk=70, dtype=jnp.bfloat16)
    lengths = jnp.array([70, 23])
    prefix = jnp.arange(70)[None, :] < lengths[:, None]
    assert resolve_backend("cudnn", q, k, v) is AttentionBackend.CUDNN
    with caplog.at_level(logging.WARNING):
        out = jax.jit(lambda q, k, v, n: attention(q, k, v, kv_lengths=n, backend="cudnn"))(q, k, v, lengths)
    assert "falling back" not in caplog.text
    ref = reference_attention(q, k, v, prefix)
    out32, ref32 = out.astype(jnp.float32), ref.astype(jnp.float32)
    err = float(jnp.abs(out32 - ref32).max()) / float(jnp.abs(ref32).max())
    assert err <= 4 * float(jnp.finfo(jnp.bfloat16).eps), f"bf16 relative max error {err:.3e}"  # output roundings
    # Unrequested: the platform's first candidate (cuDNN) takes the lengths.
    assert resolve_backend(None, q, k, v) is AttentionBackend.CUDNN
    # A boolean mask, even a prefix one, is refused by cuDNN with the reason and runs on the reference.
    with caplog.at_level(logging.WARNING):
        masked = attention(q, k, v, prefix, backend="cudnn")
    assert "cuDNN masks keys by length only" in caplog.text and "pass kv_lengths" in caplog.text
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(ref))


def test_kv_lengths_become_a_prefix_mask_elsewhere_and_bad_masks_are_clear():
    q, k, v = _qkv(12)
    lengths = jnp.array([53, 9])
    prefix = jnp.arange(53)[None, :] < lengths[:, None]
    out = attention(q, k, v, kv_lengths=lengths, backend="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference_attention(q, k, v, prefix)))
    with pytest.raises(ValueError, match="kv_mask or kv_lengths, not both"):
        attention(q, k, v, prefix, kv_lengths=lengths)
    with pytest.raises(ValueError, match=r"kv_mask must be \(B, Lk\) = \(2, 53\)"):
        attention(q, k, v, prefix[:, :50])
    with pytest.raises(ValueError, match=r"kv_lengths must be \(B,\)"):
        attention(q, k, v, kv_lengths=jnp.array([53]))


def test_unrequested_backend_takes_the_platforms_first_capable(monkeypatch, caplog):
    """With no backend asked for, the platform's candidates are tried in order without a warning (here the
    GPU list on CPU: cuDNN cannot run, the Triton kernel in interpret mode can)."""
    from fastvideo_jax.attention import TritonConfig, api, triton_config_scope

    monkeypatch.setattr(api, "_PLATFORM_DEFAULTS", {"cpu": (AttentionBackend.CUDNN, AttentionBackend.PALLAS_GPU_TRITON)})
    q, k, v = _qkv(7)
    with caplog.at_level(logging.WARNING), triton_config_scope(TritonConfig(interpret=True)):
        assert resolve_backend(None, q, k, v) is AttentionBackend.PALLAS_GPU_TRITON
    assert "falling back" not in caplog.text
    with triton_config_scope(TritonConfig(interpret=False)):
        assert resolve_backend(None, q, k, v) is AttentionBackend.REFERENCE


def test_sliding_tile_is_not_a_dense_backend():
    """STA needs the token grid and windows: asking the dense op for it is a clear error, not a silent fallback,
    and it is no member of the dense backend enum."""
    q, k, v = _qkv(8)
    assert "sliding_tile" not in {b.value for b in AttentionBackend}
    with pytest.raises(ValueError, match="not a dense attention backend.*sliding_tile_attention"):
        attention(q, k, v, backend="sliding_tile")


def test_dense_kernels_do_not_import_the_sta_mask_module():
    """Shared helpers (round_up) live in attention/_common.py, not in the sliding-tile mask module."""
    import ast
    import importlib

    for name in ("api", "cudnn", "pallas_gpu", "splash_tpu", "reference", "_gpu_common"):
        mod = importlib.import_module(f"fastvideo_jax.attention.{name}")
        tree = ast.parse(open(mod.__file__).read())
        imported = set()
        for node in ast.walk(tree):  # "from a.b import c" counts as a.b and a.b.c; "import a.b" as a.b
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not any("sliding_tile" in m for m in imported), (name, imported)


# ----------------------------------------------------------------------------------------------------------
# Blocked (memory-safe) reference: same function as the dense one, no (Lq, Lk) logits
# ----------------------------------------------------------------------------------------------------------


def _value_and_grads(fn, q, k, v):
    ct = jax.random.normal(jax.random.PRNGKey(42), q.shape, jnp.float32)

    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)
    return jax.jit(run)(q, k, v)


@pytest.mark.parametrize("lq,lk,bq,bk,mask", [
    (300, 1100, 128, 256, None),  # remainders on both axes
    (96, 320, 32, 64, "mask"),  # exact multiples; example 0 an arbitrary key mask, example 1 no valid key at all
])
def test_blocked_reference_equals_dense(lq, lk, bq, bk, mask):
    from fastvideo_jax.attention import reference

    q, k, v = _qkv(9, Lq=lq, Lk=lk)
    kv_mask = None
    if mask:  # a query with no valid key averages every value, as the dense softmax over equal logits does
        kv_mask = jnp.stack([jax.random.uniform(jax.random.PRNGKey(1), (lk,)) > 0.4, jnp.zeros((lk,), bool)])
    dense = lambda q, k, v: reference._dense(q, k, v, kv_mask, q.shape[-1] ** -0.5)  # noqa: E731
    blocked = lambda q, k, v: reference_attention(q, k, v, kv_mask, block_q=bq, block_k=bk)  # noqa: E731
    out, grads = _value_and_grads(blocked, q, k, v)
    ref, ref_grads = _value_and_grads(dense, q, k, v)
    assert float(jnp.abs(out - ref).max()) < 1e-5
    for name, g, gr in zip("qkv", grads, ref_grads):
        err = float(jnp.abs(g - gr).max())
        assert err < 1e-5, f"d{name} max-abs {err:.3e}"


def _largest_intermediate(jaxpr) -> int:
    """Element count of the largest value any equation (also inside scan/map/checkpoint bodies) produces."""
    big = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            big = max(big, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
        for p in eqn.params.values():
            for j in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    big = max(big, _largest_intermediate(inner))
                elif hasattr(j, "eqns"):
                    big = max(big, _largest_intermediate(j))
    return big


def test_long_reference_never_holds_the_logits():
    """A long call (8192 tokens, 2 heads: 512 MiB of fp32 logits if dense) runs blocked by default: no value in
    its jaxpr, forward or backward, is larger than one q block's logits over all keys (the backward's residuals),
    and XLA's temporaries stay far below the logits."""
    from fastvideo_jax.attention import reference

    B, L, N, E = 1, 8192, 2, 32
    assert B * N * L * L > reference.DENSE_MAX_LOGITS
    spec = jax.ShapeDtypeStruct((B, L, N, E), jnp.float32)
    mask = jax.ShapeDtypeStruct((B, L), jnp.bool_)
    fwd = lambda q, k, v, m: reference_attention(q, k, v, m)  # noqa: E731
    grad = jax.grad(lambda q, k, v, m: reference_attention(q, k, v, m).sum(), argnums=(0, 1, 2))
    logits_bytes = B * N * L * L * 4
    for fn in (fwd, grad):
        jaxpr = jax.make_jaxpr(fn)(spec, spec, spec, mask).jaxpr
        assert _largest_intermediate(jaxpr) <= B * N * reference.BLOCK_Q * L < L * L, fn
        temp = jax.jit(fn).lower(spec, spec, spec, mask).compile().memory_analysis().temp_size_in_bytes
        assert temp < logits_bytes // 4, f"{temp / 2**20:.0f} MiB of temporaries"
    # The dense path really does hold them (the check above can fail).
    dense_jaxpr = jax.make_jaxpr(lambda q, k, v, m: reference._dense(q, k, v, m, 1.0))(spec, spec, spec, mask)
    assert _largest_intermediate(dense_jaxpr.jaxpr) >= B * N * L * L


def test_reference_switches_to_blocked_above_the_threshold_and_stays_exact():
    from fastvideo_jax.attention import reference

    L = 4100  # 1 x 1 x 4100^2 > 2^24 logits: blocked by default, with a 4-token last block
    q, k, v = _qkv(10, B=1, Lq=L, Lk=L, N=1, E=16)
    mask = jnp.arange(L)[None] < L - 300
    assert _largest_intermediate(jax.make_jaxpr(lambda q: reference_attention(q, k, v, mask))(q).jaxpr) < L * L
    out = jax.jit(lambda q, k, v: reference_attention(q, k, v, mask))(q, k, v)
    ref = jax.jit(lambda q, k, v: reference._dense(q, k, v, mask, 0.25))(q, k, v)
    assert float(jnp.abs(out - ref).max()) < 1e-5


def test_tokamax_wrapper_passes_mask_scale_and_implementation(monkeypatch):
    """The wrapper's own plumbing, with a recording stand-in for the tokamax package (which needs Python >= 3.12
    and a GPU/TPU; the shared kernel suite runs the real one there): the (B, Lk) key mask reaches tokamax as a
    (B, 1, 1, Lk) mask, the scale and the scoped implementation pass through, and the result is its output."""
    from fastvideo_jax.attention import tokamax_dpa

    calls = []

    class StandIn:
        @staticmethod
        def dot_product_attention(q, k, v, *, mask, scale, implementation):
            calls.append((mask.shape, scale, implementation))
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

    monkeypatch.setattr(tokamax_dpa, "_module", lambda: StandIn)
    q, k, v = _qkv(4)
    mask = jax.random.bernoulli(jax.random.key(9), 0.7, (q.shape[0], k.shape[1])).at[:, 0].set(True)
    with tokamax_dpa.tokamax_config_scope(tokamax_dpa.TokamaxConfig(implementation="triton")):
        out = tokamax_dpa.tokamax_attention(q, k, v, mask, scale=0.3)
    assert calls == [((q.shape[0], 1, 1, k.shape[1]), 0.3, "triton")]
    ref = reference_attention(q, k, v, mask, scale=0.3)
    assert float(jnp.abs(out - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())
