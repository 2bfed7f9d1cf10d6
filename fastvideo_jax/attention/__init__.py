from fastvideo_jax.attention.api import AttentionBackend, attention, default_backend, register_backend, resolve_backend
from fastvideo_jax.attention.reference import reference_attention

__all__ = ["AttentionBackend", "attention", "default_backend", "reference_attention", "register_backend", "resolve_backend"]
