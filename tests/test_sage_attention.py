"""SageAttention (``SAGE_ATTN``): Sage's quantisation rule, the jnp reference, dispatch, masking (kernels:
``test_sage_kernels.py``; the Wan and HunyuanVideo DiTs on it: ``test_sage_dits.py``).

Accuracy metric (the SageAttention papers' per-layer metrics against full-precision attention): cosine similarity
``sum(o r) / (|o| |r|)`` and relative L1 ``sum|o - r| / sum|r|`` over the whole output. Bounds used here: cos sim
>= 0.999 and relative L1 <= 0.02, on inputs with channel outliers in K (a per-channel offset shared by every key,
as DiT keys have); without K smoothing the same inputs give relative L1 > 0.05 (``test_smoothing_is_what_keeps_*``).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.attention import AttentionBackend, attention, reference_attention, resolve_backend
from fastvideo_jax.attention import sage
from fastvideo_jax.attention.sage import (
    K_BLOCK,
    Q_BLOCK,
    SageConfig,
    SageGradientError,
    quantize_blocks,
    sage_config_scope,
    sage_quantize,
    sage_reference,
)

COS_MIN, L1_MAX = 0.999, 0.02


def accuracy(out, ref) -> tuple[float, float]:
    """(cosine similarity, relative L1) of ``out`` against ``ref``."""
    o, r = (np.asarray(jnp.asarray(x, jnp.float32), np.float64).ravel() for x in (out, ref))
    return float(o @ r / (np.linalg.norm(o) * np.linalg.norm(r))), float(np.abs(o - r).sum() / np.abs(r).sum())


def realistic_qkv(seed, B=1, Lq=200, Lk=200, N=2, E=64, dtype=jnp.float32, outlier=20.0):
    """Gaussian q/v; k with a large per-(head, channel) offset shared by all tokens (the outliers smoothing removes)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, Lq, N, E))
    k = jax.random.normal(ks[1], (B, Lk, N, E)) + outlier * jax.random.normal(ks[3], (1, 1, N, E))
    v = jax.random.normal(ks[2], (B, Lk, N, E))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _numpy_sage_quant(x: np.ndarray, block: int, mult: float):
    """SageAttention's per-block int8 rule in numpy, (L, E) of one head: scale = absmax / 127, round half away."""
    x = x.astype(np.float32) * np.float32(mult)
    q = np.zeros(x.shape, np.int8)
    scales = []
    for i in range(0, len(x), block):
        t = x[i:i + block]
        s = np.float32(np.abs(t).max() / np.float32(127.0))
        y = t / (s if s > 0 else np.float32(1.0))
        y = y + np.where(y >= 0, np.float32(0.5), np.float32(-0.5))
        q[i:i + block] = np.trunc(y).astype(np.int8)
        scales.append(s)
    return q, np.asarray(scales, np.float32)


def test_quantisation_is_sages_rule_bit_for_bit():
    x = np.random.default_rng(0).standard_normal((1, 3 * K_BLOCK, 2, 16)).astype(np.float32) * 3
    x[0, K_BLOCK:2 * K_BLOCK, 1] = 0.0  # an all-zero tile: scale 0, zeros (no 0/0)
    q8, scales = quantize_blocks(jnp.asarray(x), K_BLOCK, 0.37)
    for h in range(2):
        want_q, want_s = _numpy_sage_quant(x[0, :, h], K_BLOCK, 0.37)
        np.testing.assert_array_equal(np.asarray(q8[0, :, h]), want_q)
        np.testing.assert_array_equal(np.asarray(scales[0, h]), want_s)
    assert np.abs(np.asarray(q8, np.int32)).max() == 127


