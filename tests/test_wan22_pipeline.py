"""Wan2.2 pipelines end to end vs diffusers on tiny noised components (fp32): TI2V-5B's per-token timesteps with
the 48-channel VAE (text- and image-to-video) and A14B's two experts; expert switches retrace nothing; the
checkpoint's boundary ratio is checked before any weight is read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo_jax.configs.models.vaes.wanvae import WAN_VAE_PRESETS
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.testing.tokenizer import build_t5_tokenizer
from tests.oracles import TINY_WAN, add_noise, errors

TEXT_LEN = 16
PROMPT = "a red fox running through fresh snow"
FP32 = dict(dit_precision="fp32", vae_decode_precision="fp32", text_len=TEXT_LEN, flow_shift=3.0)


def _text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    return add_noise(UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval(), seed=3)


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _dit(seed: int, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return add_noise(WanTransformer3DModel(**{**TINY_WAN, **overrides}).eval(), seed=seed + 1)


def _psnr(ours: np.ndarray, ref01: np.ndarray) -> float:
    mse = np.mean((ours.astype(np.float64) - np.asarray(ref01, np.float64) * 255) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def _check(out, ref_latents, ref_frames, shape):
    err, rel = errors(out["latents"], ref_latents)
    assert rel <= 1e-4, f"final latents: max-abs {err:.3e}, relative {rel:.3e}"
    psnr = _psnr(out["frames"], ref_frames[0])
    assert out["frames"].shape == shape and psnr >= 40, f"frames {out['frames'].shape}, PSNR {psnr:.1f} dB"


# ---- TI2V-5B: expand_timesteps + the 48-channel Wan2.2 VAE -------------------------------------------------
TI2V_REQUEST = dict(negative_prompt="blurry, static", height=32, width=64, num_frames=5, num_inference_steps=4,
                    guidance_scale=5.0)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline

    torch.manual_seed(0)
    vae_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in WAN_VAE_PRESETS["tiny-wan2.2"].items()}
    vae = add_noise(AutoencoderKLWan(**vae_cfg).eval(), scale=0.05, seed=2)
    parts = dict(tokenizer=build_t5_tokenizer(), text_encoder=_text_encoder(), vae=vae, scheduler=_scheduler(),
                 transformer=_dit(10, in_channels=48, out_channels=48))
    t2v = WanPipeline(**parts, expand_timesteps=True)
    i2v = WanImageToVideoPipeline(**parts, image_encoder=None, image_processor=None, expand_timesteps=True)
    root = tmp_path_factory.mktemp("ti2v")
    t2v.save_pretrained(root)
    ours = VideoGenerator.from_pretrained(root, **FP32)
    return t2v, i2v, ours


def test_ti2v_config_comes_from_the_checkpoint(ti2v):
    *_, ours = ti2v
    assert ours.pipeline.config.expand_timesteps is True and ours.pipeline.config.boundary_ratio is None


def test_ti2v_text_to_video_parity_with_diffusers(ti2v):
    t2v, _, ours = ti2v
    latents = torch.randn(1, 48, 2, 2, 4, generator=torch.Generator().manual_seed(5))
    kwargs = dict(prompt=PROMPT, max_sequence_length=TEXT_LEN, **TI2V_REQUEST)
    with torch.no_grad():
        ref_latents = t2v(output_type="latent", latents=latents.clone(), **kwargs).frames.float().numpy()
        ref_frames = t2v(output_type="np", latents=latents.clone(), **kwargs).frames
    out = ours.generate_video(PROMPT, latents=latents.numpy(), progress=False, **TI2V_REQUEST)
    _check(out, ref_latents, ref_frames, (5, 32, 64, 3))


def test_ti2v_image_to_video_parity_with_diffusers(ti2v, monkeypatch):
    """diffusers' WanImageToVideoPipeline with expand_timesteps: the image's latent is the DiT's first frame at
    every step (its tokens at timestep 0) and the result's first frame."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    # diffusers' I2V module calls ftfy unconditionally; its T2V module (our reference cleaning) only when installed
    monkeypatch.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)
    _, i2v, ours = ti2v
    rgb = np.random.default_rng(3).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    latents = torch.randn(1, 48, 2, 2, 4, generator=torch.Generator().manual_seed(6))
    kwargs = dict(prompt=PROMPT, max_sequence_length=TEXT_LEN, **TI2V_REQUEST)
    with torch.no_grad():
        ref_latents = i2v(image=Image.fromarray(rgb), output_type="latent", latents=latents.clone(),
                          **kwargs).frames.float().numpy()
        ref_frames = i2v(image=Image.fromarray(rgb), output_type="np", latents=latents.clone(), **kwargs).frames
    out = ours.generate_video(PROMPT, image=rgb, latents=latents.numpy(), progress=False, **TI2V_REQUEST)
    _check(out, ref_latents, ref_frames, (5, 32, 64, 3))
    t2v_out = ours.generate_video(PROMPT, latents=latents.numpy(), progress=False, **TI2V_REQUEST)
    assert errors(t2v_out["latents"], out["latents"])[0] > 1e-2  # the image changes the video


