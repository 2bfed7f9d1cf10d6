"""Converted components: parameters in an orbax checkpoint, restored straight into their shardings.

A converted component directory keeps the original ``config.json`` and adds ``fastvideo_jax.json`` (format
marker and the precision the parameters were stored in) and ``params/`` (an orbax checkpoint of a flat dict
keyed by dotted parameter paths).
"""

from __future__ import annotations

import errno
import gc
import io
import json
import logging
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding

from fastvideo_jax.errors import debug_env
from fastvideo_jax.models.loader.safetensors_io import CheckpointError
from fastvideo_jax.utils.nnx_vars import var_value

MARKER = "fastvideo_jax.json"
PARAMS_DIR = "params"
FORMAT = "fastvideo_jax-orbax-v1"
# Restore in groups of parameters (each ~512 MiB) with bounded read concurrency: measured on a 2.65 GiB
# Wan-1.3B checkpoint, peak host RSS fell from 1.7x to 1.3-1.45x the checkpoint (benchmarks/load.py).
RESTORE_CONCURRENT_GB = 4
RESTORE_GROUP_BYTES = 512 * 2**20
# Where orbax's and asyncio's background threads report a failed write, once per pending write.
_NOISY_LOGGERS = ("absl", "asyncio", "concurrent.futures")
_HOLDING = threading.Lock()  # one holder of sys.stderr and those loggers at a time

__all__ = ["MARKER", "is_converted", "read_marker", "save_params", "restore_params", "stored_names"]


def is_converted(component_dir: str | Path) -> bool:
    return (Path(component_dir) / MARKER).is_file()


def read_marker(component_dir: str | Path) -> dict:
    path = Path(component_dir) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable conversion marker ({e})") from None
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {marker.get('format')!r} is not {FORMAT!r}")
    return marker


def stored_names(component_dir: str | Path) -> set[str]:
    """The parameter names a converted component holds (from the checkpoint's metadata; no array is read)."""
    params_dir = Path(component_dir).absolute() / PARAMS_DIR
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        stored = ckptr.metadata(params_dir)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    return set(stored.keys()) if isinstance(stored, Mapping) else set()


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def save_params(component_dir: str | Path, state: nnx.State, precision: str) -> None:
    """Write a model's parameters and the marker into ``component_dir`` (which must exist).

    Saved synchronously. A full disk raises one ``OSError(ENOSPC)`` naming the directory; the reports of
    orbax's writer threads about it (hundreds of lines) are dropped (``FASTVIDEO_JAX_DEBUG=1`` shows them)."""
    component_dir = Path(component_dir).absolute()
    flat = {_key(path): var[...] for path, var in nnx.to_flat_state(state)}

    def save():
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(component_dir / PARAMS_DIR, flat)

    _quietly(save, lambda e: OSError(errno.ENOSPC, "No space left on device", str(component_dir))
             if is_no_space(e) else None)
    (component_dir / MARKER).write_text(json.dumps({"format": FORMAT, "precision": precision}, indent=2))


def is_no_space(e: BaseException | None) -> bool:
    """Whether ``e`` or anything it was raised from is a full disk (tensorstore reports ENOSPC as text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _Hold(logging.Filter):
    """Keeps a logger's records instead of emitting them."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _quietly(work: Callable[[], Any], translate: Callable[[Exception], Exception | None]) -> Any:
    """Run ``work`` holding back what orbax's threads log or print (``_NOISY_LOGGERS``, ``sys.stderr``); all of
    it is replayed on success. An error ``translate`` turns into a one-line exception drops it: first the
    original exception is let go and the abandoned writes settle (their tasks report when collected), then the
    translation is raised. ``translate`` returning None re-raises the original (and replays). Not held with
    ``FASTVIDEO_JAX_DEBUG=1`` (the translation is chained to the original) or while another thread holds."""
    debug = debug_env()
    if debug or not _HOLDING.acquire(blocking=False):
        try:
            return work()
        except Exception as e:
            failure = translate(e)
            if failure is None:
                raise
            raise failure from e
    holds = {name: _Hold() for name in _NOISY_LOGGERS}
    for name, hold in holds.items():
        logging.getLogger(name).addFilter(hold)
    held, real = io.StringIO(), sys.stderr
    sys.stderr, failure = held, None
    try:
        try:
            return work()
        except Exception as e:
            failure = translate(e)
            if failure is None:
                raise
            if is_no_space(e):
                _drop_abandoned_write_reports()
        _settle(lambda: (len(held.getvalue()), sum(len(h.records) for h in holds.values())))
        raise failure  # outside the except block, so the original exception, its frames and tasks could go
    finally:
        sys.stderr = real
        for name, hold in holds.items():
            logging.getLogger(name).removeFilter(hold)
        if failure is None:
            real.write(held.getvalue())
            for name, hold in holds.items():
                for record in hold.records:
                    logging.getLogger(name).handle(record)
        _HOLDING.release()


