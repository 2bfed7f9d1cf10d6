"""The persistent XLA compilation cache, on by default, so a second process skips recompiling."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from fastvideo_jax.errors import UserError

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
    directory = Path(setting).expanduser() if setting else default_dir
    where = f"{_ENV}={setting}" if setting else "the default compilation cache"
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{where}: {directory} is not a directory (set a directory, or 0 to turn the cache off)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{where}: cannot create {directory} ({e.strerror or e}); set a writable directory, "
                        "or 0 to turn the cache off") from None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    logger.info("persistent compilation cache: %s", directory)
    return directory
