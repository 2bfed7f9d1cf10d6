"""Dense attention through tokamax (``tokamax.dot_product_attention``), the maintained Pallas kernel library
that supersedes JAX's deprecated ``pallas.ops.gpu.attention``: Mosaic-GPU / Triton / cuDNN kernels on GPU and
Mosaic-TPU on TPU, picked by tokamax (or pinned with ``TokamaxConfig.implementation``).

Optional: tokamax needs Python >= 3.12 and jax >= 0.11.1 (``pip install "fastvideo-jax[tokamax]"``). Where it
is missing the capability check says so and a request for it falls back (logged) like any other backend. It is
not a platform default until the device benchmarks show it ahead of ours (``benchmarks/attention.py`` times
each of its implementations next to ours).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fastvideo_jax.attention._common import ScopedValue, platform

IMPLEMENTATIONS = ("mosaic", "triton", "cudnn", "xla", "xla_chunked")


@dataclasses.dataclass(frozen=True)
class TokamaxConfig:
    """``implementation``: None lets tokamax choose; else one of ``IMPLEMENTATIONS``."""

    implementation: str | None = None

    def __post_init__(self):
        if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"TokamaxConfig.implementation must be None or one of {IMPLEMENTATIONS}, "
                             f"got {self.implementation!r}")


_CONFIG = ScopedValue(TokamaxConfig())
current_tokamax_config = _CONFIG.current
tokamax_config_scope = _CONFIG.scope


@functools.lru_cache(maxsize=1)
def _module():
    try:
        import tokamax
    except Exception as e:  # missing, or an install that does not import on this jax
        return f"tokamax is not importable ({type(e).__name__}: {e}); it needs Python >= 3.12 and jax >= 0.11.1"
    return tokamax


def check_tokamax(q, k, v, kv_mask=None) -> str | None:
    mod = _module()
    if isinstance(mod, str):
        return mod
    if platform() not in ("gpu", "tpu"):
        return f"needs a GPU or TPU (platform is {platform()})"
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"dtype {q.dtype} unsupported"
    return None


def tokamax_attention(q, k, v, kv_mask=None, scale=None, *, config: TokamaxConfig | None = None) -> jax.Array:
    """(B, Lq, N, E) in and out, as every backend; ``kv_mask`` (B, Lk) bool, True = attend."""
    config = config or current_tokamax_config()
    mask = None if kv_mask is None else kv_mask[:, None, None, :]  # broadcast over heads and queries
    return _module().dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=config.implementation)
