"""A toy latent dataset in the format ``fastvideo-jax preprocess`` writes (random latents and text embeddings,
no video or encoder involved): for training tests, notebooks and smoke runs of ``fastvideo-jax train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["write_toy_dataset"]


def write_toy_dataset(directory: str | Path, count: int = 4, latent_shape: tuple[int, ...] = (16, 2, 4, 4),
                      text_len: int = 8, text_dim: int = 32, seed: int = 0, shard_size: int = 2) -> Path:
    """``count`` samples of random latents ``latent_shape`` (C, T, h, w) and prompt embeddings (<= text_len
    tokens of ``text_dim``), unit latent statistics, in ``directory`` (created)."""
    from fastvideo_jax.training.data import FORMAT, encode_record, write_shards

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        tokens = int(rng.integers(1, text_len + 1))
        latents = rng.standard_normal(latent_shape).astype(np.float32)
        embeds = rng.standard_normal((tokens, text_dim)).astype(np.float32)
        records.append(encode_record(latents, embeds, {"caption": f"toy clip {i}", "path": f"toy_{i}.mp4"}))
    shards = write_shards(directory, records, shard_size) if records else []
    channels = latent_shape[0]
    meta = {"format": FORMAT, "count": count, "shards": shards, "text_len": text_len,
            "latent_shape": list(latent_shape), "latents_mean": [0.0] * channels, "latents_std": [1.0] * channels}
    (directory / "metadata.json").write_text(json.dumps(meta, indent=1))
    return directory
