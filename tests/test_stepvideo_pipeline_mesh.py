"""The tiny StepVideo pipeline on 8 fake CPU devices, through ``VideoGenerator.from_pretrained(..., mesh=...)``:
the DiT split over sequence (Ulysses) and fsdp, CFG over data, Step-LLM and BERT sharded over every device, the
VAE decode split over rows/columns; every mesh gives the one-device latents (fp32, 1e-5 relative to max |ref|)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tests.oracles import errors

from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS
from fastvideo_jax.configs.pipelines.stepvideo import StepVideoT2VConfig
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.models.dits.stepvideo import StepVideoModel
from fastvideo_jax.parallel.memory import params_memory_kind
from fastvideo_jax.pipelines.stages import DenoisingStage
from fastvideo_jax.pipelines.stepvideo import StepVideoTextEncodingStage
from fastvideo_jax.testing.tiny_checkpoints import write_random_component
from fastvideo_jax.testing.tiny_stepvideo import write_tiny_stepvideo_pipeline

CONFIG = StepVideoT2VConfig(text_len=24, clip_len=13, dit_precision="fp32", vae_decode_precision="fp32",
                            text_encoder_precisions=("fp32", "fp32"))
REQUEST = dict(height=32, width=48, num_frames=17, num_inference_steps=2, guidance_scale=9.0, seed=7,
               negative_prompt="blurry")
# 2 x 2 x 3 = 12 latent tokens: sequence = 8 does not divide them (the padded, masked path); 4 does.


@pytest.fixture(scope="module")
def tiny_stepvideo_8_heads(tmp_path_factory):
    """tiny-stepvideo with an 8-head DiT (head dim 16), so that sequence = 8 divides the heads."""
    root = write_tiny_stepvideo_pipeline(tmp_path_factory.mktemp("tiny_stepvideo_8h"))
    dit = json.loads((root / "transformer" / "config.json").read_text())
    shutil.rmtree(root / "transformer")
    arch = {**STEPVIDEO_PRESETS["tiny"], "num_attention_heads": 8, "attention_head_dim": 16,
            **{k: dit[k] for k in ("in_channels", "out_channels", "caption_channels")}}
    write_random_component(root / "transformer", StepVideoModel, "StepVideoModel", arch, seed=5)
    return root


@pytest.fixture(scope="module")
def one_device(tiny_stepvideo_8_heads):
    gen = VideoGenerator.from_pretrained(tiny_stepvideo_8_heads, mesh="data=1", pipeline_config=CONFIG)
    assert gen.pipeline.stage(DenoisingStage).mesh is None
    out = gen.generate_video("a cat", progress=False, **REQUEST)
    return np.asarray(out["latents"]), out["frames"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _device_fraction(component) -> float:
    """The share of ``component``'s parameter bytes that device 0 holds (1.0: everything replicated)."""
    from flax import nnx

    total = held = 0
    for _, var in nnx.to_flat_state(nnx.state(component, nnx.Param)):
        a = var[...]
        total += a.nbytes
        held += sum(s.data.nbytes for s in a.addressable_shards if s.device.id == 0)
    return held / total


def test_default_mesh_matches_one_device(tiny_stepvideo_8_heads, one_device):
    """No mesh on 8 devices: the logged default (CFG on data=2, sequence=4); DiT, Step-LLM and BERT weights split
    over the devices; the same latents and frames as one device."""
    ref, ref_frames = one_device
    gen = VideoGenerator.from_pretrained(tiny_stepvideo_8_heads, pipeline_config=CONFIG)
    pipe = gen.pipeline
    assert dict(pipe.stage(DenoisingStage).mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    fractions = {n: _device_fraction(pipe.components[n]) for n in ("transformer", "text_encoder", "text_encoder_2")}
    print(fractions)
    assert all(f <= 0.25 for f in fractions.values()), fractions  # 1/8 of the big weights, small ones whole
    out = gen.generate_video("a cat", progress=False, **REQUEST)
    assert out["latents"].sharding.mesh.devices.size == 8
    err, rel = errors(out["latents"], ref)
    assert rel <= 1e-5, (err, rel)
    assert np.abs(ref).max() > 0.1  # not a vacuous comparison
    assert _psnr(out["frames"], ref_frames) >= 60.0

    # text_encoder_offload: both encoders back in host memory after encoding, the same conditioning
    stage = pipe.stage(StepVideoTextEncodingStage)
    batch = pipe.initial_batch(gen.sampling_param(prompt="a cat", **REQUEST))
    want = stage(batch).conditioning
    stage.config = CONFIG.replace(text_encoder_offload=True)
    for _ in range(2):
        got = stage(batch).conditioning
        for name in ("text_encoder", "text_encoder_2"):
            assert params_memory_kind(pipe.components[name]) == {"pinned_host"}, name
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


@pytest.mark.parametrize("mesh", ["sequence=8", "fsdp=2,sequence=4"])
def test_sequence_and_fsdp_meshes_match_one_device(tiny_stepvideo_8_heads, one_device, mesh):
    """All 8 devices on sequence (12 tokens padded to 16), and fsdp x sequence (the CFG batch over fsdp)."""
    gen = VideoGenerator.from_pretrained(tiny_stepvideo_8_heads, mesh=mesh, pipeline_config=CONFIG)
    out = gen.generate_video("a cat", progress=False, **REQUEST)
    err, rel = errors(out["latents"], one_device[0])
    assert rel <= 1e-5, (mesh, err, rel)
    assert _psnr(out["frames"], one_device[1]) >= 60.0
