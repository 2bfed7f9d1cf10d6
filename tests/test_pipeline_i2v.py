"""Wan2.1 image-to-video end to end: parity with diffusers' WanImageToVideoPipeline (CLIP vision tower, image
VAE encode, frame mask) on tiny noised components, a non-square image resized to the request, and bad input
(no image, a wrong image, an image for text-to-video) refused before any weight is read."""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fastvideo_jax.configs.models.encoders.clip import CLIP_VISION_PRESETS
from fastvideo_jax.configs.pipelines.wan import WanTinyConfig
from fastvideo_jax.entrypoints import video_generator
from fastvideo_jax.entrypoints.cli import main as cli_main
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.pipelines.registry import resolve_pipeline_cls
from fastvideo_jax.pipelines.stages.image import frame_mask
from fastvideo_jax.pipelines.wan import WanPipeline
from fastvideo_jax.pipelines.wan_i2v import WanImageToVideoPipeline
from fastvideo_jax.testing.tokenizer import build_t5_tokenizer
from tests.oracles import TINY_WAN_I2V, add_noise, errors

# diffusers' I2V cross-attention takes the last 512 context tokens as text and the rest as image: its pipeline is
# only correct with the text padded to 512 tokens (as real Wan I2V checkpoints run it).
TEXT_LEN = 512
VISION = dict(CLIP_VISION_PRESETS["tiny"])  # hidden 24, intermediate 37, 30x30 images in 6x6 patches, 3 layers
REQUEST = dict(negative_prompt="blurry, static", height=32, width=48, num_frames=5, num_inference_steps=4,
               guidance_scale=5.0)


def _image(h: int = 45, w: int = 71, seed: int = 0) -> np.ndarray:
    """A non-square uint8 RGB image with some structure (gradients plus noise), so resizing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 5 + y / 7)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _diffusers_clean_without_ftfy():
    """diffusers 0.42's pipeline_wan_i2v calls ftfy unconditionally (its pipeline_wan checks is_ftfy_available, as
    our prompt cleaning does); without ftfy installed, use pipeline_wan's guarded cleaning there too."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)
        yield


