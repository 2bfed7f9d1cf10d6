"""SageAttention's Pallas kernels (``sage_gpu`` Triton, ``sage_tpu`` Mosaic TPU) against its jnp reference.

On CPU both run in Pallas interpret mode (on a GPU the Triton kernel runs for real, on a TPU the Mosaic one).
* The integer part bit for bit: each kernel's int8 x int8 -> int32 product (``int_scores``, called inside a
  test-only pallas_call with the kernel's block layout) equals numpy's int64 product, at the largest magnitudes
  (|S| = E * 127^2); the quantised tensors are the reference's own (``sage_quantize``, one definition).
* Outputs: kernel vs ``sage_reference`` run with the kernel's tiling. Interpret mode runs the same XLA arithmetic:
  within 4 eps (of the output dtype) of max|ref| (observed <= 1 eps). On the device exp2 is the hardware's
  approximation, and a last-bit difference in P can flip its fp16 rounding (2^-11 relative, up to 2^-4 for fp8
  e4m3): there the bound is 2^-10 of max|ref| (fp16 PV) and, for fp8, cos >= 0.9999 / relative L1 <= 0.01
  between kernel and reference (each is ~0.036 from exact attention).
* Lowering (no accelerator needed): the Triton module has an ``i8 x i8 -> i32`` ``tt.dot``; the Mosaic module an
  ``i8`` ``tpu.matmul``. Captured through JAX-internal lowering functions; skipped if a JAX version moved them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.attention import attention, reference_attention
from fastvideo_jax.attention import sage_gpu, sage_tpu
from fastvideo_jax.attention.sage import SageConfig, sage_config_scope, sage_reference
from tests.test_sage_attention import COS_MIN, L1_MAX, accuracy, realistic_qkv

PLATFORM = jax.devices()[0].platform
KERNELS = {  # impl: (kernel fn, tiles used here, PV dtype, real hardware)
    "triton": (sage_gpu.sage_triton, (128, 64), jnp.float16, "gpu"),
    "mosaic_tpu": (sage_tpu.sage_mosaic_tpu, (128, 128), jnp.bfloat16, "tpu"),
}


def _on_device(impl: str) -> bool:
    return PLATFORM == KERNELS[impl][3]


def _config(impl: str) -> SageConfig:
    _, (bq, bk), _, hw = KERNELS[impl]
    return SageConfig(impl=impl, interpret=PLATFORM != hw, block_q=bq, block_k=bk)


def _extreme_int8(shape, seed):
    r = np.random.default_rng(seed)
    x = r.integers(-127, 128, shape).astype(np.int8)
    x[: shape[0] // 4] = 127  # rows of +-127: the largest |int32| products (E * 127^2)
    return x


@pytest.mark.parametrize("impl", list(KERNELS))
def test_int32_scores_bit_for_bit(impl):
    from jax.experimental import pallas as pl

    bq, bk, E = 64, 128, 128
    q8, k8 = _extreme_int8((bq, E), 0), _extreme_int8((bk, E), 1)
    k8[: bk // 4] = -127
    int_scores = sage_gpu.int_scores if impl == "triton" else sage_tpu.int_scores

    def hook(q_ref, k_ref, o_ref):  # the kernel's integer step on one (q block, kv block) tile
        o_ref[...] = int_scores(q_ref[...], k_ref[...])

    out = pl.pallas_call(hook, out_shape=jax.ShapeDtypeStruct((bq, bk), jnp.int32),
                         interpret=PLATFORM != KERNELS[impl][3])(jnp.asarray(q8), jnp.asarray(k8))
    want = q8.astype(np.int64) @ k8.astype(np.int64).T
    assert np.abs(want).max() == E * 127 * 127
    np.testing.assert_array_equal(np.asarray(out), want)
    # and the fp32 conversion the kernels dequantise from is exact (|S| < 2^24)
    np.testing.assert_array_equal(np.asarray(out).astype(np.float32).astype(np.int64), want)


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("dtype,E,masked", [(jnp.float32, 48, True), (jnp.bfloat16, 64, False)])
def test_kernel_equals_reference(impl, dtype, E, masked):
    fn, (bq, bk), pv, _ = KERNELS[impl]
    q, k, v = realistic_qkv(10, Lq=150, Lk=200, E=E, dtype=dtype)
    mask = (jax.random.uniform(jax.random.key(11), (1, 200)) > 0.3) if masked else None
    ours = fn(q, k, v, mask, 0.15, config=_config(impl), pv_dtype=pv)
    want = sage_reference(q, k, v, mask, 0.15, pv_dtype=pv, block_q=bq, block_k=bk)
    assert ours.dtype == dtype and ours.shape == q.shape
    err = float(jnp.abs(ours.astype(jnp.float32) - want.astype(jnp.float32)).max() / jnp.abs(want).max())
    tol = 4 * float(jnp.finfo(dtype).eps)
    assert err <= (max(tol, 2 ** -10) if _on_device(impl) else tol), err


def test_triton_fp8_pv_equals_reference():
    q, k, v = realistic_qkv(13, Lq=130, Lk=150)
    mask = jax.random.uniform(jax.random.key(14), (1, 150)) > 0.3
    f8 = jnp.float8_e4m3fn
    config = SageConfig(impl="triton", interpret=PLATFORM != "gpu", pv_dtype="float8_e4m3fn", block_q=128, block_k=64)
    ours = sage_gpu.sage_triton(q, k, v, mask, config=config, pv_dtype=f8)
    want = sage_reference(q, k, v, mask, pv_dtype=f8, block_q=128, block_k=64)
    if _on_device("triton"):
        cos, l1 = accuracy(ours, want)
        assert cos >= 0.9999 and l1 <= 0.01, (cos, l1)
    else:
        err = float(jnp.abs(ours - want).max() / jnp.abs(want).max())
        assert err <= 4 * float(jnp.finfo(jnp.float32).eps), err


@pytest.mark.parametrize("impl", list(KERNELS))
def test_kernel_through_dispatch_padding_and_accuracy(impl):
    q, k, v = realistic_qkv(12, Lq=70, Lk=190)
    lengths = jnp.asarray([121])
    mask = jnp.arange(190)[None] < lengths[:, None]
    with sage_config_scope(_config(impl)):
        out = attention(q, k, v, kv_lengths=lengths, backend="sage_attn")
        garbage = attention(q, jnp.where(mask[..., None, None], k, 1e4), jnp.where(mask[..., None, None], v, -1e4),
                            kv_mask=mask, backend="sage_attn")
    np.testing.assert_array_equal(np.asarray(garbage), np.asarray(out))  # masked keys change nothing
    cos, l1 = accuracy(out, reference_attention(q, k, v, mask))
    assert cos >= COS_MIN and l1 <= L1_MAX, (cos, l1)


def _capture(module, name, text_of):
    original = getattr(module, name, None)
    if original is None:
        pytest.skip(f"{module.__name__}.{name} moved in jax {jax.__version__}: lowering capture unavailable")
    seen = []

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(text_of(result))
        return result

    return original, capture, seen


def _lowered_kernel_text(monkeypatch, impl, platform_name, module, name, text_of, pv_dtype=None):
    original, capture, seen = _capture(module, name, text_of)
    monkeypatch.setattr(module, name, capture)
    x = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    fn = KERNELS[impl][0]
    pv = pv_dtype or KERNELS[impl][2]
    config = SageConfig(impl=impl, block_q=128, block_k=128, pv_dtype=jnp.dtype(pv).name)
    jax.jit(lambda q, k, v, m: fn(q, k, v, m, config=config, pv_dtype=pv)).trace(
        x, x, x, jnp.ones((1, 256), bool)).lower(lowering_platforms=(platform_name,))
    assert len(seen) == 1
    return seen[0]


def test_triton_lowering_has_an_int8_mma_with_int32_accumulation(monkeypatch):
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg
    except ImportError as e:
        pytest.skip(f"Pallas Triton lowering not importable: {e}")
    text = _lowered_kernel_text(monkeypatch, "triton", "cuda", reg.lowering, "lower_jaxpr_to_triton_module",
                                lambda r: r.module.operation.get_asm())
    dots = [line for line in text.splitlines() if "tt.dot" in line]
    assert any("tensor<128x128xi8> * tensor<128x128xi8> -> tensor<128x128xi32>" in d for d in dots), dots
    assert any("xf16> * tensor<128x128xf16> -> tensor<128x128xf32>" in d for d in dots), dots


def test_triton_fp8_lowering_has_an_e4m3_mma_with_fp32_accumulation(monkeypatch):
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg
    except ImportError as e:
        pytest.skip(f"Pallas Triton lowering not importable: {e}")
    text = _lowered_kernel_text(monkeypatch, "triton", "cuda", reg.lowering, "lower_jaxpr_to_triton_module",
                                lambda r: r.module.operation.get_asm(), pv_dtype=jnp.float8_e4m3fn)
    dots = [line for line in text.splitlines() if "tt.dot" in line]
    assert any("xi8> * tensor<128x128xi8> -> tensor<128x128xi32>" in d for d in dots), dots
    assert any("xf8E4M3FN> * tensor<128x128xf8E4M3FN> -> tensor<128x128xf32>" in d for d in dots), dots


def test_mosaic_tpu_lowering_has_an_int8_matmul(monkeypatch):
    try:
        from jax._src.pallas.mosaic import pallas_call_registration as reg
    except ImportError as e:
        pytest.skip(f"Pallas Mosaic lowering not importable: {e}")
    text = _lowered_kernel_text(monkeypatch, "mosaic_tpu", "tpu", reg.lowering, "lower_jaxpr_to_pipelined_module",
                                lambda r: str(r.operation))
    matmuls = [line for line in text.splitlines() if "tpu.matmul" in line]
    assert any("vector<128x128xi8>, vector<128x128xi8>, vector<128x128xi32>" in m for m in matmuls), matmuls
    assert any("vector<128x128xbf16>, vector<128x128xbf16>, vector<128x128xf32>" in m for m in matmuls), matmuls
