"""GPU Pallas attention: our Triton-lowered flash kernel (dense tables) and the Mosaic-GPU FA3 kernel.

* ``triton_attention``: our block-sparse Triton-lowered flash kernel (``block_sparse_gpu``) with a dense block
  table: lengths padded to its blocks, padded and masked keys excluded per key, cross lengths allowed.
* ``mosaic_attention``: ``attention_mgpu`` (FlashAttention-3 on Hopper, sm90 only). Its shared-memory buffers
  are fp16 whatever the input dtype, so bf16 inputs fail with a dtype mismatch (jax 0.11.2). Work-around: bf16
  inputs are cast to fp16 (clipped to +-65504; every bf16 value in [6.1e-5, 65504] is exactly representable in
  fp16, so the cast loses nothing in practice) when ``MosaicConfig.allow_fp16_compute`` (default True), and the
  output is cast back. The kernel has no masking; padded/masked keys are zeroed (logit exactly 0, value 0) and
  their known contribution ``n_masked * 2^-lse`` is removed from the softmax denominator using the kernel's
  log-sum-exp; the backward pass is the kernel's own, fed the corrected output and lse (exact, since zeroed keys
  add nothing to dQ). The correction is ill-conditioned only when the valid keys' softmax mass is tiny next to
  the number of masked keys (logits all << 0). The kernel is reached only through ``_mosaic_fwd_raw`` /
  ``_mosaic_bwd_raw`` (and its availability through ``_mosaic_unavailable``): CPU tests replace those with a
  jnp stand-in to test this wrapper (padding, masking, lse correction, dtype policy); only a Hopper GPU tests
  the kernel itself.

All entry points take (B, L, N, E) and ``scale`` (default 1/sqrt(E)). ``interpret=True`` runs the Triton
kernels in Pallas interpret mode (CPU tests). The block-sparse Triton kernel (``block_sparse_attention``) lives
in ``block_sparse_gpu``; ``TritonConfig`` and its scope live in ``_gpu_common`` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from fastvideo_jax.attention._common import ScopedValue, platform, round_up
from fastvideo_jax.attention._gpu_common import (
    TritonConfig,
    _pad_axis,
    current_triton_config,
    triton_config_scope,
)
from fastvideo_jax.attention.block_sparse_gpu import dense_block_sparse_attention

__all__ = [
    "MosaicConfig", "TritonConfig", "check_mosaic", "check_triton", "current_mosaic_config", "current_triton_config",
    "mosaic_attention", "mosaic_config_scope", "triton_attention", "triton_config_scope",
]

FP16_MAX = 65504.0


# ==========================================================================================================
# Configs
# ==========================================================================================================


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """``attention_mgpu.TuningConfig`` fields plus dtype policy.

    Defaults: the configuration measured at 675 TFLOP/s on H200 (fp16, N=32768): block_q 64, block_kv 128,
    2 stages.
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    allow_fp16_compute: bool = True

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"):
            if getattr(self, name) % 64:
                raise ValueError(f"MosaicConfig.{name}={getattr(self, name)} must be a multiple of 64")
        if self.max_concurrent_steps < 2:
            raise ValueError("MosaicConfig.max_concurrent_steps must be >= 2")

    @property
    def q_multiple(self) -> int:
        return math.lcm(2 * self.block_q, self.block_q_dq, self.block_q_dkv)

    @property
    def kv_multiple(self) -> int:
        return math.lcm(self.block_kv, self.block_kv_dkv, self.block_kv_dq)


_MOSAIC_CONFIG = ScopedValue(MosaicConfig())
current_mosaic_config = _MOSAIC_CONFIG.current
mosaic_config_scope = _MOSAIC_CONFIG.scope


# ==========================================================================================================
# Capability checks (None = can run, else the reason)
# ==========================================================================================================


def check_triton(q, k, v, kv_mask=None, config: TritonConfig | None = None) -> str | None:
    config = config or current_triton_config()
    if not config.interpret and platform() != "gpu":
        return f"needs a GPU or interpret=True (platform is {platform()})"
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} unsupported"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def _compute_capability() -> str | None:
    dev = jax.devices()[0]
    return getattr(dev, "compute_capability", None)


def _mgpu_module():
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception:  # pragma: no cover - depends on the jaxlib build
        return None
    return attention_mgpu


def _mosaic_unavailable() -> str | None:
    """Why the Mosaic-GPU kernel cannot run on this machine, or None."""
    if platform() != "gpu":
        return f"needs an sm90 GPU (platform is {platform()})"
    cc = _compute_capability()
    if cc is not None and str(cc) != "9.0":
        return f"needs compute capability 9.0 (Hopper wgmma), device has {cc}"
    mod = _mgpu_module()
    if mod is None or not all(hasattr(mod, n) for n in ("attention", "_attention_bwd", "TuningConfig")):
        return "jax.experimental.pallas.ops.gpu.attention_mgpu (attention, _attention_bwd) not importable"
    return None


def check_mosaic(q, k, v, kv_mask=None, config: MosaicConfig | None = None) -> str | None:
    config = config or current_mosaic_config()
    reason = _mosaic_unavailable()
    if reason is not None:
        return reason
    if q.dtype == jnp.bfloat16 and not config.allow_fp16_compute:
        return "the Mosaic kernel's smem buffers are fp16; bf16 needs allow_fp16_compute=True"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs fp16/bf16 inputs (got {q.dtype})"
    if q.shape[-1] % 64 or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} must be a multiple of 64 and at most 256"
    return None


