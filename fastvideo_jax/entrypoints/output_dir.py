"""Writing a whole output directory safely: never into its source, never over something unchecked.

The steps ``fastvideo-jax convert`` takes, each usable on its own:

* ``check_separate(src, dst)``: refuse DST == SRC, DST inside SRC and SRC inside DST, compared as resolved real
  paths (``..``, symlinked parents) and as the same directory under another name (bind mounts).
* ``DirLock(dst)``: an exclusive ``flock`` on ``.DST.lock`` beside DST, so two runs into one DST never overlap.
* ``clean_stale(dst)``: ``.DST.partial-<pid>-*`` folders of runs whose process is gone are removed (logged);
  a ``.DST.old-<pid>`` left between the two renames of an interrupted replace is put back (or removed when a
  newer DST is in place).
* ``publish(tmp, dst, expected)``: the finished folder becomes DST by an atomic rename that never replaces
  what it did not check: ``renameat2(RENAME_NOREPLACE)`` for a new DST, ``RENAME_EXCHANGE`` for a replaced one
  (the old DST stays until the new one is in place). Where ``renameat2`` is missing (not Linux, old libc, a
  filesystem without it) the fallback checks under the lock, then renames.
* ``terminate_as_interrupt()``: SIGTERM raises ``KeyboardInterrupt``, so the same cleanup runs as for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from fastvideo_jax.errors import OutputPathError

__all__ = ["DirLock", "check_separate", "clean_stale", "identity", "partial_prefix", "publish",
           "terminate_as_interrupt"]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def check_separate(src: Path, dst: Path) -> None:
    """Refuse a DST that is SRC, lies inside SRC or contains SRC, however either is spelled."""
    s, d = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    named = f"SRC {src} (real path {s}) and DST {dst} (real path {d})"
    if s == d:
        raise OutputPathError(f"{named} are the same directory; convert never writes into its source")
    if d.is_relative_to(s) or any(a.exists() and os.path.samefile(a, s) for a in (d, *d.parents)):
        raise OutputPathError(f"{named}: DST is inside SRC; convert never writes into its source")
    if s.is_relative_to(d) or (d.exists() and any(os.path.samefile(a, d) for a in (s, *s.parents))):
        raise OutputPathError(f"{named}: SRC is inside DST; replacing DST would delete the source")


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself (not following a final symlink), or None when nothing is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class DirLock:
    """Exclusive lock on ``.DST.lock`` beside DST, held across the whole run; refuses at once when taken."""

    def __init__(self, dst: Path):
        self.dst = dst
        self.path = dst.with_name(f".{dst.name}.lock")
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputPathError(f"{self.dst}: another conversion into it is running (pid {holder}, "
                                      f"lock {self.path})") from None
            # The previous holder unlinks the file before unlocking: retry if ours is no longer the one there.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    st = os.fstat(fd)
    return identity(path) == (st.st_dev, st.st_ino)


def partial_prefix(dst: Path) -> str:
    """Prefix of this process's temporary folder beside DST (``tempfile.mkdtemp`` adds a random tail)."""
    return f".{dst.name}.partial-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dst: Path) -> None:
    """Remove what killed runs into DST left beside it; call with the DirLock held."""
    pattern = re.compile(re.escape(f".{dst.name}.") + r"(partial|old)-(\d+)(-.*)?$")
    for entry in sorted(dst.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(2))) or not entry.is_dir() or entry.is_symlink():
            continue
        if m.group(1) == "old" and identity(dst) is None:
            entry.rename(dst)  # a replace was killed between its two renames: the previous DST comes back
            logger.warning("restored %s from %s, left by an interrupted run (pid %s)", dst, entry, m.group(2))
        else:
            shutil.rmtree(entry)
            logger.warning("removed %s, left by an interrupted run (pid %s)", entry, m.group(2))


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2`` through libc; False where it is unavailable (then the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or filesystem without renameat2 (or this flag)
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path, dst: Path, expected: tuple[int, int] | None) -> None:
    """Make the finished folder ``tmp`` DST. ``expected``: the identity of the DST that was checked and may be
    replaced, or None when DST must not exist. Anything else at DST is left alone and refused."""
    found = identity(dst)
    if found != expected:
        what = "appeared" if expected is None else ("disappeared" if found is None else "was replaced")
        raise OutputPathError(f"{dst}: {what} while converting; nothing was replaced (run again)")
    if expected is None:
        try:
            if _renameat2(tmp, dst, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise OutputPathError(f"{dst}: appeared while converting; nothing was replaced (run again)") from None
        if identity(dst) is not None:  # fallback: checked under the DirLock, then renamed
            raise OutputPathError(f"{dst}: appeared while converting; nothing was replaced (run again)")
        os.rename(tmp, dst)
        return
    if _renameat2(tmp, dst, _RENAME_EXCHANGE):  # atomic swap: DST is never missing
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous DST
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only), so ``finally`` cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
