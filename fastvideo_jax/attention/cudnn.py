"""Dense attention through cuDNN's fused flash kernel (``jax.nn.dot_product_attention``).

cuDNN runs markedly faster on sequence lengths that are multiples of 128 (measured on H200: 567 TFLOP/s at
32760 tokens, 674 at 32768), so q and k/v are zero-padded up to the next multiple and the padded keys are
masked out through ``key_value_seq_lengths``; padded query rows are sliced off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_MULTIPLE = 128


def _pad_len(x: jax.Array, multiple: int) -> jax.Array:
    extra = -x.shape[1] % multiple
    return x if extra == 0 else jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))


def cudnn_attention(
    q: jax.Array,  # (B, Lq, N, E)
    k: jax.Array,  # (B, Lk, N, E)
    v: jax.Array,
    kv_mask: jax.Array | None = None,  # (B, Lk) bool; must be a prefix mask (valid tokens first)
    scale: float | None = None,
    pad_multiple: int = PAD_MULTIPLE,
    implementation: str = "cudnn",  # "xla" runs the same padding/masking path on any platform (tests)
) -> jax.Array:
    B, Lq = q.shape[:2]
    Lk = k.shape[1]
    if kv_mask is None:
        kv_len = jnp.full((B,), Lk, jnp.int32)
    else:
        kv_len = kv_mask.sum(axis=-1).astype(jnp.int32)
    qp, kp, vp = (_pad_len(t, pad_multiple) for t in (q, k, v))
    padded = kp.shape[1] != Lk or kv_mask is not None
    out = jax.nn.dot_product_attention(
        qp, kp, vp, scale=scale,
        key_value_seq_lengths=kv_len if padded else None,
        implementation=implementation,
    )
    return out[:, :Lq]
