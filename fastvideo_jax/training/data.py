"""The preprocessed training set: VAE latents and text embeddings in ArrayRecord shards, streamed with grain.

Why ArrayRecord + grain: grain is the JAX ecosystem's data loader (MaxText and MaxDiffusion use it); over an
ArrayRecord source it has random access, so a global shuffle is a pure function of (seed, epoch) and the batch at
step ``s`` is ``dataset[s]``: resuming is slicing, nothing to replay, identical on every host. (FastVideo writes
Parquet; row groups would make random access coarse and resume a replay.)

Layout of a dataset directory::

    metadata.json                  format, count, shards, text_len, latent stats, model, preprocessing options
    shard-00000.arrayrecord ...
    skipped.json                   the videos left out and why (unreadable, too short, ...)

Each record is one sample, a safetensors blob: ``latents`` float32 (C, T, h, w), the VAE posterior mean, not
normalised (as FastVideo stores it; ``metadata["latents_mean"/"latents_std"]`` normalise it), ``prompt_embeds``
(L, E) trimmed to the prompt's tokens, and string metadata (caption, source file, frame indices).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fastvideo_jax.errors import UserError

__all__ = ["FORMAT", "LatentDataset", "batch_iterator", "encode_record", "decode_record", "write_shards",
           "ShardWriter"]

FORMAT = "fastvideo_jax.latents/1"
METADATA = "metadata.json"


def encode_record(latents: np.ndarray, prompt_embeds: np.ndarray, info: dict[str, Any]) -> bytes:
    """One sample as bytes: the two arrays (float32) and ``info`` (JSON) in the safetensors header."""
    arrays = {"latents": np.ascontiguousarray(latents, np.float32),
              "prompt_embeds": np.ascontiguousarray(prompt_embeds, np.float32)}
    return st_save(arrays, metadata={"info": json.dumps(info)})


def decode_record(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    return st_load(blob), json.loads(header.get("__metadata__", {}).get("info", "{}"))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrayrecord"


class ShardWriter:
    """Streams records into ``shard-00000.arrayrecord``, ``shard-00001...`` in ``directory``, ``shard_size``
    records each (the last one fewer); ``close()`` returns the shard names."""

    def __init__(self, directory: Path, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory, self.shard_size = Path(directory), shard_size
        self.names: list[str] = []
        self.count, self._writer = 0, None

    def write(self, blob: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.count % self.shard_size == 0:
            self._close_current()
            self.names.append(shard_name(len(self.names)))
            self._writer = ArrayRecordWriter(str(self.directory / self.names[-1]), "group_size:1")
        self._writer.write(blob)
        self.count += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        self._close_current()
        return list(self.names)


def write_shards(directory: Path, records: list[bytes], shard_size: int) -> list[str]:
    """Write ``records`` into ``ceil(n / shard_size)`` ArrayRecord files in ``directory``; returns their names."""
    writer = ShardWriter(directory, shard_size)
    try:
        for blob in records:
            writer.write(blob)
    finally:
        names = writer.close()
    return names


class LatentDataset:
    """Random access to a preprocessed dataset: ``dataset[i]`` is a dict of numpy arrays,
    ``latents`` float32 (C, T, h, w), ``prompt_embeds`` float32 (text_len, E) zero-padded and ``prompt_mask``
    bool (text_len,), plus ``caption`` (str). Everything is checked when the dataset is opened.

    ``latents`` are what the DiT sees: the stored VAE posterior mean normalised per channel with the VAE's
    ``latents_mean`` / ``latents_std`` (``(z - mean) / std``, as the pipeline's decode inverts it). ``raw=True``
    gives the stored VAE latents unchanged."""

    def __init__(self, path: str | Path, *, raw: bool = False):
        self.path = Path(path).expanduser()
        self.metadata = _read_metadata(self.path)
        self.text_len = int(self.metadata["text_len"])
        self._source = _open_source(self.path, self.metadata)
        self._stats = None if raw else _latent_stats(self.metadata)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays, info = decode_record(self._source[index])
        return self.sample(arrays, info)

    def info(self, index: int) -> dict[str, Any]:
        """The sample's recorded metadata: caption, source file, source frame indices."""
        return decode_record(self._source[index])[1]

    def sample(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> dict[str, Any]:
        embeds = arrays["prompt_embeds"][:self.text_len]
        padded = np.zeros((self.text_len, embeds.shape[1]), np.float32)
        padded[:len(embeds)] = embeds
        mask = np.arange(self.text_len) < len(embeds)
        latents = arrays["latents"]
        if self._stats is not None:
            mean, std = self._stats
            latents = ((latents - mean) / std).astype(np.float32)
        return {"latents": latents, "prompt_embeds": padded, "prompt_mask": mask,
                "caption": info.get("caption", "")}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["latent_shape"])

    def grain_dataset(self):
        """The dataset as a ``grain.MapDataset`` of decoded samples."""
        import grain

        return grain.MapDataset.source(self._source).map(lambda blob: self.sample(*decode_record(blob)))


def batch_iterator(dataset: LatentDataset, batch_size: int, seed: int, start_step: int = 0, *,
                   process_index: int = 0, process_count: int = 1, prefetch: int = 2
                   ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(step, batch)`` from ``start_step`` on, forever: each epoch is a new permutation drawn from ``seed``,
    and the batch of a step depends only on (seed, step), so a resumed run reads what an uninterrupted one did.
    With several processes each takes its ``batch_size // process_count`` rows of the global batch. Batches
    hold the arrays stacked (``caption`` is dropped)."""
    import grain

    if len(dataset) < batch_size:
        raise UserError(f"{dataset.path}: {len(dataset)} sample(s), fewer than the batch size {batch_size}")
    if batch_size % process_count:
        raise UserError(f"batch size {batch_size} is not divisible by the {process_count} processes")
    local = batch_size // process_count
    ds = dataset.grain_dataset().shuffle(seed=seed).repeat()
    ds = ds.map(lambda s: {k: v for k, v in s.items() if k != "caption"})
    ds = ds.batch(batch_size, drop_remainder=True)[start_step:]
    ds = ds.map(lambda b: {k: v[process_index * local:(process_index + 1) * local] for k, v in b.items()})
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    for step, batch in enumerate(it, start=start_step):
        yield step, batch


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise UserError(f"{path}: not a dataset directory (make one with `fastvideo-jax preprocess`)")
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise UserError(f"{path}: no {METADATA}; not a dataset written by `fastvideo-jax preprocess`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    for key in ("count", "shards", "text_len", "latent_shape"):
        if key not in meta:
            raise UserError(f"{meta_path}: missing {key!r}")
    if int(meta["count"]) == 0:
        raise UserError(f"{path}: the dataset is empty (0 samples; see skipped.json for what was left out)")
    missing = [s for s in meta["shards"] if not (path / s).is_file()]
    if missing:
        raise UserError(f"{path}: shard file(s) missing: {missing}")
    return meta


def _latent_stats(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (mean, std) shaped (C, 1, 1, 1), or None when the VAE has none (identity)."""
    mean, std = meta.get("latents_mean") or [], meta.get("latents_std") or []
    if not mean and not std:
        return None
    channels = meta["latent_shape"][0]
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"{METADATA}: latents_mean/latents_std have {len(mean)}/{len(std)} entries for "
                        f"{channels} latent channels")
    shape = (channels, 1, 1, 1)
    return np.asarray(mean, np.float32).reshape(shape), np.asarray(std, np.float32).reshape(shape)


def _open_source(path: Path, meta: dict[str, Any]):
    import grain

    source = grain.sources.ArrayRecordDataSource([str(path / s) for s in meta["shards"]])
    if len(source) != int(meta["count"]):
        raise UserError(f"{path}: {METADATA} says {meta['count']} samples, the shards hold {len(source)}")
    return source
