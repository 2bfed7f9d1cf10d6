"""Precision names used in configs ("fp32", "bf16", "fp16") and their JAX dtypes."""

from __future__ import annotations

import jax.numpy as jnp

PRECISION_TO_DTYPE = {
    "fp32": jnp.float32,
    "float32": jnp.float32,
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "fp16": jnp.float16,
    "float16": jnp.float16,
}


def to_dtype(precision: str | jnp.dtype) -> jnp.dtype:
    """``"bf16"`` -> ``jnp.bfloat16``; a dtype passes through; anything else is a clear error."""
    if isinstance(precision, str):
        try:
            return jnp.dtype(PRECISION_TO_DTYPE[precision])
        except KeyError:
            raise ValueError(f"unknown precision {precision!r}; use one of {sorted(PRECISION_TO_DTYPE)}") from None
    return jnp.dtype(precision)
