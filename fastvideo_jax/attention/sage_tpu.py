"""SageAttention on TPU: a Pallas Mosaic TPU kernel (int8 x int8 -> int32 on the MXU, v5e and later).

Same arithmetic as ``sage`` / ``sage_gpu`` (quantisation in XLA by ``sage.sage_quantize``); the kernel is the
usual TPU flash layout: grid (batch, head, q block, kv block) with the kv axis innermost ("arbitrary") and the
running max / sum / fp32 accumulator in VMEM scratch, one (block_q x block_k) tile of logits at a time:

    S_int32 = dot_general(Q_int8, K_int8, contract E, int32)   S = (S_int32 * q_scale) * k_scale
    online softmax with exp2 in fp32; acc += P.astype(pv dtype) @ V (fp32 accumulation; bf16 by default here)

Layout: (B, N, L, E) inside, head dim zero-padded to a multiple of 128 lanes; per-token scales as (L, 1) /
(1, L) columns and rows so they broadcast onto the logits tile without a relayout. Tiles default to 256 query x
512 key tokens (multiples of Sage's quantisation blocks); ``SageConfig.block_q`` must be a multiple of 32 (int8
sublane packing) and ``block_k`` of 128. Not yet compiled on a TPU (no TPU was lent to this work): it runs in
Pallas interpret mode on CPU, where it equals the jnp reference. Forward only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from fastvideo_jax.attention._common import round_up
from fastvideo_jax.attention.sage import K_BLOCK, MASK_VALUE, Q_BLOCK, SageConfig, p_operand, sage_quantize

__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_Q", "int_scores", "sage_mosaic_tpu"]

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512
LANES = 128
_NT = (((1,), (1,)), ((), ()))  # contract the last dims of both operands: A @ B^T


@dataclasses.dataclass(frozen=True)
class _Static:
    block_q: int
    block_k: int
    has_valid: bool
    interpret: bool


def int_scores(q_i8: jax.Array, k_i8: jax.Array) -> jax.Array:
    """(bq, E) int8 x (bk, E) int8 -> (bq, bk) int32: the kernel's integer QK^T (an int8 MXU matmul)."""
    return jax.lax.dot_general(q_i8, k_i8, _NT, preferred_element_type=jnp.int32)


def _kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, valid_ref, o_ref, m_sc, l_sc, acc_sc, *, st: _Static):
    from jax.experimental import pallas as pl

    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    # (bq, 1) then (1, bk) scales, in sage.dequantized_logits' order
    s = int_scores(q_ref[...], k_ref[...]).astype(jnp.float32) * qs_ref[...] * ks_ref[...]
    if st.has_valid:
        s = jnp.where(valid_ref[...] != 0, s, MASK_VALUE)
    m_prev, l_prev = m_sc[...], l_sc[...]  # (bq, LANES), every lane equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, :1])
    l_sc[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_sc[...] = m_next
    v = v_ref[...]
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + jax.lax.dot_general(
        p_operand(p, v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        o_ref[...] = (acc_sc[...] / l_sc[...][:, :1]).astype(o_ref.dtype)


def _call(q, k, v, qs, ks, valid, out_dtype, st: _Static):
    """q/k int8 (B, N, L, E); v (B, N, Lk, E); qs (B, N, Lq, 1); ks (B, N, 1, Lk); valid int32 (B, 1, Lk) | None."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, N, Lqp, E = q.shape
    Lkp = k.shape[2]
    bq, bk = st.block_q, st.block_k
    in_specs = [
        pl.BlockSpec((None, None, bq, E), lambda b, h, i, j: (b, h, i, 0)),
        pl.BlockSpec((None, None, bk, E), lambda b, h, i, j: (b, h, j, 0)),
        pl.BlockSpec((None, None, bk, E), lambda b, h, i, j: (b, h, j, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0)),
        pl.BlockSpec((None, None, 1, bk), lambda b, h, i, j: (b, h, 0, j)),
        pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, j)) if st.has_valid else None,
    ]
    return pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(B, N, Lqp // bq, Lkp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, E), lambda b, h, i, j: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, N, Lqp, E), out_dtype),
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, E), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret, name="sage_attention_tpu_fwd",
    )(q, k, v, qs, ks, valid)


def sage_mosaic_tpu(q, k, v, kv_mask=None, scale=None, *, config: SageConfig, pv_dtype=jnp.bfloat16) -> jax.Array:
    """SageAttention on the Mosaic TPU kernel: (B, L, N, E) in and out, any lengths, optional key mask."""
    bq, bk = config.block_q or DEFAULT_BLOCK_Q, config.block_k or DEFAULT_BLOCK_K
    if bq % 32 or bk % LANES:
        raise ValueError(f"sage_mosaic_tpu: block_q={bq} must be a multiple of 32 and block_k={bk} of {LANES}")
    if jnp.dtype(pv_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"sage_mosaic_tpu: PV dtype {jnp.dtype(pv_dtype)} unsupported (bf16 or fp16)")
    B, Lq, N, E = q.shape
    x = sage_quantize(q, k, v, kv_mask, scale, smooth_k=config.smooth_k, pv_dtype=pv_dtype,
                      q_multiple=math.lcm(Q_BLOCK, bq), k_multiple=math.lcm(K_BLOCK, bk))
    Ep = round_up(E, LANES)

    def heads_first(t):  # (B, L, N, E) -> (B, N, L, Ep)
        t = jnp.swapaxes(t, 1, 2)
        return jnp.pad(t, ((0, 0), (0, 0), (0, 0), (0, Ep - E)))

    valid = None if x.valid is None else x.valid.astype(jnp.int32)[:, None, :]
    st = _Static(bq, bk, valid is not None, config.interpret)
    out = _call(heads_first(x.q), heads_first(x.k), heads_first(x.v), x.q_scale[..., None], x.k_scale[:, :, None, :],
                valid, q.dtype, st)
    return jnp.swapaxes(out, 1, 2)[:, :Lq, :, :E]
