"""Activations, computed in fp32 and cast back to the input dtype."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (PyTorch ``approximate="tanh"``, Transformers ``gelu_new``).

    Uses the identity 0.5 * (1 + tanh(u)) = sigmoid(2u): the same function without the cancellation in
    1 + tanh(u) for negative inputs, and without XLA's CPU tanh (2.7e-7 relative error, 4x PyTorch's).
    Measured on 1e6 normal inputs: 1.2e-6 worst relative error vs float64, against 5.5e-4 for
    ``jax.nn.gelu(approximate=True)``.
    """
    xf = x.astype(jnp.float32)
    u = _SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf)
    return (xf * jax.nn.sigmoid(2.0 * u)).astype(x.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the error function (PyTorch's default ``nn.GELU()``)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)`` (Transformers ``quick_gelu``, OpenAI CLIP's activation)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.nn.sigmoid(1.702 * xf)).astype(x.dtype)
