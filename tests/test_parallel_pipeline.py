"""The whole tiny pipeline on a data=2, sequence=4 mesh (8 fake CPU devices) against one device."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
from fastvideo_jax.configs.models.encoders.t5 import T5_PRESETS
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
from fastvideo_jax.testing.tiny_checkpoints import write_random_component
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

FP32 = dict(dit_precision="fp32", vae_decode_precision="fp32")
REQUEST = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0, seed=7,
               negative_prompt="blurry")


@pytest.fixture(scope="module")
def tiny_wan_4_heads(tmp_path_factory):
    """tiny-wan with a 4-head DiT, so that sequence = 4 divides the heads."""
    root = write_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan_4h"))
    shutil.rmtree(root / "transformer")
    arch = {**WAN_PRESETS["tiny"], "text_dim": T5_PRESETS["tiny"]["d_model"], "num_attention_heads": 4}
    write_random_component(root / "transformer", WanTransformer3DModel, "WanTransformer3DModel", arch, seed=5)
    return root


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_data2_sequence4_frames_equal_one_device(tiny_wan_4_heads):
    one = VideoGenerator.from_pretrained(tiny_wan_4_heads, mesh="data=1", **FP32)
    assert one.pipeline.mesh is None
    ref = one.generate_video("a cat", progress=False, **REQUEST)

    gen = VideoGenerator.from_pretrained(tiny_wan_4_heads, mesh="data=2,sequence=4", **FP32)
    assert dict(gen.pipeline.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    out = gen.generate_video("a cat", progress=False, **REQUEST)
    # the denoised latents stay on the mesh, batch over data
    assert out["latents"].sharding.mesh.devices.size == 8
    latents_err = np.abs(np.asarray(out["latents"]) - np.asarray(ref["latents"])).max()
    assert latents_err <= 1e-4 * np.abs(np.asarray(ref["latents"])).max()
    assert _psnr(out["frames"], ref["frames"]) >= 60.0


def test_bad_mesh_fails_before_any_weight_is_read(tiny_wan_4_heads, tmp_path, monkeypatch):
    from fastvideo_jax.models.loader import component_loader

    def no_load(*a, **k):
        raise AssertionError("weights were read before the mesh was checked")

    monkeypatch.setattr(component_loader, "load_component", no_load)
    cases = {
        "data=2,seq=4": "unknown axis 'seq'",
        "sequence=3": "needs 3 devices .* does not divide the 8 devices",
        "data=4,sequence=4": "needs 16 devices",
        "sequence=8": "4 attention heads do not divide over mesh tensor=1 x sequence=8",
        "data=x": "size of 'data' is 'x', not an integer",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message):
            VideoGenerator.from_pretrained(tiny_wan_4_heads, mesh=spec)


def test_generate_cli_mesh_flag_errors_in_one_line(tiny_wan_4_heads, tmp_path, capsys):
    from fastvideo_jax.entrypoints.cli import main as cli_main

    out = tmp_path / "x.mp4"
    code = cli_main(["generate", "--model", str(tiny_wan_4_heads), "--prompt", "a cat", "--output", str(out),
                     "--height", "32", "--width", "48", "--num-frames", "5", "--mesh", "sequence=8"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        "error: the DiT's 4 attention heads do not divide over mesh tensor=1 x sequence=8 = 8; "
        "pick sizes that divide 4")
