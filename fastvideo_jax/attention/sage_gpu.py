"""SageAttention on GPU: a Pallas kernel lowered through Triton (int8 ``tl.dot`` with int32 accumulation).

The quantisation (``sage.sage_quantize``: K smoothing, per-block int8 Q/K with per-token scale vectors, V in the
PV dtype) runs in XLA before the kernel, as Sage runs it in its own kernel. The kernel, per (q block, batch,
head), walks every kv block with an online softmax:

    S_int32 = Q_int8 @ K_int8^T            (plgpu.dot on int8 inputs: Triton int8 MMA, int32 accumulator)
    S = (S_int32 * q_scale) * k_scale      (``sage.dequantized_logits``: log2-domain fp32 logits)
    online softmax with exp2 in fp32; acc += P.astype(pv dtype) @ V (fp32 accumulation)
    fp8 PV (``pv_dtype="float8_e4m3fn"``, SageAttention 2 on Hopper): P * 448 and per-channel-scaled V in e4m3,
    each block's product a fresh fp32 accumulator added to acc; the output times v_scale / 448

Kernel tiles (``SageConfig.block_q`` / ``block_k``, default 128 / 64 as Sage's kernel) are independent of the
quantisation blocks because scales arrive per token. Head dims are zero-padded to a power of two >= 32 (Triton
tensor shapes; int8 MMA needs K >= 32): zero columns add nothing to S_int32 or to the output. Forward only.
``interpret=True`` runs it in Pallas interpret mode (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fastvideo_jax.attention._gpu_common import _next_pow2, _pad_axis
from fastvideo_jax.attention.sage import (
    K_BLOCK,
    MASK_VALUE,
    Q_BLOCK,
    SageConfig,
    dequantized_logits,
    p_operand,
    sage_quantize,
)

__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_Q", "int_scores", "sage_triton"]

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64


@dataclasses.dataclass(frozen=True)
class _Static:
    block_q: int
    block_k: int
    num_kv_blocks: int
    has_valid: bool
    has_out_scale: bool
    interpret: bool


def int_scores(q_i8: jax.Array, k_i8: jax.Array) -> jax.Array:
    """(bq, E) int8 x (bk, E) int8 -> (bq, bk) int32: the kernel's integer QK^T (Triton: int8 MMA, int32 acc)."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.dot(q_i8, k_i8, trans_b=True)


def _kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, valid_ref, os_ref, o_ref, *, st: _Static):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q, st.block_k
    E = q_ref.shape[-1]
    q = plgpu.load(q_ref)
    qs = qs_ref[...]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        sl = pl.ds(j * bk, bk)
        s = dequantized_logits(int_scores(q, plgpu.load(k_ref.at[sl, :])), qs, ks_ref[sl])
        if st.has_valid:
            s = jnp.where((valid_ref[sl] != 0)[None, :], s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = alpha * l_prev + jnp.sum(p, axis=-1)
        v = plgpu.load(v_ref.at[sl, :])
        acc = alpha[:, None] * acc + plgpu.dot(p_operand(p, v.dtype), v)  # a fresh fp32 product per block
        return acc, m_next, l_next

    init = (jnp.zeros((bq, E), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, _, l = lax.fori_loop(0, st.num_kv_blocks, body, init)
    out = acc / l[:, None]
    if st.has_out_scale:  # fp8 PV: v_scale / 448 per channel
        out = out * os_ref[...][None, :]
    plgpu.store(o_ref, out.astype(o_ref.dtype))


def _call(x, out_dtype, st: _Static):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    B, Lqp, N, E = x.q.shape
    Lkp = x.k.shape[1]
    blk_q = pl.BlockSpec((None, st.block_q, None, E), lambda i, b, h: (b, i, h, 0))
    full_k = pl.BlockSpec((None, Lkp, None, E), lambda i, b, h: (b, 0, h, 0))
    in_specs = [
        blk_q, full_k, full_k,
        pl.BlockSpec((None, None, st.block_q), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((None, None, Lkp), lambda i, b, h: (b, h, 0)),
        pl.BlockSpec((None, Lkp), lambda i, b, h: (b, 0)) if st.has_valid else None,
        pl.BlockSpec((None, None, E), lambda i, b, h: (b, h, 0)) if st.has_out_scale else None,
    ]
    valid = None if x.valid is None else x.valid.astype(jnp.int32)
    warps = 4 if E <= 64 else 8
    return pl.pallas_call(
        functools.partial(_kernel, st=st), grid=(Lqp // st.block_q, B, N), in_specs=in_specs, out_specs=blk_q,
        out_shape=jax.ShapeDtypeStruct((B, Lqp, N, E), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=3 if E <= 64 else 4),
        interpret=st.interpret, name="sage_attention_fwd",
    )(x.q, x.k, x.v, x.q_scale, x.k_scale, valid, x.out_scale)


def sage_triton(q, k, v, kv_mask=None, scale=None, *, config: SageConfig, pv_dtype=jnp.float16) -> jax.Array:
    """SageAttention on the Triton-lowered Pallas kernel: (B, L, N, E) in and out, any lengths, optional key mask."""
    bq, bk = config.block_q or DEFAULT_BLOCK_Q, config.block_k or DEFAULT_BLOCK_K
    B, Lq, N, E = q.shape
    x = sage_quantize(q, k, v, kv_mask, scale, smooth_k=config.smooth_k, pv_dtype=pv_dtype,
                      q_multiple=math.lcm(Q_BLOCK, bq), k_multiple=math.lcm(K_BLOCK, bk))
    Ep = max(32, _next_pow2(E))
    x = x._replace(q=_pad_axis(x.q, 3, Ep), k=_pad_axis(x.k, 3, Ep), v=_pad_axis(x.v, 3, Ep),
                   out_scale=None if x.out_scale is None else _pad_axis(x.out_scale, 2, Ep))
    st = _Static(bq, bk, x.k.shape[1] // bk, x.valid is not None, x.out_scale is not None, config.interpret)
    return _call(x, q.dtype, st)[:, :Lq, :, :E]