def test_quantised_inputs_fold_sm_scale_and_smooth_k():
    q, k, v = realistic_qkv(1, Lq=130, Lk=70)
    x = sage_quantize(q, k, v, scale=0.2)
    assert x.q.shape[1] == 2 * Q_BLOCK and x.k.shape[1] == 2 * K_BLOCK and x.v.dtype == jnp.float16
    # q: per 128-token block, scale folds sm_scale * log2(e); dequantised it is q * 0.2 * log2(e) to 1/254 of absmax
    deq = np.asarray(x.q[:, :130], np.float32) * np.asarray(x.q_scale[:, :, :130]).transpose(0, 2, 1)[..., None]
    want = np.asarray(q) * 0.2 * np.log2(np.e)
    assert np.abs(deq - want).max() <= np.abs(want).max() / 254 * 1.0001
    assert np.ptp(np.asarray(x.q_scale).reshape(1, 2, 2, Q_BLOCK), axis=-1).max() == 0  # constant per block
    # k: the token mean is gone (smoothed), padded keys are invalid
    kd = np.asarray(x.k[:, :70], np.float32) * np.asarray(x.k_scale[:, :, :70]).transpose(0, 2, 1)[..., None]
    smooth = np.asarray(k) - np.asarray(k).mean(1, keepdims=True)
    assert np.abs(kd - smooth).max() <= np.abs(smooth).max() / 254 * 1.0001
    assert np.asarray(x.valid).sum() == 70 and not np.asarray(x.valid)[0, 70:].any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_reference_within_the_papers_accuracy_of_exact_attention(dtype):
    q, k, v = realistic_qkv(2, dtype=dtype, Lq=190, Lk=260)
    out = sage_reference(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    cos, l1 = accuracy(out, reference_attention(*(t.astype(jnp.float32) for t in (q, k, v))))
    assert cos >= COS_MIN and l1 <= L1_MAX, (cos, l1)


def test_fp8_pv_within_sage2_accuracy():
    """SageAttention 2's fp8 e4m3 P V (per-channel V scale, P * 448): e4m3 keeps 3 mantissa bits, so relative L1
    grows to a few percent (measured 0.99935 / 0.036); bounds cos >= 0.999, relative L1 <= 0.05."""
    q, k, v = realistic_qkv(2, Lq=190, Lk=260)
    mask = jax.random.uniform(jax.random.key(1), (1, 260)) > 0.3
    out = sage_reference(q, k, v, mask, pv_dtype=jnp.float8_e4m3fn)
    cos, l1 = accuracy(out, reference_attention(q, k, v, mask))
    assert cos >= COS_MIN and l1 <= 0.05, (cos, l1)
    x = sage_quantize(q, k, v, mask, pv_dtype=jnp.float8_e4m3fn)
    assert x.v.dtype == jnp.float8_e4m3fn and np.abs(np.asarray(x.v, np.float32)).max() == 448.0
    v_valid = np.where(np.asarray(mask)[..., None, None], np.asarray(v), 0)
    np.testing.assert_allclose(np.asarray(x.out_scale), np.abs(v_valid).max(1) / 448 / 448, rtol=1e-6)


def test_smoothing_is_what_keeps_outlier_keys_accurate():
    q, k, v = realistic_qkv(3)
    exact = reference_attention(q, k, v)
    cos, l1 = accuracy(sage_reference(q, k, v), exact)
    cos_raw, l1_raw = accuracy(sage_reference(q, k, v, smooth_k=False), exact)
    assert cos >= COS_MIN and l1 <= L1_MAX, (cos, l1)
    assert l1_raw > 0.05 and l1_raw > 4 * l1, (l1_raw, l1)  # int8 spent on the offset: accuracy drops


def _dense_sage_oracle(q, k, v, mask, scale, smooth_k=True):
    """The same arithmetic unblocked, from the quantised tensors (small shapes only: (Lq, Lk) logits)."""
    x = sage_quantize(q, k, v, mask, scale, smooth_k=smooth_k)
    s_i32 = jnp.einsum("bqhe,bkhe->bhqk", x.q, x.k, preferred_element_type=jnp.int32)
    s = s_i32.astype(jnp.float32) * x.q_scale[..., :, None] * x.k_scale[..., None, :]
    if x.valid is not None:
        s = jnp.where(x.valid[:, None, None, :], s, sage.MASK_VALUE)
    m = s.max(-1, keepdims=True)
    p = jnp.exp2(s - m)
    out = jnp.einsum("bhqk,bkhe->bqhe", p.astype(x.v.dtype), x.v, preferred_element_type=jnp.float32)
    return (out / jnp.swapaxes(p.sum(-1), 1, 2)[..., None])[:, : q.shape[1]]


@pytest.mark.parametrize("block_k", [K_BLOCK, 4 * K_BLOCK])
def test_blocked_reference_equals_the_unblocked_arithmetic(block_k):
    q, k, v = realistic_qkv(4, Lq=150, Lk=300)
    mask = jax.random.uniform(jax.random.key(5), (1, 300)) > 0.3
    ours = sage_reference(q, k, v, mask, 0.11, block_k=block_k)
    want = _dense_sage_oracle(q, k, v, mask, 0.11)
    # Only fp rounding differs: the online softmax's block maxima change P's fp16 rounding (<= 2^-11 relative).
    err = float(jnp.abs(ours - want).max() / jnp.abs(want).max())
    assert err < 2e-3, err


def test_masked_and_padded_keys_change_nothing():
    q, k, v = realistic_qkv(6, Lq=77, Lk=150)
    lengths = jnp.asarray([97])
    mask = jnp.arange(150)[None] < lengths[:, None]
    out = attention(q, k, v, kv_lengths=lengths, backend="sage_attn")
    # garbage in the masked keys/values (huge, to move any mean or scale they leaked into): bit-identical output
    k2 = jnp.where(mask[..., None, None], k, 1e4)
    v2 = jnp.where(mask[..., None, None], v, -1e4)
    np.testing.assert_array_equal(np.asarray(attention(q, k2, v2, kv_mask=mask, backend="sage_attn")),
                                  np.asarray(out))
    # and it is the attention over the valid prefix alone
    np.testing.assert_array_equal(np.asarray(out), np.asarray(sage_reference(q, k[:, :97], v[:, :97])))
    cos, l1 = accuracy(out, reference_attention(q, k, v, mask))
    assert cos >= COS_MIN and l1 <= L1_MAX, (cos, l1)


def test_dispatch_runs_sage_on_cpu_and_refuses_what_it_cannot_run(caplog):
    q, k, v = realistic_qkv(7, Lq=40, Lk=40)
    assert resolve_backend("SAGE_ATTN", q, k, v) is AttentionBackend.SAGE_ATTN
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, backend=AttentionBackend.SAGE_ATTN)),
                                  np.asarray(sage_reference(q, k, v)))
    big = jnp.zeros((1, 8, 1, 512))
    assert "head dim 512" in sage.check_sage(big, big, big)
    with sage_config_scope(SageConfig(impl="triton")):
        assert "needs a GPU" in sage.check_sage(q, k, v)
        with caplog.at_level(logging.WARNING):
            assert resolve_backend("sage_attn", q, k, v) is AttentionBackend.REFERENCE
    assert "sage_attn cannot run this call" in caplog.text
    with pytest.raises(ValueError, match="SageConfig.impl='cuda'"):
        SageConfig(impl="cuda")


def test_gradients_are_refused_clearly():
    q, k, v = realistic_qkv(8, Lq=16, Lk=16)
    with pytest.raises(SageGradientError, match="sage_attn is forward only"):
        jax.grad(lambda q: attention(q, k, v, backend="sage_attn").sum())(q)
