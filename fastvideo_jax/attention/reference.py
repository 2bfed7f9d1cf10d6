"""Pure-jnp attention: the oracle every backend is tested against, and the CPU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(
    q: jax.Array,  # (B, Lq, N, E)
    k: jax.Array,  # (B, Lk, N, E)
    v: jax.Array,  # (B, Lk, N, E)
    kv_mask: jax.Array | None = None,  # (B, Lk) bool, True = attend
    scale: float | None = None,
) -> jax.Array:  # (B, Lq, N, E)
    """Softmax(q k^T * scale) v with fp32 logits and softmax, output in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnqk,bkne->bqne", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