class _DropAbandonedNoSpaceWrites(logging.Filter):
    """After a full disk was reported as one line: asyncio's "Task exception was never retrieved" records for the
    abandoned orbax writes that failed with no space (on Python 3.12 they can surface only when the loop's tasks
    are collected at exit, after the hold ended). Nothing else is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        abandoned = "exception was never retrieved" in text
        return not (abandoned and (is_no_space(exc) or "No space left on device" in text
                                   or "os_error_code='28'" in text))


_DROP_ABANDONED = _DropAbandonedNoSpaceWrites()
# The same abandoned writes' coroutines, when finalised at exit, warn "coroutine ... was never awaited".
_ABANDONED_COROUTINE = r"coroutine '[^']*(serializ|write)[^']*' was never awaited"


def _drop_abandoned_write_reports() -> None:
    """After a full disk was reported as one line, what the abandoned orbax writes report later (when their
    tasks and coroutines are collected, possibly at exit) is dropped; idempotent."""
    logging.getLogger("asyncio").addFilter(_DROP_ABANDONED)
    warnings.filterwarnings("ignore", message=_ABANDONED_COROUTINE, category=RuntimeWarning)


def _settle(progress: Callable[[], Any], quiet_s: float = 0.3, max_s: float = 3.0) -> None:
    """After a failed save, writes still in flight fail on a closed event loop and their abandoned tasks report
    when collected: collect them now and wait (bounded) until ``progress()`` (what was reported) stops changing."""
    deadline, last, last_change = time.monotonic() + max_s, None, time.monotonic()
    while time.monotonic() < deadline:
        gc.collect()
        now = progress()
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return
        time.sleep(0.05)


def restore_error_message(e: BaseException) -> str:
    """One line for an orbax restore error. Orbax's own message for a failed read prints a bound method
    (``See full TensorStore details: <bound method ...spec of TensorStore(...)>``, a page of JSON) where it
    meant the store's spec: such a message gives way to its cause (tensorstore's, which names the parameter
    and the file), and tensorstore's spec dumps are cut."""
    first, seen = e, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = re.sub(r"\s*\[tensorstore_spec(\[\d+\])?='.*?'\]", "", str(e), flags=re.S)
        text = " ".join(text.split())
        if text and "<bound method" not in text:
            return f"{type(e).__name__}: {text[:500]}"
        e = e.__cause__ or e.__context__
    return type(first).__name__


def restore_params(
    component_dir: str | Path, abstract: nnx.State, shardings: Mapping[tuple, NamedSharding]
) -> dict[tuple, jax.Array]:
    """Parameters restored onto their shardings, cast to the abstract model's dtypes; names checked strictly."""
    component_dir = Path(component_dir).absolute()
    params_dir = component_dir / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (converted component without parameters)")
    targets = {
        _key(path): jax.ShapeDtypeStruct(var_value(var).shape, var_value(var).dtype, sharding=shardings[path])
        for path, var in nnx.to_flat_state(abstract)
    }
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=RESTORE_CONCURRENT_GB)
    restored: dict[str, jax.Array] = {}

    def restore():
        with ocp.Checkpointer(handler) as ckptr:
            stored = ckptr.metadata(params_dir)
            stored = getattr(stored, "item_metadata", stored)
            stored = getattr(stored, "tree", stored)
            names = set(stored.keys()) if isinstance(stored, Mapping) else None
            if names is not None and names != set(targets):
                extra, missing = sorted(names - set(targets)), sorted(set(targets) - names)
                raise CheckpointError(f"{params_dir}: parameters do not match the model: unexpected {extra}, "
                                      f"missing {missing}")
            # Restored in groups of about RESTORE_GROUP_BYTES, so the host never holds more than one group's
            # reads in flight on top of what the devices already hold.
            for group in _groups(targets, RESTORE_GROUP_BYTES):
                restore_args = ocp.checkpoint_utils.construct_restore_args(group)
                args = ocp.args.PyTreeRestore(item=group, restore_args=restore_args, partial_restore=True)
                restored.update(ckptr.restore(params_dir, args=args))

    # orbax raises many types: each becomes one CheckpointError naming the directory
    _quietly(restore, lambda e: CheckpointError(str(e)) if isinstance(e, CheckpointError)
             else CheckpointError(f"{params_dir}: cannot restore ({restore_error_message(e)})"))
    by_key = {_key(path): path for path, _ in nnx.to_flat_state(abstract)}
    return {by_key[k]: v for k, v in restored.items()}


def _groups(targets: dict[str, jax.ShapeDtypeStruct], max_bytes: int) -> list[dict[str, jax.ShapeDtypeStruct]]:
    groups, current, size = [], {}, 0
    for key, t in targets.items():
        nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    return groups + ([current] if current else [])
