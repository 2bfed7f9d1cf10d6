"""Where fastvideo_jax keeps its files: one cache directory (tiny demo checkpoint, compilation cache)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$FASTVIDEO_JAX_CACHE/fastvideo_jax``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, plus ``fastvideo_jax``."""
    base = os.environ.get("FASTVIDEO_JAX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(base) / "fastvideo_jax"
