"""Pieces shared by the GPU Pallas kernels (``pallas_gpu`` and ``block_sparse_gpu``).

The Triton config and its scope (used by the block-sparse kernel, dense or sparse tables), the softmax
constants, and small padding / power-of-two helpers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.attention._common import ScopedValue

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _pad_axis(x: jax.Array, axis: int, new: int) -> jax.Array:
    extra = new - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch options for our Triton-lowered block-sparse flash kernel (dense and STA).

    Blocks must be powers of two >= 16 (Triton tensor shapes, ``tl.dot`` minimum); backward blocks default to
    min(64, forward block) and must divide the forward blocks.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    interpret: bool = False

    def __post_init__(self):
        if self.block_q_bwd is None:
            object.__setattr__(self, "block_q_bwd", min(64, self.block_q))
        if self.block_k_bwd is None:
            object.__setattr__(self, "block_k_bwd", min(64, self.block_k))
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            b = getattr(self, name)
            if not _is_pow2(b) or b < 16:
                raise ValueError(f"TritonConfig.{name}={b} must be a power of two >= 16")
        if self.block_q % self.block_q_bwd or self.block_k % self.block_k_bwd:
            raise ValueError("backward blocks must divide the forward blocks (one padding serves both passes)")

    @property
    def multiple(self) -> int:
        return max(self.block_q, self.block_k)


_TRITON_CONFIG = ScopedValue(TritonConfig())
current_triton_config = _TRITON_CONFIG.current
# Config used by the registered PALLAS_GPU_TRITON backend (e.g. ``interpret=True`` in CPU tests).
triton_config_scope = _TRITON_CONFIG.scope
