"""Torch-free, safe reading of PyTorch ``torch.save`` checkpoints (the zip format, default since PyTorch 1.6).

Such a file is a zip archive holding ``<prefix>/data.pkl`` (a pickle of the state dict whose tensors refer to
storages by persistent id), one uncompressed record per storage at ``<prefix>/data/<key>`` and
``<prefix>/byteorder``. Unpickling is what makes these files dangerous: a pickle may name any importable
callable and call it. ``_SafeUnpickler`` resolves only the globals a state dict needs (``ALLOWED_GLOBALS``) to
inert stand-ins of our own, never importing torch or anything else, and refuses every other global with a
``CheckpointError`` naming it, before it is called.

Only the pickle is read up front: each tensor becomes a ``PickledTensorInfo`` (its storage record, dtype,
element offset, shape and strides). ``read(key)`` copies one tensor out of its record (strided views and
storages shared by several tensors included); ``get(key)`` returns a read-only memory-mapped view. bf16 and
fp8 come back as ``ml_dtypes`` arrays. Pre-1.6 (non-zip) pickles are refused with a message saying how to
re-save them.
"""

from __future__ import annotations

import _compat_pickle
import collections
import logging
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from fastvideo_jax.errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS", "PickledTensorInfo", "TorchPickleFile", "is_torch_pickle"]

logger = logging.getLogger(__name__)

# Typed storage classes (``torch.<Name>Storage``) name their element dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# ``_rebuild_tensor_v3`` (dtypes without a typed storage class) names the dtype itself.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def _refuse_state(self, state):
    raise pickle.UnpicklingError(f"the pickle tries to set the state of {type(self).__name__}")


def _inert(cls):
    """A frozen, slotted dataclass whose state the pickle cannot set (its BUILD opcode): the allowed globals are
    shared module objects, and one file must not change how later files are read. (A frozen slotted dataclass
    brings its own ``__setstate__``, which would set any field.)"""
    cls = dataclass(frozen=True, slots=True)(cls)
    cls.__setstate__ = _refuse_state
    return cls


@_inert
class _Storage:
    """A persistent-id storage reference: the record ``key``, its element dtype and element count."""

    key: str
    dtype: np.dtype
    numel: int


@_inert
class _DType:
    dtype: np.dtype


@_inert
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    return _tensor(storage, storage_offset, size, stride, dtype)