# ==========================================================================================================
# Triton: our flash kernel with a dense block table
# ==========================================================================================================


def triton_attention(q, k, v, kv_mask=None, scale=None, *, config: TritonConfig | None = None):
    """Dense attention on our Triton-lowered Pallas flash kernel (the block-sparse kernel with every block
    listed): any lengths, cross lengths, optional key mask.

    JAX's own ``pallas.ops.gpu.attention.mha`` is deprecated from jax 0.12 (in favour of tokamax) and could not
    express key-only masks anyway. Not yet timed as a dense kernel on a GPU: on an H200 the same kernel ran the
    Wan 1.3B 480p full STA window at 394 TFLOP/s of listed blocks (over 43,008 padded tokens, 28.8 ms) where
    ``mha`` ran dense at 351 TFLOP/s (32,760 tokens, 18.8 ms); benchmarks/RESULTS.md, 2026-12-01."""
    config = config or current_triton_config()
    return dense_block_sparse_attention(q, k, v, kv_mask, scale=scale, config=config)


# ==========================================================================================================
# Mosaic GPU (FA3, Hopper)
# ==========================================================================================================


def _mgpu_tuning(config: MosaicConfig):
    mod = _mgpu_module()
    return mod.TuningConfig(
        block_q=config.block_q, block_kv=config.block_kv, max_concurrent_steps=config.max_concurrent_steps,
        block_q_dkv=config.block_q_dkv, block_kv_dkv=config.block_kv_dkv,
        block_q_dq=config.block_q_dq, block_kv_dq=config.block_kv_dq,
    )


def _mosaic_fwd_raw(q, k, v, config: MosaicConfig):
    """The kernel's forward: unscaled softmax attention and its log-sum-exp in log2 units."""
    out, (lse,) = _mgpu_module().attention(q, k, v, _mgpu_tuning(config), save_residuals=True)
    return out, lse


def _corrected(out, lse, n_masked):
    """Remove ``n_masked`` zero-logit keys from the softmax: returns the valid-key output and lse (log2)."""
    ratio = n_masked.astype(jnp.float32)[:, None, None] * jnp.exp2(-lse)  # (B, N, Lq)
    keep = jnp.maximum(1.0 - ratio, jnp.finfo(jnp.float32).tiny)
    lse_true = lse + jnp.log2(keep)
    factor = jnp.transpose(1.0 / keep, (0, 2, 1))[..., None]  # (B, Lq, N, 1)
    return (out.astype(jnp.float32) * factor).astype(out.dtype), lse_true


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mosaic_core(q, k, v, n_masked, config: MosaicConfig):
    out, lse = _mosaic_fwd_raw(q, k, v, config)
    return _corrected(out, lse, n_masked)[0]


def _mosaic_core_fwd(q, k, v, n_masked, config):
    out, lse = _mosaic_fwd_raw(q, k, v, config)
    out, lse = _corrected(out, lse, n_masked)
    return out, (q, k, v, out, lse)


def _mosaic_bwd_raw(config: MosaicConfig, res, do):
    """The kernel's backward: (dq, dk, dv) from (q, k, v, out, lse) and the output cotangent."""
    return _mgpu_module()._attention_bwd(_mgpu_tuning(config), False, res, do)


def _mosaic_core_bwd(config, res, do):
    dq, dk, dv = _mosaic_bwd_raw(config, res, do.astype(res[0].dtype))
    return dq, dk, dv, None


_mosaic_core.defvjp(_mosaic_core_fwd, _mosaic_core_bwd)


def mosaic_attention(q, k, v, kv_mask=None, scale=None, *, config: MosaicConfig | None = None):
    """Dense attention on the Mosaic-GPU FA3 kernel (sm90), any lengths, optional key mask. Differentiable."""
    config = config or current_mosaic_config()
    reason = check_mosaic(q, k, v, kv_mask, config)
    if reason is not None:
        raise ValueError(f"mosaic_attention: {reason}")
    out_dtype = q.dtype
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    scale = E ** -0.5 if scale is None else float(scale)
    Lqp = round_up(Lq, config.q_multiple)
    Lkp = max(round_up(Lk, config.kv_multiple), config.max_concurrent_steps * config.block_kv)

    def to16(x, s=1.0):
        x = x.astype(jnp.float32) * s if s != 1.0 else x.astype(jnp.float32)
        return jnp.clip(x, -FP16_MAX, FP16_MAX).astype(jnp.float16)

    qs = _pad_axis(to16(q, scale), 1, Lqp)  # the kernel applies no softmax scale
    valid = jnp.ones((B, Lk), bool) if kv_mask is None else kv_mask.astype(bool)
    keep = valid[:, :, None, None]
    kz = _pad_axis(jnp.where(keep, to16(k), 0), 1, Lkp)
    vz = _pad_axis(jnp.where(keep, to16(v), 0), 1, Lkp)
    n_masked = (Lkp - valid.sum(-1)).astype(jnp.int32)
    out = _mosaic_core(qs, kz, vz, n_masked, config)
    return out[:, :Lq].astype(out_dtype)