@pytest.fixture(scope="module")
def diffusers_pipe(tmp_path_factory):
    """A noised tiny diffusers WanImageToVideoPipeline (CLIP vision tower included), saved with save_pretrained."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    transformer = add_noise(WanTransformer3DModel(**{**TINY_WAN_I2V, "image_dim": VISION["hidden_size"]}).eval(),
                            seed=1)
    vae = add_noise(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval(), scale=0.05, seed=2)
    text_encoder = add_noise(UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval(), seed=3)
    image_encoder = add_noise(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval(), seed=4)
    size = VISION["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanImageToVideoPipeline(tokenizer=build_t5_tokenizer(), text_encoder=text_encoder, transformer=transformer,
                                   vae=vae, scheduler=scheduler, image_encoder=image_encoder,
                                   image_processor=image_processor)
    root = tmp_path_factory.mktemp("wan_i2v_pipe")
    pipe.save_pretrained(root)
    return root, pipe


@pytest.fixture(scope="module")
def ours(diffusers_pipe):
    root, _ = diffusers_pipe
    return VideoGenerator.from_pretrained(root, dit_precision="fp32", vae_decode_precision="fp32", text_len=TEXT_LEN,
                                          flow_shift=3.0)


def test_resolves_the_i2v_pipeline_with_clip(ours):
    assert resolve_pipeline_cls("WanImageToVideoPipeline") is WanImageToVideoPipeline
    p = ours.pipeline
    assert type(p) is WanImageToVideoPipeline and p.image_encoder is not None and p.image_processor is not None
    assert [type(s).__name__ for s in p.stages] == [
        "InputValidationStage", "TextEncodingStage", "ImageEncodingStage", "TimestepPreparationStage",
        "LatentPreparationStage", "ImageVAEEncodingStage", "DenoisingStage", "DecodingStage"]


def test_end_to_end_parity_with_diffusers(diffusers_pipe, ours):
    """Same components, same initial latents, a non-square 45x71 image resized to 32x48: final latents and frames."""
    from PIL import Image

    _, pipe = diffusers_pipe
    prompt = "a cat playing piano in a sunny room"
    image = _image()
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    kwargs = dict(image=Image.fromarray(image), prompt=prompt, max_sequence_length=TEXT_LEN, **REQUEST)
    with torch.no_grad():
        ref_latents = pipe(output_type="latent", latents=latents.clone(), **kwargs).frames.float().numpy()
        ref_frames = pipe(output_type="np", latents=latents.clone(), **kwargs).frames  # (1, F, H, W, 3) in [0, 1]
    out = ours.generate_video(prompt, image=image, latents=latents.numpy(), progress=False, seed=0, **REQUEST)
    err, rel = errors(out["latents"], ref_latents)
    assert rel < 1e-4, f"final latents: max-abs {err:.3e}, relative {rel:.3e}"
    mse = np.mean((out["frames"].astype(np.float64) - np.asarray(ref_frames[0], np.float64) * 255) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert out["frames"].shape == (5, 32, 48, 3) and psnr >= 40, f"frames PSNR {psnr:.1f} dB"


def test_conditioning_equals_diffusers(diffusers_pipe, ours):
    """The two conditions on their own, each a named check: the CLIP penultimate hidden state of the image and the
    (mask, image latents) channels, against diffusers' encode_image and prepare_latents."""
    from PIL import Image

    _, pipe = diffusers_pipe
    image = _image(50, 37, seed=1)  # portrait this time
    p = ours.pipeline
    got = p.stages[2].encode(image)
    with torch.no_grad():
        want = pipe.encode_image(Image.fromarray(image), torch.device("cpu")).numpy()
        pixels = pipe.video_processor.preprocess(Image.fromarray(image), height=32, width=48)
        _, ref = pipe.prepare_latents(pixels, 2, 16, 32, 48, 9, torch.float32, torch.device("cpu"),
                                      latents=torch.zeros(2, 16, 3, 4, 6))
    err, rel = errors(got, want)
    assert got.shape == want.shape and rel < 1e-5, f"image embeddings: max-abs {err:.3e}"
    batch = p.initial_batch(ours.sampling_param(prompt="x", height=32, width=48, num_frames=9,
                                                num_videos_per_prompt=2), image=image)
    cond = p.stages[5](p.stages[4](batch)).latent_condition
    assert cond.shape == (2, 20, 3, 4, 6)
    np.testing.assert_array_equal(np.asarray(cond[:, :4]), ref[:, :4].numpy())  # the mask: exact
    err, rel = errors(cond[:, 4:], ref[:, 4:].numpy())
    assert rel < 1e-5, f"image latents: max-abs {err:.3e}, relative {rel:.3e}"


def test_frame_mask_layout():
    m = np.asarray(frame_mask(1, 3, 2, 2, 4))
    assert m.shape == (1, 4, 3, 2, 2)
    assert (m[:, :, 0] == 1).all() and (m[:, :, 1:] == 0).all()


def test_image_rows_follow_the_batch_and_cfg(ours):
    p = ours.pipeline
    image = _image()
    for cfg, videos in ((5.0, 1), (5.0, 2), (1.0, 3)):
        param = ours.sampling_param(prompt="x", guidance_scale=cfg, num_videos_per_prompt=videos, **{
            k: v for k, v in REQUEST.items() if k != "guidance_scale"})
        batch = p.stages[2](p.initial_batch(param, image=image))
        embeds = batch.conditioning["encoder_hidden_states_image"]
        assert embeds.shape[0] == videos * (2 if cfg > 1 else 1)
        assert bool(jnp.all(embeds == embeds[:1]))


def test_image_forms_agree(ours, tmp_path):
    """A path, a PIL.Image and the uint8 array of the same picture give the same video."""
    from PIL import Image

    image = _image()
    path = tmp_path / "first.png"
    Image.fromarray(image).save(path)
    small = dict(REQUEST, num_inference_steps=2)
    outs = [ours.generate_video("a dog", image=im, progress=False, seed=3, **small)["frames"]
            for im in (image, Image.fromarray(image), path, str(path))]
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0], other)
    other_image = ours.generate_video("a dog", image=image[::-1], progress=False, seed=3, **small)["frames"]
    assert not np.array_equal(outs[0], other_image)


