"""Preprocessing a folder of captioned videos into a latent dataset (``training.data``): each clip is sampled and
resized as FastVideo does (``video_frames``), encoded once by the pipeline's VAE (posterior mean) and text
encoder (embeddings trimmed to the caption's tokens).

The manifest is FastVideo's ``videos2caption.json`` (a list of ``{"path": ..., "cap": [caption, ...]}``; the
first caption is used) or the same as ``{"path", "caption"}`` objects, or a CSV with ``path`` and ``caption``
columns. Paths are relative to the video folder. Everything in it is checked before any model loads.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastvideo_jax.errors import UserError
from fastvideo_jax.training.data import encode_record
from fastvideo_jax.training.video_frames import BadVideo, ClipSpec, read_clip

__all__ = ["Entry", "read_manifest", "find_manifest", "ClipEncoder", "encode_entries", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")
MANIFEST_NAMES = ("videos2caption.json", "captions.json", "captions.csv", "metadata.csv")


@dataclass(frozen=True)
class Entry:
    path: Path
    caption: str


def find_manifest(videos: Path) -> Path:
    for name in MANIFEST_NAMES:
        if (videos / name).is_file():
            return videos / name
    raise UserError(f"{videos}: no caption manifest; give --captions FILE (JSON list of {{\"path\", \"caption\"}} "
                    f"or FastVideo's {{\"path\", \"cap\": [...]}}, or a CSV with path,caption) or put one of "
                    f"{list(MANIFEST_NAMES)} in the folder")


def read_manifest(videos: Path, manifest: Path) -> list[Entry]:
    """The manifest's entries, each checked: a path and a non-empty caption, no duplicates, the file present;
    every video file in the folder must have an entry. Errors list the offending entries."""
    rows = _rows(manifest)
    if not rows:
        raise UserError(f"{manifest}: no entries")
    entries, problems, seen, listed = [], [], set(), set()
    for i, row in enumerate(rows):
        path, caption = row.get("path"), _caption(row)
        where = f"entry {i} ({path!r})"
        if not isinstance(path, str) or not path.strip():
            problems.append(f"entry {i}: no 'path'")
            continue
        listed.add((videos / path).resolve())
        if caption is None:
            problems.append(f"{where}: no caption ('caption' or 'cap')")
        elif path in seen:
            problems.append(f"{where}: listed twice")
        elif not (videos / path).is_file():
            problems.append(f"{where}: no such file in {videos}")
        else:
            seen.add(path)
            entries.append(Entry(videos / path, caption))
    uncaptioned = sorted(str(f.relative_to(videos)) for f in videos.rglob("*")
                         if f.suffix.lower() in VIDEO_SUFFIXES and f.resolve() not in listed)
    if uncaptioned:
        problems.append(f"{len(uncaptioned)} video(s) in the folder have no manifest entry: {_some(uncaptioned)}")
    if problems:
        raise UserError(f"{manifest}: {len(problems)} problem(s): " + "; ".join(problems[:8])
                        + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else ""))
    return entries


def _rows(manifest: Path) -> list[dict[str, Any]]:
    if not manifest.is_file():
        raise UserError(f"{manifest}: caption manifest not found")
    try:
        if manifest.suffix.lower() == ".csv":
            with manifest.open(newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
                    raise UserError(f"{manifest}: a CSV manifest needs the columns path,caption "
                                    f"(found {reader.fieldnames})")
                return list(reader)
        rows = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise UserError(f"{manifest}: unreadable caption manifest ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{manifest}: a JSON manifest must be a list of objects with 'path' and 'caption'")
    return rows


def _caption(row: dict[str, Any]) -> str | None:
    cap = row.get("caption", row.get("cap"))
    if isinstance(cap, list):
        cap = cap[0] if cap else None
    return cap if isinstance(cap, str) and cap.strip() else None


def _some(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


class ClipEncoder:
    """A pipeline's tokenizer, text encoder and VAE (loaded by the caller), as preprocessing uses them."""

    def __init__(self, tokenizer: Any, text_encoder: Any, vae: Any, *, text_len: int, clean: bool):
        self.tokenizer, self.text_encoder, self.vae = tokenizer, text_encoder, vae
        self.text_len, self.clean = text_len, clean

    def encode_video(self, clip: np.ndarray) -> np.ndarray:
        """(3, F, H, W) in [-1, 1] -> the VAE posterior mean (z, T, h, w) float32."""
        import jax.numpy as jnp

        return np.asarray(self.vae.encode(jnp.asarray(clip[None]))[0], np.float32)

    def encode_captions(self, captions: list[str]) -> list[np.ndarray]:
        """Each caption's embeddings (tokens, E) float32, padding removed."""
        import jax.numpy as jnp

        from fastvideo_jax.models.encoders.text import encode_prompts

        embeds, mask = encode_prompts(self.tokenizer, self.text_encoder, captions, self.text_len, clean=self.clean,
                                      dtype=jnp.float32)
        embeds, lengths = np.asarray(embeds), np.asarray(mask).sum(axis=1)
        return [embeds[i, :int(n)] for i, n in enumerate(lengths)]


def encode_entries(entries: list[Entry], spec: ClipSpec, encoder: ClipEncoder, skipped: list[dict[str, str]],
                   text_batch: int = 8) -> Iterator[bytes]:
    """Records of the entries that give a clip, in manifest order; the others are appended to ``skipped``
    (path and reason) and never stop the run. Captions are encoded ``text_batch`` at a time."""
    pending: list[tuple[Entry, np.ndarray, list[int]]] = []
    for index, entry in enumerate(entries):
        try:
            clip, picks = read_clip(entry.path, spec, random.Random(f"{spec.seed}:{index}"))
        except BadVideo as e:
            skipped.append({"path": str(entry.path), "reason": str(e)})
            continue
        pending.append((entry, encoder.encode_video(clip), picks))
        if len(pending) == text_batch:
            yield from _flush(pending, encoder)
            pending = []
    yield from _flush(pending, encoder)


def _flush(pending: list[tuple[Entry, np.ndarray, list[int]]], encoder: ClipEncoder) -> Iterator[bytes]:
    if not pending:
        return
    embeds = encoder.encode_captions([entry.caption for entry, _, _ in pending])
    for (entry, latents, picks), text in zip(pending, embeds):
        yield encode_record(latents, text, {"caption": entry.caption, "source": entry.path.name,
                                            "frame_indices": picks})
