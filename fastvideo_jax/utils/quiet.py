"""Silencing known, harmless third-party messages at CLI start-up (narrowly: one message, not a logger)."""

from __future__ import annotations

import logging

__all__ = ["silence_known_noise"]

# transformers logs this when torch is absent; fastvideo_jax uses transformers only for tokenizers and configs.
_NOISE = {"transformers": ("PyTorch was not found",)}


class _DropPrefix(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_noise() -> None:
    """Drop the messages in ``_NOISE`` from their loggers (before those libraries are imported); idempotent."""
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) for f in logger.filters):
            logger.addFilter(_DropPrefix(prefixes))
