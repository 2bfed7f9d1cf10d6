"""Torch-free safetensors reading and writing.

Only the header is read up front. ``read(key)`` reads one tensor's byte range into private memory (the loader
calls it once per tensor and cuts every local device shard from that one copy, see ``loader/placement.py``);
``get``/``array`` return a memory-mapped view, so a caller that slices it touches only the pages of that slice.
bf16 and fp8 come back as ``ml_dtypes`` arrays, never through an fp32 round trip. Every structural problem of a file (short header, bad JSON, offsets past the end
of the file, sizes that do not match shape and dtype) raises ``CheckpointError`` naming the file and the key.

A component that ships only PyTorch pickles (``pytorch_model.bin``, or shards listed by
``pytorch_model.bin.index.json``) is read through ``torch_pickle.TorchPickleFile``, which has the same interface
(``tensors``, ``keys``, ``get``, ``read``) and runs no code from the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from fastvideo_jax.errors import CheckpointError  # re-exported: loaders raise it naming the file
from fastvideo_jax.models.loader.torch_pickle import TorchPickleFile, is_torch_pickle

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "SafetensorsFile",
    "SafetensorsCheckpoint",
    "find_safetensors",
    "require_float",
    "save_safetensors",
]

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
# The dtypes a weight may be stored in: floats, cast on load. Integer or bool data is not a weight (a cast
# would silently turn it into something else, e.g. a float weight truncated to int32 loads as zeros).
_FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FLOAT_DTYPES = frozenset(_DTYPES[n] for n in _FLOAT_NAMES)


def require_float(info: "TensorInfo", key: str) -> None:
    """``CheckpointError`` naming the tensor and its file unless it is stored as a floating-point dtype."""
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{info.path}: tensor {key!r} is stored as {_NAMES.get(info.dtype, info.dtype)}; a weight must be "
            f"floating point ({', '.join(_FLOAT_NAMES)})"
        )


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range inside the data section."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and validated eagerly, data mapped lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata, self.tensors = _read_header(self.path)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _data(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only array that views the file (no copy until the caller copies)."""
        info = self.tensors[key]
        raw = self._data()[info.start : info.end]
        return raw.view(info.dtype).reshape(info.shape)

    def read(self, key: str) -> np.ndarray:
        """The tensor read into private memory (freed with the array; no file pages stay mapped)."""
        info = self.tensors[key]
        with open(self.path, "rb") as f:
            f.seek(info.start)
            data = f.read(info.end - info.start)
        if len(data) != info.end - info.start:
            raise CheckpointError(f"{self.path}: tensor {key!r} is cut short (file changed while reading?)")
        return np.frombuffer(data, dtype=info.dtype).reshape(info.shape)


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    tensors = {key: _tensor_info(path, key, entry, 8 + n, data_size) for key, entry in header.items()}
    return metadata, tensors


def _tensor_info(path: Path, key: str, entry: object, base: int, data_size: int) -> TensorInfo:
    try:
        dtype = _DTYPES[entry["dtype"]]  # type: ignore[index]
        shape = tuple(int(s) for s in entry["shape"])  # type: ignore[index]
        start, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad header entry for tensor {key!r} ({e!r})") from None
    if end > data_size or start > end:
        raise CheckpointError(
            f"{path}: tensor {key!r} lies at bytes [{start}, {end}) but the data section has {data_size} bytes "
            "(truncated file?)"
        )
    if end - start != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {key!r} has {end - start} bytes, shape {shape} {dtype} needs more")
    return TensorInfo(path, dtype, shape, base + start, base + end)


class SafetensorsCheckpoint(Mapping[str, TensorInfo]):
    """All tensors of a component directory (one file, or several listed by an index), read lazily.

    Acts as a mapping from tensor name to ``TensorInfo`` (``PickledTensorInfo`` for a PyTorch pickle's tensors);
    ``array(name)`` returns the array view.
    """

    def __init__(self, files: list[Path]):
        if not files:
            raise CheckpointError("no safetensors files given")
        pickles = [Path(p) for p in files if is_torch_pickle(p)]
        self.files = [TorchPickleFile(p) if is_torch_pickle(p) else SafetensorsFile(p) for p in files]
        if pickles:
            logger.info("%s: read %d PyTorch pickle file(s) (%s) with the restricted unpickler: tensors only, no "
                        "code from the file runs", pickles[0].parent, len(pickles), ", ".join(p.name for p in pickles))
        self._where: dict[str, SafetensorsFile | TorchPickleFile] = {}
        for f in self.files:
            for key in f.tensors:
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key].path} and {f.path}")
                self._where[key] = f

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "SafetensorsCheckpoint":
        return cls(find_safetensors(directory))

    def __getitem__(self, key: str) -> TensorInfo:
        return self._where[key].tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def array(self, key: str) -> np.ndarray:
        """A memory-mapped view of one tensor."""
        return self._where[key].get(key)

    def read(self, key: str) -> np.ndarray:
        """One tensor read into private memory."""
        return self._where[key].read(key)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.values())


def find_safetensors(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a component dir: the shards an ``*.safetensors.index.json`` lists, or every
    ``*.safetensors`` file; failing both, PyTorch pickles: the shards a ``*.bin.index.json`` lists, or every
    ``*.bin`` file."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    for suffix in (".safetensors", ".bin"):
        indexes = sorted(d.glob(f"*{suffix}.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{d}: more than one {suffix} index ({', '.join(p.name for p in indexes)})")
        if indexes:
            return _indexed_shards(d, indexes[0])
        files = sorted(p for p in d.glob(f"*{suffix}") if p.is_file())
        if files:
            return files
    raise CheckpointError(f"{d}: no weight files (*.safetensors, or PyTorch *.bin pickles)")


def _indexed_shards(d: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid weight index ({e!r})") from None
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
    return [d / n for n in names]


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict | None = None):
    """Write tensors (numpy or ml_dtypes arrays) in safetensors format, keys sorted as the reference writer does."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {arr.dtype}, which safetensors cannot store")
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
