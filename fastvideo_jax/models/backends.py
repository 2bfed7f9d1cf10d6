"""The attention-backend check every model class shares: a backend it does not list is refused by name."""

from __future__ import annotations

from typing import Any

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.errors import UserError

__all__ = ["UnsupportedBackendError", "check_attention_backend"]


class UnsupportedBackendError(UserError):
    """An attention backend this model does not implement was requested."""


def check_attention_backend(model_cls: type, requested: Any) -> AttentionBackend | None:
    """The parsed backend (None = the model's default) if ``model_cls._supported_attention_backends`` lists it,
    else ``UnsupportedBackendError`` naming the model, the request and what it supports (before any weight is read:
    models call this in ``__init__``, which the loader runs abstractly first)."""
    try:
        backend = AttentionBackend.parse(requested)
    except ValueError as e:
        raise UnsupportedBackendError(f"{model_cls.__name__}: {e}") from None
    supported = model_cls._supported_attention_backends
    if backend is not None and backend not in supported:
        names = sorted(b.value for b in supported)
        raise UnsupportedBackendError(f"{model_cls.__name__} does not support attention backend {backend.value!r}; "
                                      f"it supports {names}")
    return backend
