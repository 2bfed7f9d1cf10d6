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


class ScopedValue(Generic[T]):
    """A default that a ``with value.scope(x):`` block replaces (innermost wins); not thread-local."""

    def __init__(self, default: T):
        self._stack = [default]

    def current(self) -> T:
        return self._stack[-1]

    @contextlib.contextmanager
    def scope(self, value: T) -> Iterator[T]:
        self._stack.append(value)
        try:
            yield value
        finally:
            self._stack.pop()
