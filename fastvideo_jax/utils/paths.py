"""Where fastvideo_jax keeps its files: one cache directory (tiny demo checkpoint, compilation cache)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "give_ordinary_mode"]


def cache_dir() -> Path:
    """``$FASTVIDEO_JAX_CACHE/fastvideo_jax``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, plus ``fastvideo_jax``."""
    base = os.environ.get("FASTVIDEO_JAX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(base) / "fastvideo_jax"


def give_ordinary_mode(path: str | os.PathLike) -> None:
    """The permissions a plainly created file or folder would have (0666 / 0777 less the umask).

    ``tempfile.mkstemp`` / ``mkdtemp`` make private (0600 / 0700) entries; an output written under a temporary
    name and renamed into place must not keep them."""
    mask = os.umask(0)
    os.umask(mask)
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~mask)
