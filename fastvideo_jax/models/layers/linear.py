"""Linear layers with logical axis names on every parameter.

Parameters follow Flax layout (``kernel`` is ``[in, out]``) and carry their logical axes as ``out_sharding``
metadata; ``fastvideo_jax.parallel.rules`` maps logical names to mesh axes. The matmul runs in the parameter
dtype (inputs are cast to it), as PyTorch modules do, accumulating in fp32. A ``Linear`` may carry a LoRA
adapter (``lora``, see ``models/layers/lora.py``): unless merged into the kernel, its scaled low-rank output is
added in fp32 before the cast.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def make_param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
    """An ``nnx.Param`` initialised by ``init`` and tagged with logical ``axes`` (one per dim)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes))


def _uniform_fan_in(fan_in: int):
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


class Linear(nnx.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = _uniform_fan_in(in_features)
        self.kernel = make_param(rngs, init, (in_features, out_features), param_dtype, axes)
        self.bias = make_param(rngs, init, (out_features,), param_dtype, (axes[1],)) if use_bias else None
        self.lora = None  # a low-rank adapter (models/layers/lora.py) when one is attached

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out)
        kernel = self.kernel[...]
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora is not None and not self.lora.merged:
            y = y + self.lora(x)  # fp32, scaled
        return y.astype(kernel.dtype)


class PatchEmbed3D(nnx.Module):
    """A Conv3d whose stride equals its kernel (non-overlapping patches), run as patchify + one matmul.

    ``kernel`` is stored as a Flax conv kernel ``(pt, ph, pw, C, D)`` so checkpoints convert with the standard
    ``OIDHW -> DHWIO`` transform.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int], *, param_dtype, rngs: nnx.Rngs):
        self.patch_size = tuple(patch_size)
        fan_in = in_channels * math.prod(patch_size)
        init = _uniform_fan_in(fan_in)
        shape = (*self.patch_size, in_channels, dim)
        self.kernel = make_param(rngs, init, shape, param_dtype, (None, None, None, "conv_in", "embed"))
        self.bias = make_param(rngs, init, (dim,), param_dtype, ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, C, F, H, W) -> (B, F', H', W', D)
        return self.project(self.patchify(x))

    def patchify(self, x: jax.Array) -> jax.Array:  # (B, C, F, H, W) -> (B, F', H', W', pt*ph*pw*C)
        B, C, F, H, W = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(B, C, F // pt, pt, H // ph, ph, W // pw, pw)
        x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)  # B F' H' W' pt ph pw C
        return x.reshape(B, F // pt, H // ph, W // pw, pt * ph * pw * C)

    def project(self, x: jax.Array) -> jax.Array:  # (..., pt*ph*pw*C) patches -> (..., D)
        kernel = self.kernel[...]
        w = kernel.reshape(-1, kernel.shape[-1])
        y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(w.dtype)


class MLP(nnx.Module):
    """fc_in -> activation -> fc_out (diffusers' ``FeedForward`` ``net.0.proj`` / ``net.2`` under our names)."""

    def __init__(self, d_in, d_hidden, d_out, act, *, axes_in, axes_out, param_dtype, rngs):
        self.fc_in = Linear(d_in, d_hidden, axes=axes_in, param_dtype=param_dtype, rngs=rngs)
        self.fc_out = Linear(d_hidden, d_out, axes=axes_out, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.fc_out(self.act(self.fc_in(x)))
