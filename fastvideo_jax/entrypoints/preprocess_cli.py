"""``fastvideo-jax preprocess``: a folder of captioned videos -> a latent dataset for ``fastvideo-jax train``.

Checked before any model loads: the folder, the caption manifest (every entry and every video in the folder),
the output path (never inside the video folder; an existing one only with --overwrite), the clip size against the
model. Videos that cannot give a clip (unreadable, too short) are reported and skipped. The dataset is built
beside OUTPUT and renamed into place only when complete, so a failed or interrupted run leaves nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fastvideo_jax.entrypoints.output_dir import (DirLock, check_separate, clean_stale, identity, partial_prefix,
                                                  publish, terminate_as_interrupt)
from fastvideo_jax.errors import OutputPathError, UserError
from fastvideo_jax.utils.paths import give_ordinary_mode

__all__ = ["preprocess", "add_preprocess_parser"]

NEEDED = ("tokenizer", "text_encoder", "vae")


def preprocess(model: str | os.PathLike, videos: str | os.PathLike, output: str | os.PathLike, *,
               captions: str | os.PathLike | None = None, height: int | None = None, width: int | None = None,
               num_frames: int | None = None, train_fps: float = 16.0, seed: int = 42, shard_size: int = 256,
               random_crop: bool = True, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build the dataset at ``output``; returns its metadata (``count``, ``skipped``, ...). Sizes default to the
    model's generation defaults (e.g. 480x832x81 for Wan2.1-T2V-1.3B)."""
    from fastvideo_jax.entrypoints.model_spec import ModelSpec
    from fastvideo_jax.training.preprocess import find_manifest, read_manifest
    from fastvideo_jax.training.video_frames import ClipSpec

    videos, output = Path(videos).expanduser(), Path(output).expanduser()
    if not videos.is_dir():
        raise UserError(f"{videos}: not a folder of videos")
    if not (train_fps > 0) or shard_size < 1:
        raise UserError(f"--train-fps must be > 0 and --shard-size >= 1 (got {train_fps}, {shard_size})")
    check_separate(videos, output)
    _check_output(output, overwrite)
    entries = read_manifest(videos, Path(captions).expanduser() if captions else find_manifest(videos))
    spec = ModelSpec.open(model)
    missing = [c for c in NEEDED if c not in spec.components]
    if missing:
        raise UserError(f"{model}: preprocessing needs the components {list(NEEDED)}; missing {missing}")
    param = spec.sampling_param(prompt=entries[0].caption, height=height, width=width, num_frames=num_frames)
    clip = ClipSpec(param.num_frames, param.height, param.width, train_fps, seed, random_crop)
    encoder = _load_encoder(spec)
    output.parent.mkdir(parents=True, exist_ok=True)
    with DirLock(output), terminate_as_interrupt():
        clean_stale(output)
        _check_output(output, overwrite)
        expected = identity(output)
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(output), dir=output.parent))
        try:
            give_ordinary_mode(tmp)
            meta = _write(tmp, entries, clip, encoder, shard_size, progress)
            meta.update(_describe(model, spec, clip))
            (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
            publish(tmp, output, expected)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise OutputPathError(f"{output}: exists; choose a new folder or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"{output}: exists and is not a folder")


def _load_encoder(spec):
    from fastvideo_jax.models.loader.pipeline_loader import load_components
    from fastvideo_jax.training.preprocess import ClipEncoder

    precisions = {"text_encoder": spec.config.text_encoder_precisions[0], "vae": "fp32"}
    parts = load_components(spec.path, list(NEEDED), precisions=precisions)
    return ClipEncoder(parts["tokenizer"], parts["text_encoder"], parts["vae"], text_len=spec.config.text_len,
                       clean=spec.config.clean_prompts)


def _write(tmp: Path, entries, clip, encoder, shard_size: int, progress: bool) -> dict[str, Any]:
    from fastvideo_jax.training.data import FORMAT, ShardWriter
    from fastvideo_jax.training.preprocess import encode_entries

    skipped: list[dict[str, str]] = []
    writer = ShardWriter(tmp, shard_size)
    try:
        bar = tqdm(total=len(entries), desc="preprocessing", unit="video", disable=not progress)
        for blob in encode_entries(entries, clip, encoder, skipped):
            writer.write(blob)
            bar.update(writer.count + len(skipped) - bar.n)
        bar.update(len(entries) - bar.n)
        bar.close()
    finally:
        shards = writer.close()
    (tmp / "skipped.json").write_text(json.dumps(skipped, indent=1))
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if writer.count == 0:
        raise UserError(f"no usable video among {len(entries)}: " + "; ".join(
            f"{Path(s['path']).name}: {s['reason']}" for s in skipped[:5]) + " (nothing was written)")
    latent_shape = list(_first_latents(tmp, shards[0]).shape)
    return {"format": FORMAT, "count": writer.count, "shards": shards, "latent_shape": latent_shape,
            "skipped": len(skipped)}


def _first_latents(tmp: Path, shard: str):
    import grain

    from fastvideo_jax.training.data import decode_record

    return decode_record(grain.sources.ArrayRecordDataSource([str(tmp / shard)])[0])[0]["latents"]


def _describe(model, spec, clip) -> dict[str, Any]:
    vae = spec.vae_arch
    return {
        "text_len": spec.config.text_len,
        "latents_mean": list(getattr(vae, "latents_mean", ()) or ()),
        "latents_std": list(getattr(vae, "latents_std", ()) or ()),
        "model": str(model), "pipeline": spec.pipeline_cls.__name__,
        "height": clip.height, "width": clip.width, "num_frames": clip.num_frames, "train_fps": clip.train_fps,
        "seed": clip.seed, "random_crop": clip.random_crop,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def add_preprocess_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="encode a folder of captioned videos into a training dataset",
                       description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--model", required=True, help="the pipeline whose VAE and text encoder encode the clips "
                   "(directory, Hugging Face repo id, or tiny-wan)")
    p.add_argument("--videos", required=True, help="folder of videos (read only)")
    p.add_argument("--captions", default=None, help="caption manifest: JSON (FastVideo's videos2caption.json, or "
                   "[{path, caption}]) or CSV (path,caption); default: videos2caption.json / captions.json / "
                   "captions.csv / metadata.csv in --videos")
    p.add_argument("--output", required=True, help="dataset folder to create")
    p.add_argument("--height", type=int, default=None, help="clip height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="clip width (default: the model's)")
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip, 1 + 4k (default: the model's)")
    p.add_argument("--train-fps", type=float, default=16.0, help="frame rate the clips are resampled to (16)")
    p.add_argument("--seed", type=int, default=42, help="seed of the temporal crops")
    p.add_argument("--no-random-crop", action="store_true", help="take each clip from the first sampled frame")
    p.add_argument("--shard-size", type=int, default=256, help="samples per ArrayRecord shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (only once complete)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> int:
    meta = preprocess(args.model, args.videos, args.output, captions=args.captions, height=args.height,
                      width=args.width, num_frames=args.num_frames, train_fps=args.train_fps, seed=args.seed,
                      shard_size=args.shard_size, random_crop=not args.no_random_crop, overwrite=args.overwrite,
                      progress=not args.no_progress)
    print(f"wrote {meta['count']} clip(s) to {args.output} ({meta['skipped']} skipped; latents "
          f"{tuple(meta['latent_shape'])} each)")
    return 0
