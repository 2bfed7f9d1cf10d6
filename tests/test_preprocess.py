"""Training data: FastVideo's clip sampling and resize, the ArrayRecord dataset, and `fastvideo-jax preprocess`."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest

from fastvideo_jax.errors import UserError
from fastvideo_jax.training import data as D
from fastvideo_jax.training.video_frames import BadVideo, ClipSpec, frame_indices, transform_frames
from tests.stepvideo_oracle import fastvideo_file


def _fastvideo_transform():
    spec = importlib.util.spec_from_file_location("_fv_transform", fastvideo_file("dataset", "transform.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("src,dst", [((64, 96), (32, 48)), ((60, 100), (32, 48)), ((30, 40), (64, 96)),
                                     ((50, 50), (16, 16)), ((45, 77), (40, 72)), ((90, 160), (48, 80))])
def test_transform_equals_fastvideo_bit_for_bit(src, dst):
    """Centre crop + uint8 antialiased bilinear resize + [-1, 1] scaling == FastVideo's CenterCropResizeVideo on
    the decoded uint8 frames followed by its /127.5 - 1 (shrinking, enlarging, odd sizes, both crop axes)."""
    import torch

    rng = np.random.default_rng(sum(src) + sum(dst))
    frames = rng.integers(0, 256, (3, *src, 3), dtype=np.uint8)
    ref = _fastvideo_transform().CenterCropResizeVideo(dst)(torch.from_numpy(frames).permute(0, 3, 1, 2))
    assert ref.dtype == torch.uint8
    ref = ref.permute(1, 0, 2, 3).float().numpy() / 127.5 - 1.0  # (C, F, H, W) as FastVideo's VideoTransformStage
    ours = transform_frames(frames, *dst)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_frame_indices_follow_fastvideo_sampling():
    spec = ClipSpec(num_frames=5, height=16, width=16, train_fps=8, random_crop=False)
    # 24 fps, 2 s: every 3rd frame (0, 3, 6, ...), the first 5 of 16
    assert frame_indices(24.0, 2.0, spec, random.Random(0)) == [0, 3, 6, 9, 12]
    # 30 fps -> 8: interval 3.75, truncated as np.arange(...).astype(int)
    assert frame_indices(30.0, 1.0, spec, random.Random(0)) == [0, 3, 7, 11, 15]
    crop = ClipSpec(num_frames=5, height=16, width=16, train_fps=8, random_crop=True)
    picks = frame_indices(24.0, 2.0, crop, random.Random(3))
    begin = random.Random(3).randint(0, 16 - 5 - 1)  # TemporalRandomCrop's range
    assert picks == [3 * (begin + i) for i in range(5)]
    with pytest.raises(BadVideo, match="too short: 4 frames at 8 fps"):
        frame_indices(24.0, 0.5, spec, random.Random(0))


def _write_dataset(tmp_path, n=5, text_len=6, lengths=None):
    records = []
    for i in range(n):
        length = (lengths or [1 + i % text_len] * n)[i]
        latents = np.full((4, 2, 3, 3), i, np.float32)
        records.append(D.encode_record(latents, np.full((length, 8), i + 0.5, np.float32), {"caption": f"clip {i}"}))
    shards = D.write_shards(tmp_path, records, shard_size=2)
    meta = {"format": D.FORMAT, "count": n, "shards": shards, "text_len": text_len, "latent_shape": [4, 2, 3, 3]}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    return tmp_path


def test_dataset_round_trip_pads_text_and_keeps_order(tmp_path):
    ds = D.LatentDataset(_write_dataset(tmp_path, n=5, text_len=6, lengths=[1, 6, 3, 9, 2]))
    assert len(ds) == 5 and len(ds.metadata["shards"]) == 3
    for i, length in enumerate([1, 6, 3, 6, 2]):  # a prompt longer than text_len is cut to it
        s = ds[i]
        assert s["caption"] == f"clip {i}"
        np.testing.assert_array_equal(s["latents"], np.full((4, 2, 3, 3), i, np.float32))
        assert s["prompt_embeds"].shape == (6, 8) and s["prompt_mask"].tolist() == [j < length for j in range(6)]
        np.testing.assert_array_equal(s["prompt_embeds"][:length], i + 0.5)
        np.testing.assert_array_equal(s["prompt_embeds"][length:], 0.0)


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    """Every epoch is a permutation (each sample once), epochs differ, and a run resumed at step k reads the
    batches an uninterrupted run read from step k on; processes split each global batch."""
    ds = D.LatentDataset(_write_dataset(tmp_path, n=6))
    ids = lambda b: b["latents"][:, 0, 0, 0, 0].astype(int).tolist()  # noqa: E731
    it = D.batch_iterator(ds, batch_size=2, seed=7)
    full = [ids(next(it)[1]) for _ in range(9)]
    epochs = [sorted(sum(full[e * 3:(e + 1) * 3], [])) for e in range(3)]
    assert epochs == [list(range(6))] * 3
    assert len({tuple(sum(full[e * 3:(e + 1) * 3], [])) for e in range(3)}) > 1
    resumed = D.batch_iterator(ds, batch_size=2, seed=7, start_step=4)
    assert [(s, ids(b)) for s, b in (next(resumed) for _ in range(5))] == list(enumerate(full[4:], start=4))
    other = D.batch_iterator(ds, batch_size=2, seed=8)
    assert [ids(next(other)[1]) for _ in range(9)] != full
    halves = [D.batch_iterator(ds, batch_size=2, seed=7, process_index=p, process_count=2) for p in (0, 1)]
    assert [ids(next(halves[0])[1]) + ids(next(halves[1])[1]) for _ in range(3)] == full[:3]


def test_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="not a dataset directory"):
        D.LatentDataset(tmp_path / "nope")
    with pytest.raises(UserError, match="no metadata.json"):
        D.LatentDataset(tmp_path)
    path = _write_dataset(tmp_path / "d", n=1) if (tmp_path / "d").mkdir() is None else None
    with pytest.raises(UserError, match="fewer than the batch size 2"):
        next(D.batch_iterator(D.LatentDataset(path), batch_size=2, seed=0))
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, "count": 0}))
    with pytest.raises(UserError, match="the dataset is empty"):
        D.LatentDataset(path)
    (path / "metadata.json").write_text(json.dumps({**meta, "count": 2}))
    with pytest.raises(UserError, match="says 2 samples, the shards hold 1"):
        D.LatentDataset(path)
    (path / meta["shards"][0]).unlink()
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="shard file"):
        D.LatentDataset(path)


# ---- fastvideo-jax preprocess, end to end on the tiny Wan pipeline ------------------------------------------------

def _mp4(path, frames, fps):
    import imageio.v2 as iio

    iio.mimwrite(path, frames, fps=fps, macro_block_size=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("pre")
    pipe = write_tiny_wan_pipeline(root / "tiny")
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    _mp4(videos / "a.mp4", rng.integers(0, 256, (24, 40, 56, 3), dtype=np.uint8), fps=8)
    _mp4(videos / "sub" / "b.mp4", rng.integers(0, 256, (40, 48, 48, 3), dtype=np.uint8), fps=16)
    _mp4(videos / "short.mp4", rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), fps=8)
    (videos / "broken.mp4").write_bytes(b"not a video" * 100)
    manifest = [{"path": "a.mp4", "cap": ["A red fox runs through snow."]},
                {"path": "short.mp4", "caption": "too short"},
                {"path": "broken.mp4", "caption": "unreadable"},
                {"path": "sub/b.mp4", "caption": "Waves  roll onto a beach at dusk"}]
    (videos / "videos2caption.json").write_text(json.dumps(manifest))
    return pipe, videos


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_preprocess_matches_diffusers_encoding(clips, tmp_path):
    """The dataset's latents equal diffusers' Wan VAE posterior mean of FastVideo's transform of the sampled frames
    (fp32, <= 1e-4 relative) and its text embeddings equal diffusers' WanPipeline.encode_prompt (<= 1e-5), trimmed
    to the caption's tokens; bad videos are reported and skipped; the video folder is untouched."""
    import imageio.v2 as iio
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    from fastvideo_jax.entrypoints.preprocess_cli import preprocess

    pipe, videos = clips
    before = _tree(videos)
    meta = preprocess(pipe, videos, tmp_path / "ds", height=32, width=32, num_frames=5, train_fps=8,
                      random_crop=False, shard_size=1, progress=False)
    assert _tree(videos) == before
    assert meta["count"] == 2 and meta["skipped"] == 2 and len(meta["shards"]) == 2
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in json.loads((tmp_path / "ds" / "skipped.json").read_text())}
    assert skipped["short.mp4"].startswith("too short") and skipped["broken.mp4"].startswith("unreadable")
    ds = D.LatentDataset(tmp_path / "ds", raw=True)
    dit_space = D.LatentDataset(tmp_path / "ds")
    vae = AutoencoderKLWan.from_pretrained(pipe / "vae").eval()
    ref_pipe = WanPipeline.from_pretrained(pipe)
    transform = _fastvideo_transform().CenterCropResizeVideo((32, 32))
    for i, (name, picks) in enumerate([("a.mp4", [0, 1, 2, 3, 4]), ("sub/b.mp4", [0, 2, 4, 6, 8])]):
        info = ds.info(i)
        assert info["source"] == name.split("/")[-1] and info["frame_indices"] == picks
        frames = np.stack([f[..., :3] for f in iio.mimread(videos / name)])[picks]
        video = transform(torch.from_numpy(frames).permute(0, 3, 1, 2)).permute(1, 0, 2, 3).float() / 127.5 - 1.0
        with torch.no_grad():
            ref = vae.encode(video[None]).latent_dist.mean[0].numpy()
        got = ds[i]["latents"]
        assert got.shape == ref.shape
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, f"latents {name}: max-abs {np.abs(got - ref).max():.3g}, relative {rel:.3g}"
        mean = np.asarray(vae.config.latents_mean, np.float32).reshape(-1, 1, 1, 1)
        std = np.asarray(vae.config.latents_std, np.float32).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(dit_space[i]["latents"], (got - mean) / std, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            embeds, _ = ref_pipe.encode_prompt(info["caption"], do_classifier_free_guidance=False,
                                               max_sequence_length=ds.text_len)
        ref_text = embeds[0].numpy()
        sample = ds[i]
        n = int(sample["prompt_mask"].sum())
        assert 0 < n < ds.text_len and np.all(ref_text[n:] == 0)
        np.testing.assert_allclose(sample["prompt_embeds"], ref_text, rtol=0, atol=1e-5 * np.abs(ref_text).max())


def test_preprocess_cli_bad_input_is_one_line_and_writes_nothing(clips, tmp_path, capsys):
    from fastvideo_jax.entrypoints.cli import main

    pipe, videos = clips
    before = _tree(videos)
    args = ["preprocess", "--model", str(pipe), "--videos", str(videos), "--height", "32", "--width", "32",
            "--num-frames", "5", "--train-fps", "8", "--no-progress"]
    bad_manifest = tmp_path / "caps.json"
    bad_manifest.write_text(json.dumps([{"path": "a.mp4"}, {"path": "nope.mp4", "caption": "x"}]))
    cases = [
        (["--output", str(videos / "ds")], "DST is inside SRC"),
        (["--output", str(tmp_path / "o1"), "--captions", str(bad_manifest)],
         r"entry 0 \('a.mp4'\): no caption.*'nope.mp4'\): no such file.*no manifest entry: broken.mp4"),
        (["--output", str(tmp_path / "o2"), "--num-frames", "6"], "1 \\+ 4k|num_frames"),
        (["--output", str(tmp_path)], "exists; choose a new folder or pass --overwrite"),
    ]
    for extra, message in cases:
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        import re

        assert re.search(message, err[0]), (message, err[0])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert _tree(videos) == before


def test_preprocess_with_no_usable_video_writes_nothing(clips, tmp_path):
    from fastvideo_jax.entrypoints.preprocess_cli import preprocess

    pipe, videos = clips
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"x" * 64)
    (bad / "captions.csv").write_text("path,caption\nbroken.mp4,a caption\n")
    with pytest.raises(UserError, match="no usable video among 1: broken.mp4: unreadable"):
        preprocess(pipe, bad, tmp_path / "out", height=32, width=32, num_frames=5, progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]
