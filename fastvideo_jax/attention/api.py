"""One attention op, many backends: chosen by enum, checked for capability, with a logged fallback.

Model code calls ``attention(q, k, v, backend=...)`` and never names a kernel. Each backend declares what it
can run (platform, dtype, head dim, lengths); asking for one that cannot run this call falls back to the
pure-jnp reference with a warning, never an error deep inside a kernel. New backends register themselves with
``register_backend`` and need no model change.

Key masks come in two forms: ``kv_mask`` (B, Lk) bool, any pattern, and ``kv_lengths`` (B,) int, a prefix
(padding) mask: keys [0, kv_lengths[b]) are valid. A mask is traced under jit, so whether it is a prefix cannot
be seen; callers that pad (text, sequence-parallel padding) pass lengths. Backends that take lengths natively
(cuDNN) get them; every other backend gets the equivalent boolean mask. cuDNN refuses ``kv_mask``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fastvideo_jax.attention import pallas_gpu, sage, splash_tpu, tokamax_dpa
from fastvideo_jax.attention._common import platform, warn_once
from fastvideo_jax.attention.cudnn import cudnn_attention
from fastvideo_jax.attention.reference import reference_attention


__all__ = ["AttentionBackend", "attention", "register_backend", "resolve_backend", "default_backend"]


class AttentionBackend(enum.Enum):
    REFERENCE = "reference"
    CUDNN = "cudnn"
    SPLASH_TPU = "splash_tpu"  # TPU splash (Pallas Mosaic TPU); interpret mode via splash_tpu.config_scope
    PALLAS_GPU_TRITON = "pallas_gpu_triton"  # Pallas flash kernel lowered through Triton (any CUDA GPU)
    PALLAS_GPU_MOSAIC = "pallas_gpu_mosaic"  # Pallas Mosaic-GPU FlashAttention-3 (Hopper sm90)
    TOKAMAX = "tokamax"  # tokamax.dot_product_attention (optional package; GPU and TPU)
    # FastVideo's names, where they map onto ours (its ``FASTVIDEO_ATTENTION_BACKEND`` values, any case):
    TORCH_SDPA = "torch_sdpa"  # = REFERENCE: the plain, always-available implementation
    FLASH_ATTN = "flash_attn"  # the platform's fused flash kernel: cuDNN (Pallas Triton for fp32) on GPU, splash on TPU
    SAGE_ATTN = "sage_attn"  # 8-bit SageAttention (int8 QK^T, fp16 PV), forward only: ``sage.sage_config_scope``
    # Sliding-tile attention is not a dense backend: it needs the token grid and windows, so it is its own op,
    # ``sliding_tile_attention(q, k, v, grid=..., window=..., backend=<a dense one or None>)``; a DiT that
    # supports it takes SLIDING_TILE_ATTN as its ``attention_backend``.
    SLIDING_TILE_ATTN = "sliding_tile_attn"
    # Video sparse attention (FastVideo's VIDEO_SPARSE_ATTN, FastWan's training mode) is not a dense backend either:
    # ``video_sparse_attention(q, k, v, gate, grid=..., sparsity=...)``; "video_sparse" parses to it.
    VIDEO_SPARSE_ATTN = "video_sparse_attn"

    @classmethod
    def parse(cls, value: "AttentionBackend | str | None") -> "AttentionBackend | None":
        if value is None or isinstance(value, cls):
            return value
        if str(value).lower() == "sliding_tile":
            raise ValueError("'sliding_tile' is not a dense attention backend: call sliding_tile_attention(q, k, v, "
                             "grid=..., window=...) (the Wan DiT: self_attention_backend='sliding_tile')")
        if str(value).lower() == "video_sparse":
            return cls.VIDEO_SPARSE_ATTN
        try:
            return cls(value.lower())
        except ValueError:
            raise ValueError(f"unknown attention backend {value!r}; backends: {[b.value for b in cls]}") from None


# A capability check returns None when the backend can run the call, else the reason it cannot.
Check = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | None"], "str | None"]


@dataclass(frozen=True)
class _Backend:
    fn: Callable[..., jax.Array]
    check: Check
    takes_lengths: bool  # fn(q, k, v, kv_lengths=..., scale=...) instead of fn(q, k, v, kv_mask=..., scale=...)


_BACKENDS: dict[AttentionBackend, _Backend] = {}


def register_backend(backend: AttentionBackend, fn: Callable[..., jax.Array], check: Check, *,
                     takes_lengths: bool = False) -> None:
    """``fn(q, k, v, kv_mask=..., scale=...)``, or with ``takes_lengths`` ``fn(q, k, v, kv_lengths=..., scale=...)``;
    ``check(q, k, v, kv_mask)`` returns None when it can run the call (``kv_mask`` is None for length masks)."""
    _BACKENDS[backend] = _Backend(fn, check, takes_lengths)


def _check_cudnn(q, k, v, kv_mask) -> str | None:
    if platform() != "gpu":
        return f"needs a GPU (platform is {platform()})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bf16/fp16 inputs (got {q.dtype})"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"head dim {q.shape[-1]} unsupported (multiple of 8, at most 256)"
    if kv_mask is not None:
        return "cuDNN masks keys by length only: a (B, Lk) kv_mask is refused; pass kv_lengths for a prefix mask"
    return None


register_backend(AttentionBackend.REFERENCE, reference_attention, lambda q, k, v, m: None)
register_backend(AttentionBackend.CUDNN, cudnn_attention, _check_cudnn, takes_lengths=True)
register_backend(AttentionBackend.SPLASH_TPU, splash_tpu.splash_attention, splash_tpu.check_splash)
register_backend(AttentionBackend.PALLAS_GPU_TRITON, pallas_gpu.triton_attention, pallas_gpu.check_triton)
register_backend(AttentionBackend.PALLAS_GPU_MOSAIC, pallas_gpu.mosaic_attention, pallas_gpu.check_mosaic)
register_backend(AttentionBackend.TOKAMAX, tokamax_dpa.tokamax_attention, tokamax_dpa.check_tokamax)
register_backend(AttentionBackend.SAGE_ATTN, sage.sage_attention, sage.check_sage)


# Per platform, the dense backends to try in order when none is requested (e.g. fp32 on a GPU, which cuDNN
# refuses, runs on the Pallas flash kernel instead of materialising the logits).
_PLATFORM_DEFAULTS = {
    "gpu": (AttentionBackend.CUDNN, AttentionBackend.PALLAS_GPU_TRITON),
    "tpu": (AttentionBackend.SPLASH_TPU,),
}


def default_backend() -> AttentionBackend:
    """The platform's best dense backend: cuDNN on GPU, splash on TPU, the reference elsewhere."""
    return _PLATFORM_DEFAULTS.get(platform(), (AttentionBackend.REFERENCE,))[0]