def test_ti2v_bad_image_is_a_user_error_before_work(ti2v, monkeypatch):
    *_, ours = ti2v
    import fastvideo_jax.pipelines.stages.text as text

    monkeypatch.setattr(text, "encode_prompts", lambda *a, **k: pytest.fail("encoded text before the check"))
    with pytest.raises(UserError, match=r"\(H, W, 3\) RGB, got shape \(32, 64, 4\)"):
        ours.generate_video(PROMPT, image=np.zeros((32, 64, 4), np.uint8), progress=False, **TI2V_REQUEST)
    with pytest.raises(UserError, match="no such file"):
        ours.generate_video(PROMPT, image="/nonexistent/first_frame.png", progress=False, **TI2V_REQUEST)


# ---- A14B: two experts, boundary_ratio, guidance_scale_2 ---------------------------------------------------
# UniPC with shift 3 over 4 steps conditions on timesteps 999, 900, 750, 500: boundary 0.8 (800) switches
# experts after two steps.
A14B_REQUEST = dict(negative_prompt="blurry, static", height=32, width=48, num_frames=5, num_inference_steps=4,
                    guidance_scale=5.0, guidance_scale_2=3.0)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(0)
    vae = add_noise(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval(), scale=0.05, seed=2)
    pipe = WanPipeline(tokenizer=build_t5_tokenizer(), text_encoder=_text_encoder(), vae=vae, scheduler=_scheduler(),
                       transformer=_dit(20), transformer_2=_dit(30), boundary_ratio=0.8)
    root = tmp_path_factory.mktemp("a14b")
    pipe.save_pretrained(root)
    return root, pipe, VideoGenerator.from_pretrained(root, **FP32)


def test_a14b_parity_with_diffusers(a14b):
    _, pipe, ours = a14b
    assert ours.pipeline.config.boundary_ratio == 0.8 and ours.pipeline.transformer_2 is not None
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(7))
    kwargs = dict(prompt=PROMPT, max_sequence_length=TEXT_LEN, **A14B_REQUEST)
    with torch.no_grad():
        ref_latents = pipe(output_type="latent", latents=latents.clone(), **kwargs).frames.float().numpy()
        ref_frames = pipe(output_type="np", latents=latents.clone(), **kwargs).frames
    out = ours.generate_video(PROMPT, latents=latents.numpy(), progress=False, **A14B_REQUEST)
    _check(out, ref_latents, ref_frames, (5, 32, 48, 3))
    # guidance_scale_2 reaches the low-noise expert: another value, other latents
    other = ours.generate_video(PROMPT, latents=latents.numpy(), progress=False,
                                **{**A14B_REQUEST, "guidance_scale_2": 6.0})
    assert errors(other["latents"], out["latents"])[0] > 1e-3


