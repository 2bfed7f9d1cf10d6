"""Normalisations computed in fp32 whatever the input dtype (the output is cast back to the input dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fastvideo_jax.models.layers.linear import make_param


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; ``affine=False`` has no parameters (``scale``/``bias`` otherwise)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, affine: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",)) if affine else None
        self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), param_dtype, ("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=-1, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32, axis_name: str = "norm", rngs: nnx.Rngs):
        self.eps = eps
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), param_dtype, (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
