"""Timestep and rotary position embeddings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:  # (...) -> (..., dim)
    """Sinusoidal embedding of every entry of ``t`` ((B,) or per token (B, L)), cosine half first
    (``flip_sin_to_cos=True``, ``downscale_freq_shift=0``)."""
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head dim over (frame, height, width): height and width get 2*(E//6) each."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(dim: int, max_len: int, theta: float) -> np.ndarray:  # (max_len, dim/2), float64
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return np.outer(np.arange(max_len, dtype=np.float64), inv)


def rope_3d_tables(
    head_dim: int, grid: tuple[int, int, int], max_len: int, theta: float = 10000.0,
    axis_dims: tuple[int, int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:  # cos, sin: (L, E/2) fp32, L = F*H*W in row-major order
    """Per-token rotation cos/sin for a (F, H, W) token grid. ``axis_dims``: how many of the head dim's channels
    each of (frame, height, width) rotates (default Wan's split, ``rope_axis_dims``; HunyuanVideo's
    ``rope_axes_dim`` e.g. (16, 56, 56)).

    Angles and their cos/sin are computed in float64 per axis (small constant tables) and stored in fp32; the
    per-token tables are broadcast from them inside the traced program, so no L-sized constant is embedded.
    """
    F, H, W = grid
    if max(grid) > max_len:
        raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={max_len}")
    dims = rope_axis_dims(head_dim) if axis_dims is None else tuple(axis_dims)
    if sum(dims) != head_dim or any(d % 2 for d in dims):
        raise ValueError(f"rope axis dims {dims} must be even and sum to the head dim {head_dim}")
    angles = [_axis_angles(d, max_len, theta)[:n] for d, n in zip(dims, grid)]

    def expand(tables: list[np.ndarray]) -> jax.Array:
        t, h, w = (jnp.asarray(a, jnp.float32) for a in tables)
        full = jnp.concatenate(
            [
                jnp.broadcast_to(t[:, None, None, :], (F, H, W, t.shape[-1])),
                jnp.broadcast_to(h[None, :, None, :], (F, H, W, h.shape[-1])),
                jnp.broadcast_to(w[None, None, :, :], (F, H, W, w.shape[-1])),
            ],
            axis=-1,
        )
        return full.reshape(F * H * W, head_dim // 2)

    return expand([np.cos(a) for a in angles]), expand([np.sin(a) for a in angles])


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, L, N, E) by per-token angles (L, E/2), in fp32."""
    pairs = rearrange(x.astype(jnp.float32), "b l n (e two) -> b l n e two", two=2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return rearrange(out, "b l n e two -> b l n (e two)").astype(x.dtype)
