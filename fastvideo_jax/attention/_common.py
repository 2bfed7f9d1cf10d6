"""Small helpers shared by the attention backends: platform, one-time warnings, scoped defaults, padding."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Generic, TypeVar

import jax

T = TypeVar("T")

logger = logging.getLogger("fastvideo_jax.attention")


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``x`` (padding lengths to kernel blocks)."""
    return -(-x // m) * m


def platform() -> str:
    """"gpu", "tpu" or "cpu": the platform of the default device."""
    return jax.devices()[0].platform


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    logger.warning(message)


def _make_user_context(default):
    make = getattr(jax, "make_user_context", None)
    if make is None:  # pragma: no cover - older jax keeps it private
        from jax._src.config import make_user_context as make
    return make(default)


class ScopedValue(Generic[T]):
    """A default that a ``with value.scope(x):`` block replaces (innermost wins, per thread).

    The value lives in a JAX user context, which is part of every jit cache key: a jitted function that read
    it while tracing is retraced (and recompiled) when it is called under a different value, so a kernel
    never keeps a stale block size. Values must be hashable (the configs are frozen dataclasses).
    """

    def __init__(self, default: T):
        hash(default)
        self._default = default
        self._context = _make_user_context(None)  # None: not inside any scope

    def current(self) -> T:
        value = self._context.value
        return self._default if value is None else value

    @contextlib.contextmanager
    def scope(self, value: T) -> Iterator[T]:
        hash(value)  # a clear TypeError here rather than inside jit's cache lookup
        with self._context(value):
            yield value