@pytest.mark.parametrize("image,message", [
    (None, "is image-to-video: give the first frame"),
    (np.zeros((8, 8, 4), np.uint8), r"\(H, W, 3\) RGB, got shape \(8, 8, 4\)"),
    (np.zeros((8, 8), np.uint8), r"\(H, W, 3\) RGB, got shape \(8, 8\)"),
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    ("/nonexistent/first.png", "no such file"),
    (12, "must be a path, a PIL.Image or a uint8"),
])
def test_bad_image_is_a_user_error_before_work(ours, monkeypatch, image, message):
    def no_work(*a, **k):
        raise AssertionError("work started before the image was checked")

    monkeypatch.setattr(ours.pipeline, "run", no_work)
    with pytest.raises(UserError, match=message):
        ours.generate_video("x", image=image, progress=False, **REQUEST)


def test_unreadable_image_file(ours, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="not a readable image"):
        ours.generate_video("x", image=bad, progress=False, **REQUEST)


def test_text_to_video_refuses_an_image():
    with pytest.raises(UserError, match="text-to-video only: it takes no image"):
        WanPipeline.check_image(_image(), WanTinyConfig())
    assert WanPipeline.check_image(None, WanTinyConfig()) is None


def test_mismatched_components_are_checkpoint_errors(ours):
    parts = dict(ours.pipeline.components)
    no_clip = {k: v for k, v in parts.items() if k not in ("image_encoder", "image_processor")}
    with pytest.raises(CheckpointError, match="image_dim needs image_encoder and image_processor"):
        WanImageToVideoPipeline(no_clip, ours.pipeline.config)
    with pytest.raises(CheckpointError, match="expand_timesteps"):
        WanImageToVideoPipeline(parts, ours.pipeline.config.replace(expand_timesteps=True))
    with pytest.raises(CheckpointError, match="image_encoder without image_processor"):
        WanImageToVideoPipeline.check_config(ours.pipeline.config, ["transformer", "vae", "image_encoder"])


def test_half_a_clip_branch_fails_before_loading(diffusers_pipe, tmp_path, monkeypatch):
    """model_index.json listing image_encoder but not image_processor: a CheckpointError before any weight."""
    root = tmp_path / "half"
    shutil.copytree(diffusers_pipe[0], root)
    index = json.loads((root / "model_index.json").read_text())
    index["image_processor"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index))
    _fail_loading(monkeypatch)
    with pytest.raises(CheckpointError, match="image_encoder without image_processor"):
        VideoGenerator.from_pretrained(root)


