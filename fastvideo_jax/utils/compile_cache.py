"""The persistent XLA compilation cache, on by default, so a second process skips recompiling."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

logger = logging.getLogger(__name__)
_ENV = "FASTVIDEO_JAX_COMPILATION_CACHE"  # a directory, or "0" to leave the cache off


def enable_persistent_cache(default_dir: Path) -> Path | None:
    """Point JAX's compilation cache at ``$FASTVIDEO_JAX_COMPILATION_CACHE`` or ``default_dir``, unless the
    variable is "0" or the user configured a cache already. Returns the directory in use (None when off)."""
    setting = os.environ.get(_ENV, "")
    if setting == "0":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    directory = Path(setting) if setting else default_dir
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    logger.info("persistent compilation cache: %s", directory)
    return directory
