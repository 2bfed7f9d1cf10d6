"""Wan2.1 T2V end to end: parity with diffusers' WanPipeline, determinism, CLI mp4, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fastvideo_jax.entrypoints.cli import main as cli_main
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.models.loader.safetensors_io import CheckpointError
from fastvideo_jax.utils.video import read_mp4
from tests.oracles import TINY_WAN, add_noise, errors, tiny_wan_parts

TEXT_LEN = 16


@pytest.fixture(scope="module")
def diffusers_pipe(tmp_path_factory):
    """A noised tiny diffusers WanPipeline, saved with save_pretrained."""
    from diffusers import WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = add_noise(WanTransformer3DModel(**TINY_WAN).eval(), seed=1)
    pipe = WanPipeline(transformer=transformer, **tiny_wan_parts())
    root = tmp_path_factory.mktemp("wan_pipe")
    pipe.save_pretrained(root)
    return root, pipe


@pytest.fixture(scope="module")
def ours(diffusers_pipe):
    root, _ = diffusers_pipe
    return VideoGenerator.from_pretrained(root, dit_precision="fp32", vae_decode_precision="fp32", text_len=TEXT_LEN,
                                          flow_shift=3.0)


REQUEST = dict(negative_prompt="blurry, static", height=32, width=48, num_frames=5, num_inference_steps=4,
               guidance_scale=5.0)


def test_end_to_end_parity_with_diffusers(diffusers_pipe, ours):
    _, pipe = diffusers_pipe
    prompt = "a cat playing piano in a sunny room"
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    kwargs = dict(prompt=prompt, max_sequence_length=TEXT_LEN, latents=latents.clone(), **REQUEST)
    with torch.no_grad():
        ref_latents = pipe(output_type="latent", **kwargs).frames.float().numpy()
        kwargs["latents"] = latents.clone()
        ref_frames = pipe(output_type="np", **kwargs).frames  # (1, F, H, W, 3) in [0, 1]
    out = ours.generate_video(prompt, latents=latents.numpy(), progress=False, seed=0, **REQUEST)
    err, rel = errors(out["latents"], ref_latents)
    assert err < 1e-4, f"final latents: max-abs {err:.3e}, relative {rel:.3e}"
    mse = np.mean((out["frames"].astype(np.float64) - np.asarray(ref_frames[0], np.float64) * 255) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert out["frames"].shape == (5, 32, 48, 3) and psnr >= 40, f"frames PSNR {psnr:.1f} dB"


def test_same_seed_same_frames_other_seed_differs(ours):
    a = ours.generate_video("a dog on the beach", seed=7, progress=False, **REQUEST)["frames"]
    b = ours.generate_video("a dog on the beach", seed=7, progress=False, **REQUEST)["frames"]
    c = ours.generate_video("a dog on the beach", seed=8, progress=False, **REQUEST)["frames"]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_steps_guidance_seed_do_not_recompile(ours, monkeypatch):
    """The jitted denoising step is traced once per shape: steps, guidance and seed are runtime values."""
    import fastvideo_jax.pipelines.stages.denoising as denoising
    from fastvideo_jax.pipelines.wan import WanPipeline

    traces = []
    real = denoising._denoise_step

    def counting(*args):
        traces.append(args[2])  # use_cfg
        return real(*args)

    monkeypatch.setattr(denoising, "_denoise_step", counting)
    p = ours.pipeline
    fresh = WanPipeline(p.components, p.config)
    gen = VideoGenerator(fresh, ours.defaults, ours.model_path)
    for steps, guidance, seed in [(4, 5.0, 1), (2, 3.0, 2), (6, 7.5, 3)]:
        gen.generate_video("a prompt", progress=False, **{**REQUEST, "num_inference_steps": steps,
                                                            "guidance_scale": guidance, "seed": seed})
    assert traces == [True], f"traced {len(traces)} times"


def test_cli_writes_playable_mp4(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tiny.mp4"
    code = cli_main(["generate", "--model", "tiny-wan", "--prompt", "a robot dancing", "--height", "48",
                     "--width", "80", "--num-frames", "9", "--num-inference-steps", "2", "--fps", "8",
                     "--output", str(out), "--no-progress"])
    assert code == 0
    frames = read_mp4(out)
    assert frames.shape == (9, 48, 80, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--height", "60"], "multiples of 16"),
        (["--width", "100"], "multiples of 16"),
        (["--num-frames", "8"], "1 \\+ 4k"),
        (["--num-inference-steps", "0"], "at least 1"),
        (["--seed", "-3"], "seed must be"),
    ],
)
def test_bad_sampling_input_fails_before_loading(tmp_path, capsys, flags, message):
    missing = tmp_path / "does-not-exist"
    code = cli_main(["generate", "--model", str(missing), "--prompt", "x", "--output", str(tmp_path / "o.mp4"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(f"error: .*{message}.*\n", err), err
    assert not missing.exists()


def test_unknown_model_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="nobody-here/no-such-model"):
        VideoGenerator.from_pretrained("nobody-here/no-such-model")


def test_dir_without_model_index(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        VideoGenerator.from_pretrained(tmp_path)


def test_unsupported_pipeline_class(diffusers_pipe, tmp_path):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(diffusers_pipe[0], root)
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "HunyuanVideoPipeline"
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="HunyuanVideoPipeline"):
        VideoGenerator.from_pretrained(root)


def test_compilation_cache_switch(monkeypatch, tmp_path):
    import jax

    from fastvideo_jax.utils.compile_cache import enable_persistent_cache

    monkeypatch.setenv("FASTVIDEO_JAX_COMPILATION_CACHE", "0")
    assert enable_persistent_cache(tmp_path / "xla") is None and not (tmp_path / "xla").exists()
    monkeypatch.setenv("FASTVIDEO_JAX_COMPILATION_CACHE", "")
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    try:
        assert enable_persistent_cache(tmp_path / "xla") == tmp_path / "mine"  # a user's setting wins
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
