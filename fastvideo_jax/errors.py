"""Errors a user can act on: bad input, bad checkpoint, bad path, bad flag.

Raise ``UserError`` (or a subclass) with one line that names the key, file, shape or flag at fault. The
``fastvideo-jax`` command prints such an error as ``error: <message>`` and exits 2, without a traceback
(``--debug`` or ``FASTVIDEO_JAX_DEBUG=1`` shows it). Anything else is a bug and keeps its traceback.
``UserError`` subclasses ``ValueError`` so callers that caught ``ValueError`` keep working.
"""

from __future__ import annotations

import os

__all__ = ["UserError", "CheckpointError", "OutputPathError", "NonFiniteError", "debug_env"]


def debug_env() -> bool:
    """``FASTVIDEO_JAX_DEBUG`` is set to something other than empty, 0, false or no: show tracebacks and the
    third-party output that is otherwise held back."""
    return os.environ.get("FASTVIDEO_JAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


class UserError(ValueError):
    """Bad input the user can fix; the message is one line that says what and where."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used as it is: a missing file or folder, an unknown class, a bad tensor."""


class OutputPathError(UserError):
    """An output path that cannot be written (a directory, a missing parent, no space, read-only...)."""


class NonFiniteError(UserError):
    """NaN or Inf where a finished stage must be finite (text embeddings, final latents, decoded video); the
    message names the stage. Weights are checked when they load (``CheckpointError``)."""
