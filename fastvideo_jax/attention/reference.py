"""Pure-jnp attention: the oracle every backend is tested against, and the CPU path.

Small calls compute the (B, N, Lq, Lk) logits at once. Above ``DENSE_MAX_LOGITS`` logits (64 MiB in fp32) the
same softmax runs blocked, never holding more than one (q block x kv block) tile of logits per head: a
``lax.map`` over q blocks, each a ``lax.scan`` over kv blocks with an online softmax (running max, sum and
fp32 accumulator). Lengths that the blocks do not divide get one smaller last block (no padding), so both paths
compute the same function: equal within fp32 rounding, masks included (a key mask applies per kv block; a
query whose keys are all masked averages every value, as the dense softmax over equal logits does).

The blocked path is differentiable; each q block is rematerialised in the backward pass
(``jax.checkpoint``), so gradients hold O(block_q x Lk) logits at a time, not O(Lq x Lk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["BLOCK_K", "BLOCK_Q", "DENSE_MAX_LOGITS", "reference_attention"]

DENSE_MAX_LOGITS = 1 << 24  # B * N * Lq * Lk above which the reference runs blocked
BLOCK_Q = 512
BLOCK_K = 512
_MASKED = float(jnp.finfo(jnp.float32).min)


def reference_attention(
    q: jax.Array,  # (B, Lq, N, E)
    k: jax.Array,  # (B, Lk, N, E)
    v: jax.Array,  # (B, Lk, N, E)
    kv_mask: jax.Array | None = None,  # (B, Lk) bool, True = attend
    scale: float | None = None,
    *,
    block_q: int | None = None,  # force the blocked path with these blocks (default: by size)
    block_k: int | None = None,
) -> jax.Array:  # (B, Lq, N, E)
    """Softmax(q k^T * scale) v with fp32 logits and softmax, output in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, Lq, N, _ = q.shape
    Lk = k.shape[1]
    mask = None if kv_mask is None else kv_mask.astype(bool)
    if block_q is None and block_k is None and B * N * Lq * Lk <= DENSE_MAX_LOGITS:
        return _dense(q, k, v, mask, scale)
    return _blocked(q, k, v, mask, scale, min(block_q or BLOCK_Q, Lq), min(block_k or BLOCK_K, Lk))


def _dense(q, k, v, mask, scale):
    logits = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnqk,bkne->bqne", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _split(x: jax.Array, block: int):
    """(B, L, ...) -> full blocks stacked first (L // block, B, block, ...) and the remainder (B, L % block, ...)."""
    n = x.shape[1] // block
    full = jnp.moveaxis(x[:, : n * block].reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)
    rest = x[:, n * block:] if x.shape[1] % block else None
    return full, rest


def _blocked(q, k, v, mask, scale, block_q: int, block_k: int):
    B, Lq, N, E = q.shape
    k_full, k_rest = _split(k, block_k)
    v_full, v_rest = _split(v, block_k)
    m_full, m_rest = (None, None) if mask is None else _split(mask, block_k)

    def kv_step(qi, carry, kvm):
        m, l, acc = carry  # (B, N, bq), (B, N, bq), (B, bq, N, E) fp32
        kb, vb, mb = kvm
        s = jnp.einsum("bqne,bkne->bnqk", qi, kb, preferred_element_type=jnp.float32) * scale
        if mb is not None:
            s = jnp.where(mb[:, None, None, :], s, _MASKED)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * alpha + p.sum(-1)
        pv = jnp.einsum("bnqk,bkne->bqne", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + pv
        return m_new, l, acc

    @jax.checkpoint
    def q_block(qi):  # (B, bq, N, E) -> (B, bq, N, E)
        bq = qi.shape[1]
        carry = (jnp.full((B, N, bq), _MASKED, jnp.float32), jnp.zeros((B, N, bq), jnp.float32),
                 jnp.zeros((B, bq, N, E), jnp.float32))
        if k_full.shape[0]:
            carry, _ = jax.lax.scan(lambda c, x: (kv_step(qi, c, x), None), carry, (k_full, v_full, m_full))
        if k_rest is not None:
            carry = kv_step(qi, carry, (k_rest, v_rest, m_rest))
        _, l, acc = carry
        return (acc / jnp.swapaxes(l, 1, 2)[..., None]).astype(q.dtype)

    q_full, q_rest = _split(q, block_q)
    out = jnp.moveaxis(jax.lax.map(q_block, q_full), 0, 1).reshape(B, -1, N, E)
    if q_rest is not None:
        out = jnp.concatenate([out, q_block(q_rest)], axis=1)
    return out