def _reason(backend: AttentionBackend, q, k, v, kv_mask) -> str | None:
    entry = _BACKENDS.get(backend)
    return "not available in this build" if entry is None else entry.check(q, k, v, kv_mask)


def resolve_backend(requested, q, k, v, kv_mask=None) -> AttentionBackend:
    """The backend that will run this call. Requested: that one if capable, else the reference (logged).
    Not requested: the platform's first capable backend, else the reference. FLASH_ATTN is the platform's
    first capable fused kernel (logged fallback to the reference when there is none); TORCH_SDPA the reference."""
    backend = AttentionBackend.parse(requested)
    if backend is AttentionBackend.SLIDING_TILE_ATTN:
        raise ValueError("SLIDING_TILE_ATTN is not a dense attention backend: call sliding_tile_attention(q, k, v, "
                         "grid=..., window=...)")
    if backend is AttentionBackend.VIDEO_SPARSE_ATTN:
        raise ValueError("VIDEO_SPARSE_ATTN is not a dense attention backend: call video_sparse_attention(q, k, v, "
                         "gate, grid=..., sparsity=...)")
    if backend is AttentionBackend.TORCH_SDPA:
        return AttentionBackend.REFERENCE
    if backend is AttentionBackend.FLASH_ATTN:
        fused = [b for b in _PLATFORM_DEFAULTS.get(platform(), ()) if _reason(b, q, k, v, kv_mask) is None]
        if fused:
            return fused[0]
        warn_once(f"attention backend flash_attn: no fused kernel can run this call on {platform()}; "
                  "falling back to reference")
        return AttentionBackend.REFERENCE
    if backend is None:
        candidates = _PLATFORM_DEFAULTS.get(platform(), ())
        return next((b for b in candidates if _reason(b, q, k, v, kv_mask) is None), AttentionBackend.REFERENCE)
    entry = _BACKENDS.get(backend)
    reason = "not available in this build" if entry is None else entry.check(q, k, v, kv_mask)
    if reason is None:
        return backend
    warn_once(f"attention backend {backend.value} cannot run this call ({reason}); falling back to reference")
    return AttentionBackend.REFERENCE


def attention(
    q: jax.Array,  # (B, Lq, N, E)
    k: jax.Array,  # (B, Lk, N, E)
    v: jax.Array,  # (B, Lk, N, E)
    kv_mask: jax.Array | None = None,  # (B, Lk) bool, True = attend
    *,
    kv_lengths: jax.Array | None = None,  # (B,) int: keys [0, kv_lengths[b]) attend (>= 1); excludes kv_mask
    backend: AttentionBackend | str | None = None,
    scale: float | None = None,
) -> jax.Array:  # (B, Lq, N, E)
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q (B,Lq,N,E), k/v (B,Lk,N,E); got {q.shape}, {k.shape}, {v.shape}")
    B, Lk = k.shape[:2]
    if kv_mask is not None and kv_lengths is not None:
        raise ValueError("attention: pass kv_mask or kv_lengths, not both")
    if kv_mask is not None and tuple(kv_mask.shape) != (B, Lk):
        raise ValueError(f"attention: kv_mask must be (B, Lk) = {(B, Lk)}, got {tuple(kv_mask.shape)}")
    if kv_lengths is not None and tuple(jnp.shape(kv_lengths)) != (B,):
        raise ValueError(f"attention: kv_lengths must be (B,) = {(B,)}, got {tuple(jnp.shape(kv_lengths))}")
    entry = _BACKENDS[resolve_backend(backend, q, k, v, kv_mask)]
    if entry.takes_lengths:
        if kv_mask is not None:
            raise ValueError(f"attention backend {backend} takes kv_lengths only, and its check accepted a kv_mask")
        return entry.fn(q, k, v, kv_lengths=kv_lengths, scale=scale)
    if kv_lengths is not None:
        kv_mask = jnp.arange(Lk)[None, :] < jnp.asarray(kv_lengths)[:, None]
    return entry.fn(q, k, v, kv_mask=kv_mask, scale=scale)