def test_a14b_expert_schedule_and_no_retrace(a14b, monkeypatch):
    """One trace per expert; other step counts, guidance scales and seeds, and the switch itself, trace nothing
    more."""
    import fastvideo_jax.pipelines.stages.denoising as denoising
    from fastvideo_jax.pipelines.stages import DenoisingStage, TimestepPreparationStage
    from fastvideo_jax.pipelines.wan import WanPipeline

    *_, ours = a14b
    traces = []
    real = denoising._denoise_step

    def counting(*args, **kwargs):
        traces.append(args[0])  # the expert's graph
        return real(*args, **kwargs)

    monkeypatch.setattr(denoising, "_denoise_step", counting)
    fresh = WanPipeline(ours.pipeline.components, ours.pipeline.config)
    stage = fresh.stage(DenoisingStage)
    assert stage.expert_schedule(fresh.stage(TimestepPreparationStage).tables(4), 4) == [0, 0, 1, 1]
    gen = VideoGenerator(fresh, ours.defaults, ours.model_path)
    for steps, g, g2, seed in [(4, 5.0, 3.0, 1), (6, 4.0, 2.0, 2), (3, 7.5, 1.5, 3)]:
        gen.generate_video(PROMPT, progress=False, **{**A14B_REQUEST, "num_inference_steps": steps,
                                                      "guidance_scale": g, "guidance_scale_2": g2, "seed": seed})
    assert len(traces) == 2 and traces[0] is not traces[1], f"traced {len(traces)} times"


def test_a14b_expert_offload_keeps_one_expert_on_device(a14b):
    from fastvideo_jax.parallel.memory import params_memory_kind
    from fastvideo_jax.pipelines.wan import WanPipeline

    *_, ours = a14b
    p = ours.pipeline
    latents = np.random.default_rng(0).standard_normal((1, 16, 2, 4, 6)).astype(np.float32)
    ref = ours.generate_video(PROMPT, latents=latents, progress=False, **A14B_REQUEST)["latents"]
    offload = WanPipeline(p.components, p.config.replace(expert_offload=True))
    gen = VideoGenerator(offload, ours.defaults, ours.model_path)
    try:
        out = gen.generate_video(PROMPT, latents=latents, progress=False, **A14B_REQUEST)["latents"]
        assert params_memory_kind(p.transformer) == {"pinned_host"}  # the low-noise expert ran last
        assert params_memory_kind(p.transformer_2) != {"pinned_host"}
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    finally:
        from fastvideo_jax.parallel.memory import move_params

        move_params(p.transformer, None)  # the shared module goes back for the other tests


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_boundary_ratio_outside_unit_interval_fails_before_loading(a14b, monkeypatch, ratio):
    root, *_ = a14b
    import fastvideo_jax.entrypoints.video_generator as vg

    monkeypatch.setattr(vg, "load_components", lambda *a, **k: pytest.fail("loaded weights before the check"))
    with pytest.raises(UserError, match=r"boundary_ratio must be in \(0, 1\)"):
        VideoGenerator.from_pretrained(root, boundary_ratio=ratio)


def test_model_index_boundary_ratio_checked_before_loading(a14b, tmp_path, monkeypatch):
    root, *_ = a14b
    import fastvideo_jax.entrypoints.video_generator as vg

    monkeypatch.setattr(vg, "load_components", lambda *a, **k: pytest.fail("loaded weights before the check"))
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 1.25}))
    with pytest.raises(CheckpointError, match=r"bad/model_index.json: boundary_ratio must be in \(0, 1\) .*, got 1.25"):
        VideoGenerator.from_pretrained(bad)
    (bad / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(CheckpointError, match="transformer_2 .* but no boundary_ratio"):
        VideoGenerator.from_pretrained(bad)


def test_guidance_scale_2_needs_two_experts(ti2v):
    *_, ours = ti2v
    with pytest.raises(UserError, match="guidance_scale_2=2.0 is for the low-noise expert"):
        ours.generate_video(PROMPT, progress=False, **{**TI2V_REQUEST, "guidance_scale_2": 2.0})


def test_text_to_video_model_refuses_an_image(a14b):
    *_, ours = a14b
    with pytest.raises(UserError, match="text-to-video only"):
        ours.generate_video(PROMPT, image=np.zeros((32, 48, 3), np.uint8), progress=False, **A14B_REQUEST)