def _fail_loading(monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the image was checked")

    monkeypatch.setattr(video_generator, "load_components", no_weights)


@pytest.mark.parametrize("kind,flags,message", [
    ("i2v", [], "is image-to-video: give the first frame"),
    ("i2v", ["--image", "MISSING"], "no such file"),
    ("t2v", ["--image", "IMAGE"], "text-to-video only: it takes no image"),
])
def test_cli_image_errors_before_loading(diffusers_pipe, tmp_path, capsys, monkeypatch, kind, flags, message):
    from PIL import Image

    root = diffusers_pipe[0]
    if kind == "t2v":  # the same directory presented as a text-to-video pipeline
        root = tmp_path / "t2v"
        shutil.copytree(diffusers_pipe[0], root)
        index = json.loads((root / "model_index.json").read_text())
        index["_class_name"] = "WanPipeline"
        (root / "model_index.json").write_text(json.dumps(index))
    Image.fromarray(_image()).save(tmp_path / "first.png")
    flags = [{"MISSING": str(tmp_path / "missing.png"), "IMAGE": str(tmp_path / "first.png")}.get(f, f) for f in flags]
    _fail_loading(monkeypatch)
    out = tmp_path / "o.mp4"
    code = cli_main(["generate", "--model", str(root), "--prompt", "x", "--output", str(out), "--height", "32",
                     "--width", "48", "--num-frames", "5", *flags])
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(f"error: .*{message}.*\n", err), err
    assert not out.exists()


def test_cli_image_to_video_writes_mp4(diffusers_pipe, tmp_path):
    from PIL import Image

    from fastvideo_jax.utils.video import read_mp4

    Image.fromarray(_image()).save(tmp_path / "first.png")
    out = tmp_path / "i2v.mp4"
    code = cli_main(["generate", "--model", str(diffusers_pipe[0]), "--prompt", "a robot", "--image",
                     str(tmp_path / "first.png"), "--height", "32", "--width", "48", "--num-frames", "5",
                     "--num-inference-steps", "2", "--dit-precision", "fp32", "--output", str(out), "--no-progress"])
    assert code == 0
    frames = read_mp4(out)
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8


# ---- Wan2.2 I2V-A14B layout: two 36-channel experts without a CLIP branch, boundary_ratio ---------------------
# UniPC with shift 3 over 4 steps conditions on timesteps 999, 900, 750, 500: boundary 0.8 (800) switches experts
# after two steps. No image branch in the DiT, so no 512-token text constraint.
A14B_TEXT_LEN = 16
A14B_REQUEST = dict(REQUEST, guidance_scale_2=3.0)


@pytest.fixture(scope="module")
def a14b_i2v(tmp_path_factory):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    def expert(seed):
        torch.manual_seed(seed)
        arch = {k: v for k, v in TINY_WAN_I2V.items() if k not in ("image_dim", "added_kv_proj_dim")}
        return add_noise(WanTransformer3DModel(**arch).eval(), seed=seed + 1)

    torch.manual_seed(0)
    vae = add_noise(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval(), scale=0.05, seed=2)
    text_encoder = add_noise(UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval(), seed=3)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanImageToVideoPipeline(tokenizer=build_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                                   scheduler=scheduler, transformer=expert(20), transformer_2=expert(30),
                                   image_encoder=None, image_processor=None, boundary_ratio=0.8)
    root = tmp_path_factory.mktemp("wan22_i2v_a14b")
    pipe.save_pretrained(root)
    ours = VideoGenerator.from_pretrained(root, dit_precision="fp32", vae_decode_precision="fp32",
                                          text_len=A14B_TEXT_LEN, flow_shift=3.0)
    return pipe, ours


def test_a14b_i2v_parity_with_diffusers(a14b_i2v):
    """Both experts (switching at 0.8 * 1000, guidance_scale_2 after), the image only through the latent condition."""
    from PIL import Image

    pipe, ours = a14b_i2v
    p = ours.pipeline
    assert type(p) is WanImageToVideoPipeline and p.config.boundary_ratio == 0.8
    assert p.transformer_2 is not None and p.image_encoder is None
    assert "ImageEncodingStage" not in [type(s).__name__ for s in p.stages]
    prompt, image = "a lighthouse in a storm", _image(40, 90, seed=2)
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(9))
    kwargs = dict(image=Image.fromarray(image), prompt=prompt, max_sequence_length=A14B_TEXT_LEN, **A14B_REQUEST)
    with torch.no_grad():
        ref_latents = pipe(output_type="latent", latents=latents.clone(), **kwargs).frames.float().numpy()
        ref_frames = pipe(output_type="np", latents=latents.clone(), **kwargs).frames
    out = ours.generate_video(prompt, image=image, latents=latents.numpy(), progress=False, **A14B_REQUEST)
    err, rel = errors(out["latents"], ref_latents)
    assert rel < 1e-4, f"final latents: max-abs {err:.3e}, relative {rel:.3e}"
    mse = np.mean((out["frames"].astype(np.float64) - np.asarray(ref_frames[0], np.float64) * 255) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert out["frames"].shape == (5, 32, 48, 3) and psnr >= 40, f"frames PSNR {psnr:.1f} dB"
    # the low-noise expert sees guidance_scale_2: another value, other latents
    other = ours.generate_video(prompt, image=image, latents=latents.numpy(), progress=False,
                                **{**A14B_REQUEST, "guidance_scale_2": 6.0})
    assert errors(other["latents"], out["latents"])[0] > 1e-3