def _tensor(storage, offset, size, stride, dtype) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage reference")
    if dtype is not None and not isinstance(dtype, _DType):
        raise pickle.UnpicklingError(f"tensor dtype is {type(dtype).__name__}, not a dtype")
    try:
        shape, strides = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        offset = int(offset)
    except (TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"bad tensor size/stride/offset ({e})") from None
    return _Tensor(storage, offset, shape, strides, storage.dtype if dtype is None else dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


@_inert
class _StorageClass:
    """Stand-in for a ``torch.*Storage`` class: only ever used as the type in a persistent id."""

    name: str
    dtype: np.dtype


@_inert
class _Function:
    """Stand-in for an allowed torch function: calls ours."""

    fn: object

    def __call__(self, *args):
        return self.fn(*args)


ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Function(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageClass("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): _StorageClass(name, dt) for name, dt in _STORAGE_DTYPES.items()},
    **{("torch", name): _DType(dt) for name, dt in _TORCH_DTYPES.items()},
}
"""Every global a checkpoint's pickle may name, (module, name) -> the inert object it resolves to."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:  # named as Python 3 spells it (protocol 2 writes builtins.eval as __builtin__.eval)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            raise _Refused(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, cls, key, _location, numel = pid
        if not isinstance(cls, _StorageClass) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"bad storage reference {pid!r:.80}")
        return _Storage(key, cls.dtype, numel)


class _Refused(pickle.UnpicklingError):
    pass


@dataclass(frozen=True)
class PickledTensorInfo:
    """Where one tensor of a ``torch.save`` file lives: its storage record, dtype and strided layout."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    record: str  # the zip member holding the storage
    offset: int  # in elements, into the storage
    stride: tuple[int, ...]  # in elements

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def is_torch_pickle(path: str | os.PathLike) -> bool:
    """Whether a file's name says it is a PyTorch pickle (``*.bin``, ``*.pt``, ``*.pth``)."""
    return Path(path).suffix in (".bin", ".pt", ".pth")


class TorchPickleFile:
    """One ``torch.save`` zip file: its pickle read through the restricted unpickler, storages read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._records: dict[str, tuple[int, int]] = {}  # storage record -> (file offset, size in bytes)
        self.tensors = self._read_index()
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _read_index(self) -> dict[str, PickledTensorInfo]:
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such PyTorch checkpoint file")
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(
                f"{self.path}: not a zip-format torch.save file (the legacy pre-1.6 pickle format, or not a "
                "PyTorch checkpoint); it is not read, since that would need torch.load; re-save it with "
                "torch>=1.6 or convert it to safetensors")
        try:
            with zipfile.ZipFile(self.path) as zf:
                return self._parse(zf)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: corrupt torch.save archive ({e})") from None

    def _parse(self, zf: zipfile.ZipFile) -> dict[str, PickledTensorInfo]:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{self.path}: a torch.save archive has one <name>/data.pkl, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in zf.namelist() and zf.read(order).strip() != b"little":
            raise CheckpointError(f"{self.path}: stored {zf.read(order).decode(errors='replace')!r}-endian; only "
                                  "little-endian checkpoints are read")
        try:
            with zf.open(pkls[0]) as f:
                obj = _SafeUnpickler(f).load()
        except _Refused as e:
            raise CheckpointError(
                f"{self.path}: refused to unpickle: it names the global {e}, which a state dict of tensors does "
                "not need (only these are allowed: "
                f"{', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))}); nothing was executed") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
                KeyError, struct.error) as e:
            raise CheckpointError(f"{self.path}: corrupt or unsupported pickle in {pkls[0]} ({e})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a state dict of tensors")
        bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, _Tensor))]
        if bad:
            raise CheckpointError(f"{self.path}: entries {bad[:5]!r} are not tensors (a nested checkpoint? "
                                  "save the state dict itself)")
        infos = {}
        for key, t in obj.items():
            record = f"{prefix}data/{t.storage.key}"
            if record not in self._records:
                self._records[record] = self._locate(zf, record, t.storage)
            _check_bounds(self.path, key, t)
            infos[key] = PickledTensorInfo(self.path, t.dtype, t.shape, record, t.offset, t.stride)
        return infos

    def _locate(self, zf: zipfile.ZipFile, record: str, storage: _Storage) -> tuple[int, int]:
        try:
            info = zf.getinfo(record)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage record {record} is missing (truncated file?)") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage record {record} is compressed; torch.save stores them raw")
        if info.file_size != storage.numel * storage.dtype.itemsize:
            raise CheckpointError(f"{self.path}: storage record {record} has {info.file_size} bytes, its "
                                  f"{storage.numel} x {storage.dtype} elements need "
                                  f"{storage.numel * storage.dtype.itemsize}")
        with open(self.path, "rb") as f:  # the record's data follows its 30-byte local header, name and extra
            f.seek(info.header_offset)
            head = f.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip local header for {record}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.path.stat().st_size:
            raise CheckpointError(f"{self.path}: storage record {record} runs past the end of the file (truncated?)")
        return start, info.file_size

    def _data(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def _view(self, key: str, raw: np.ndarray, offset: int) -> np.ndarray:
        info = self.tensors[key]
        flat = raw.view(info.dtype)
        if not info.shape:  # as_strided turns shape () into (1,)
            return flat[offset: offset + 1].reshape(())
        strides = tuple(s * info.dtype.itemsize for s in info.stride)
        return np.lib.stride_tricks.as_strided(flat[offset:], info.shape, strides, writeable=False)

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only (possibly strided) view of the memory-mapped file."""
        start, size = self._records[self.tensors[key].record]
        return self._view(key, self._data()[start: start + size], self.tensors[key].offset)

    def read(self, key: str) -> np.ndarray:
        """The tensor copied into private memory, C-contiguous. Only the bytes from its first to its last element
        are read (not the rest of a storage it shares with other tensors)."""
        info = self.tensors[key]
        start, _ = self._records[info.record]
        span = _span(info) * info.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(start + info.offset * info.dtype.itemsize)
            data = f.read(span)
        if len(data) != span:
            raise CheckpointError(f"{self.path}: tensor {key!r} is cut short (file changed while reading?)")
        return np.array(self._view(key, np.frombuffer(data, np.uint8), 0), order="C")  # a copy; keeps shape ()


def _span(info: PickledTensorInfo) -> int:
    """Elements from a tensor's first to its last element in its storage (0 for an empty tensor)."""
    if math.prod(info.shape) == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(info.shape, info.stride))


def _check_bounds(path: Path, key: str, t: _Tensor) -> None:
    if len(t.shape) != len(t.stride) or any(n < 0 for n in t.shape) or any(s < 0 for s in t.stride) \
            or t.offset < 0:
        raise CheckpointError(f"{path}: tensor {key!r} has a bad layout (size {t.shape}, stride {t.stride}, "
                              f"offset {t.offset})")
    if t.dtype.itemsize != t.storage.dtype.itemsize and t.storage.dtype != np.uint8:
        raise CheckpointError(f"{path}: tensor {key!r} is {t.dtype} on a {t.storage.dtype} storage")
    per_storage = t.storage.numel * t.storage.dtype.itemsize // t.dtype.itemsize
    last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if math.prod(t.shape) else t.offset - 1
    if last >= per_storage:
        raise CheckpointError(f"{path}: tensor {key!r} (size {t.shape}, stride {t.stride}, offset {t.offset}) "
                              f"reaches past its storage of {per_storage} elements")
