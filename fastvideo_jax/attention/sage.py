"""SageAttention (8-bit QK^T attention, SageAttention 1 as published): quantisation, jnp reference, dispatch.

The arithmetic (one definition here; the Pallas kernels ``sage_gpu`` / ``sage_tpu`` consume the same quantised
tensors and repeat the same per-block steps):

1. Smooth K: subtract its mean over the valid tokens, per (batch, head). Softmax is invariant to it (every logit of
   a query row shifts by the same ``q . mean``), and it removes the channel-wise offset outliers of DiT keys that
   would otherwise set the int8 scale. Invalid (masked / padded) keys are zeroed so they never set a scale.
2. Quantise per block of tokens (``Q_BLOCK`` = 128 query tokens, ``K_BLOCK`` = 64 key tokens, per (batch, head),
   SageAttention's ``BLKQ``/``BLKK``): ``scale = absmax / 127``, ``x_int8 = trunc(x / scale + 0.5 sign(x))``
   (round half away from zero). ``sm_scale * log2(e)`` is folded into Q before quantising, as Sage does, so the
   logits come out in the log2 domain and the softmax uses ``exp2``.
3. ``S = int32(Q_int8 @ K_int8^T) * q_scale * k_scale`` (int8 x int8 -> int32; |S_int32| <= E * 127^2 < 2^24
   for E <= 1040, so its conversion to fp32 is exact), masked keys to a large negative logit.
4. Online softmax in fp32 (running max, sum, fp32 accumulator); ``P`` (unnormalised, fp32) is cast to the PV dtype
   and ``P @ V`` runs in that dtype with fp32 accumulation. PV dtype: fp16 (Sage casts V to fp16 for every input
   dtype; |V| above 65504 overflows, as in Sage) or, on the TPU kernel, bf16 (no fp16 MXU path). Optionally fp8
   e4m3 as SageAttention 2 on Hopper (``pv_dtype="float8_e4m3fn"``): V quantised per channel (scale = absmax over
   the valid tokens / 448), P with the static scale 448 (P <= 1), each kv block's product accumulated in fp32 on
   its own and added to the fp32 accumulator (Sage 2's two-level accumulation), the output rescaled by
   ``v_scale / 448``.

Deviations from the published code, stated: Sage 1's ``P @ V`` accumulates each block product in fp16
(``out_dtype=fp16``, a consumer-GPU speed trick) before adding it to the fp32 accumulator; ours accumulates in fp32
(Hopper and TPU matmuls run fp32 accumulation at full rate). SageAttention 2's Q smoothing and int4 / per-thread
quantisation are not implemented (its fp8 ``P @ V`` is, as an option). Sage 1.0.6 lets
padded keys of a ragged last block take part in the softmax with logit 0; ours masks them.

Forward only: Sage is an inference kernel. Differentiating through it raises :class:`SageGradientError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from fastvideo_jax.attention._common import ScopedValue, platform, round_up
from fastvideo_jax.errors import UserError

__all__ = [
    "K_BLOCK", "Q_BLOCK", "SageConfig", "SageGradientError", "SageQuantized", "check_sage", "current_sage_config",
    "quantize_blocks", "sage_attention", "sage_config_scope", "sage_quantize", "sage_reference",
]

Q_BLOCK = 128  # query tokens per quantisation scale (SageAttention's BLKQ)
K_BLOCK = 64  # key tokens per quantisation scale (SageAttention's BLKK)
LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MAX_HEAD_DIM = 256
FP8_MAX = 448.0  # largest float8_e4m3fn: P's static scale and V's per-channel range
PV_DTYPES = ("float16", "bfloat16", "float8_e4m3fn")
IMPLS = ("auto", "jnp", "triton", "mosaic_tpu")


class SageGradientError(UserError):
    """SageAttention is forward only (an inference kernel): gradients through it are not implemented."""


@dataclasses.dataclass(frozen=True)
class SageConfig:
    """How ``SAGE_ATTN`` runs.

    ``impl``: "auto" (the Triton kernel on a GPU, the Mosaic TPU kernel on a TPU, the jnp reference elsewhere),
    or one of "jnp", "triton", "mosaic_tpu". ``interpret`` runs the Pallas kernels in interpret mode (CPU tests).
    ``smooth_k``: subtract K's token mean before quantising (Sage's default; off only to measure what it buys).
    ``pv_dtype``: "float16" / "bfloat16" / "float8_e4m3fn" (SageAttention 2's fp8 PV; GPU kernel and jnp only), or
    None = fp16, except bf16 on the TPU kernel.
    ``block_q`` / ``block_k``: kernel tiles (None = the kernel's default); quantisation blocks are fixed.
    """

    impl: str = "auto"
    interpret: bool = False
    smooth_k: bool = True
    pv_dtype: str | None = None
    block_q: int | None = None
    block_k: int | None = None

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"SageConfig.impl={self.impl!r}; one of {IMPLS}")
        if self.pv_dtype not in (None, *PV_DTYPES):
            raise ValueError(f"SageConfig.pv_dtype={self.pv_dtype!r}; one of {PV_DTYPES} or None")
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if b is not None and (b < 16 or b & (b - 1)):
                raise ValueError(f"SageConfig.{name}={b} must be a power of two >= 16")

    def resolved_impl(self) -> str:
        if self.impl != "auto":
            return self.impl
        return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(platform(), "jnp")

    def resolved_pv_dtype(self, impl: str):
        if self.pv_dtype is not None:
            return jnp.dtype(self.pv_dtype)
        return jnp.dtype(jnp.bfloat16 if impl == "mosaic_tpu" else jnp.float16)


_SAGE_CONFIG = ScopedValue(SageConfig())
current_sage_config = _SAGE_CONFIG.current
sage_config_scope = _SAGE_CONFIG.scope  # config used by the registered SAGE_ATTN backend


# ----------------------------------------------------------------------------------------------------------
# Quantisation (shared by the reference and both kernels)
# ----------------------------------------------------------------------------------------------------------


def quantize_blocks(x: jax.Array, block: int, mult: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(B, L, N, E), L a multiple of ``block`` -> int8 (B, L, N, E) and fp32 scales (B, N, L // block).

    Sage's rule: ``x *= mult``; ``scale = max|x| / 127`` over each (block tokens x E) tile of one head;
    ``int8 = trunc(x / scale + 0.5 sign(x))``. An all-zero tile gets scale 0 and zeros (Sage would divide 0/0)."""
    x = x.astype(jnp.float32) * jnp.float32(mult)
    tiles = rearrange(x, "b (n t) h e -> b h n t e", t=block)
    scale = jnp.max(jnp.abs(tiles), axis=(-2, -1)) / jnp.float32(127.0)  # (B, N, n)
    y = tiles / jnp.where(scale > 0, scale, 1.0)[..., None, None]
    y = y + jnp.where(y >= 0, 0.5, -0.5).astype(jnp.float32)
    q = jnp.clip(jnp.trunc(y), -127, 127).astype(jnp.int8)
    return rearrange(q, "b h n t e -> b (n t) h e"), scale


class SageQuantized(NamedTuple):
    """Sage's kernel inputs, padded: token lengths to multiples of the quantisation and kernel blocks."""

    q: jax.Array  # int8 (B, Lqp, N, E)
    k: jax.Array  # int8 (B, Lkp, N, E), smoothed
    v: jax.Array  # pv dtype (B, Lkp, N, E); fp8: V / v_scale
    q_scale: jax.Array  # fp32 (B, N, Lqp): per token, constant over each Q_BLOCK; includes sm_scale * log2(e)
    k_scale: jax.Array  # fp32 (B, N, Lkp): per token, constant over each K_BLOCK
    valid: jax.Array | None  # bool (B, Lkp), None when every key is valid (no mask, no padding)
    out_scale: jax.Array | None = None  # fp8 PV only: fp32 (B, N, E) = v_scale / 448, applied to acc / l


def _pad_tokens(x: jax.Array, length: int) -> jax.Array:
    extra = length - x.shape[1]
    return x if extra == 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def sage_quantize(q, k, v, kv_mask=None, scale=None, *, smooth_k=True, pv_dtype=jnp.float16,
                  q_multiple: int = Q_BLOCK, k_multiple: int = K_BLOCK) -> SageQuantized:
    """Steps 1-2 of the module docstring. ``q_multiple`` / ``k_multiple`` (multiples of the quantisation blocks)
    fix the padded lengths a kernel needs; padding adds zero tokens, which never change a block's absmax."""
    if q_multiple % Q_BLOCK or k_multiple % K_BLOCK:
        raise ValueError(f"sage_quantize: padding multiples ({q_multiple}, {k_multiple}) must be multiples of the "
                         f"quantisation blocks ({Q_BLOCK}, {K_BLOCK})")
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    sm_scale = E ** -0.5 if scale is None else float(scale)
    Lqp, Lkp = round_up(Lq, q_multiple), round_up(Lk, k_multiple)
    valid = None if kv_mask is None else kv_mask.astype(bool)
    k32 = k.astype(jnp.float32)
    if smooth_k:
        w = jnp.ones((B, Lk), jnp.float32) if valid is None else valid.astype(jnp.float32)
        count = jnp.maximum(w.sum(1), 1.0)[:, None, None]  # (B, 1, 1)
        mean = jnp.einsum("bl,blne->bne", w, k32) / count
        k32 = k32 - mean[:, None]
    if valid is not None:
        k32 = jnp.where(valid[:, :, None, None], k32, 0.0)
    q_i8, qs = quantize_blocks(_pad_tokens(q, Lqp), Q_BLOCK, sm_scale * LOG2E)
    k_i8, ks = quantize_blocks(_pad_tokens(k32, Lkp), K_BLOCK)
    vq, out_scale = _pv_operand(v, valid, pv_dtype)
    vq = _pad_tokens(vq, Lkp)
    if Lkp != Lk:
        valid = _pad_tokens(jnp.ones((B, Lk), bool) if valid is None else valid, Lkp)
    return SageQuantized(q_i8, k_i8, vq, jnp.repeat(qs, Q_BLOCK, axis=-1), jnp.repeat(ks, K_BLOCK, axis=-1), valid,
                         out_scale)


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(jnp.float8_e4m3fn)


def _pv_operand(v, valid, pv_dtype):
    """V in the PV dtype and, for fp8, the output scale: per-channel ``v_scale = absmax / 448`` (valid tokens)."""
    if not is_fp8(pv_dtype):
        return v.astype(pv_dtype), None
    v32 = v.astype(jnp.float32)
    if valid is not None:
        v32 = jnp.where(valid[:, :, None, None], v32, 0.0)
    v_scale = jnp.max(jnp.abs(v32), axis=1) / jnp.float32(FP8_MAX)  # (B, N, E)
    v8 = jnp.clip(v32 / jnp.where(v_scale > 0, v_scale, 1.0)[:, None], -FP8_MAX, FP8_MAX).astype(pv_dtype)
    return v8, v_scale / jnp.float32(FP8_MAX)


def p_operand(p: jax.Array, pv_dtype) -> jax.Array:
    """P (fp32, <= 1) as the PV matmul's left operand: cast, or for fp8 scaled by 448 first (Sage 2's static scale)."""
    if is_fp8(pv_dtype):
        return (p * jnp.float32(FP8_MAX)).astype(pv_dtype)
    return p.astype(pv_dtype)


def dequantized_logits(s_int32: jax.Array, q_scale: jax.Array, k_scale: jax.Array) -> jax.Array:
    """Step 3: fp32 log2-domain logits ``(S_int32 * q_scale) * k_scale`` of one (q block, kv block) tile."""
    return s_int32.astype(jnp.float32) * q_scale[..., :, None] * k_scale[..., None, :]


# ----------------------------------------------------------------------------------------------------------
# jnp reference: blocked online softmax, never an (Lq, Lk) matrix
# ----------------------------------------------------------------------------------------------------------


def _attend(x: SageQuantized, out_dtype, block_q: int, block_k: int) -> jax.Array:
    """Steps 3-4 over padded inputs: ``lax.map`` over q blocks, ``lax.scan`` over kv blocks."""
    B, Lqp, N, E = x.q.shape
    Lkp = x.k.shape[1]
    kb = rearrange(x.k, "b (j t) h e -> j b h t e", t=block_k)
    vb = rearrange(x.v, "b (j t) h e -> j b h t e", t=block_k)
    ksb = rearrange(x.k_scale, "b h (j t) -> j b h t", t=block_k)
    valid = jnp.ones((B, Lkp), bool) if x.valid is None else x.valid
    mb = rearrange(valid, "b (j t) -> j b t", t=block_k)

    def q_block(args):
        qi, qsi = args  # (B, N, bq, E) int8, (B, N, bq)

        def kv_step(carry, kv):
            m, l, acc = carry
            kj, vj, ksj, mj = kv
            s_i32 = jnp.einsum("bhqe,bhke->bhqk", qi, kj, preferred_element_type=jnp.int32)
            s = dequantized_logits(s_i32, qsi, ksj)
            s = jnp.where(mj[:, None, None, :], s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[..., None])
            l = l * alpha + p.sum(-1)
            pv = jnp.einsum("bhqk,bhke->bhqe", p_operand(p, vj.dtype), vj, preferred_element_type=jnp.float32)
            return (m_new, l, acc * alpha[..., None] + pv), None

        init = (jnp.full((B, N, block_q), MASK_VALUE, jnp.float32), jnp.zeros((B, N, block_q), jnp.float32),
                jnp.zeros((B, N, block_q, E), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, ksb, mb))
        out = acc / l[..., None]
        if x.out_scale is not None:
            out = out * x.out_scale[:, :, None, :]
        return out.astype(out_dtype)

    qb = rearrange(x.q, "b (i t) h e -> i b h t e", t=block_q)
    qsb = rearrange(x.q_scale, "b h (i t) -> i b h t", t=block_q)
    out = jax.lax.map(q_block, (qb, qsb))  # (nq, B, N, bq, E)
    return rearrange(out, "i b h t e -> b (i t) h e")


def sage_reference(q, k, v, kv_mask=None, scale=None, *, smooth_k: bool = True, pv_dtype=jnp.float16,
                   block_q: int = Q_BLOCK, block_k: int = 4 * K_BLOCK) -> jax.Array:
    """SageAttention in jnp: (B, Lq, N, E) -> (B, Lq, N, E) in q's dtype. ``block_q`` / ``block_k`` (multiples of
    the quantisation blocks) only tile the online softmax; they do not change the quantisation."""
    x = sage_quantize(q, k, v, kv_mask, scale, smooth_k=smooth_k, pv_dtype=pv_dtype,
                      q_multiple=math.lcm(Q_BLOCK, block_q), k_multiple=math.lcm(K_BLOCK, block_k))
    return _attend(x, q.dtype, block_q, block_k)[:, : q.shape[1]]


# ----------------------------------------------------------------------------------------------------------
# The registered backend
# ----------------------------------------------------------------------------------------------------------


def check_sage(q, k, v, kv_mask=None, config: SageConfig | None = None) -> str | None:
    config = config or current_sage_config()
    impl = config.resolved_impl()
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} unsupported (fp32, bf16 or fp16)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if config.pv_dtype == "float8_e4m3fn":
        if impl == "mosaic_tpu":
            return "fp8 PV is a GPU (Hopper) variant; the TPU kernel runs PV in bf16 / fp16"
        cc = getattr(jax.devices()[0], "compute_capability", None)
        if impl == "triton" and not config.interpret and cc is not None and float(cc) < 8.9:
            return f"fp8 PV needs compute capability >= 8.9 (fp8 tensor cores), device has {cc}"
    need = {"triton": "gpu", "mosaic_tpu": "tpu"}.get(impl)
    if need is not None and not config.interpret and platform() != need:
        return f"impl {impl!r} needs a {need.upper()} or interpret=True (platform is {platform()})"
    return None


def _forward_only(fn):
    """``fn(q, k, v, mask)`` whose differentiation raises SageGradientError (before any backward work)."""

    @jax.custom_vjp
    def f(q, k, v, mask):
        return fn(q, k, v, mask)

    def fwd(q, k, v, mask):
        raise SageGradientError("attention backend sage_attn is forward only (an 8-bit inference kernel): "
                                "gradients are not implemented; train or fine-tune with a dense backend")

    f.defvjp(fwd, lambda res, g: None)
    return f


def sage_attention(q, k, v, kv_mask=None, scale=None, *, config: SageConfig | None = None) -> jax.Array:
    """SageAttention on the implementation ``config`` picks (see :class:`SageConfig`); (B, L, N, E) in and out."""
    config = config or current_sage_config()
    reason = check_sage(q, k, v, kv_mask, config)
    if reason is not None:
        raise ValueError(f"sage_attention: {reason}")
    impl = config.resolved_impl()
    pv_dtype = config.resolved_pv_dtype(impl)
    if impl == "triton":
        from fastvideo_jax.attention.sage_gpu import sage_triton as kernel
    elif impl == "mosaic_tpu":
        from fastvideo_jax.attention.sage_tpu import sage_mosaic_tpu as kernel
    else:
        kernel = None

    def run(q, k, v, mask):
        if kernel is None:
            return sage_reference(q, k, v, mask, scale, smooth_k=config.smooth_k, pv_dtype=pv_dtype)
        return kernel(q, k, v, mask, scale, config=config, pv_dtype=pv_dtype)

    if kv_mask is None:
        return _forward_only(lambda q, k, v, m: run(q, k, v, None))(q, k, v, jnp.ones(k.shape[:2], bool))
    return _forward_only(run)(q, k, v, kv_mask)
