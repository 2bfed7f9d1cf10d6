"""The CLIP image processor against Transformers' ``CLIPImageProcessor`` (its Pillow backend: the one Transformers
uses without torchvision, as here): bit-equal pixel values on non-square uint8 images; inputs and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.encoders.image_processor import CLIPImageProcessor
from fastvideo_jax.models.loader.component_loader import ImageProcessorLoader

# (H, W): down- and up-scaling, portrait and landscape, one side already at 224, extreme aspect ratios.
SHAPES = [(37, 53), (300, 181), (480, 832), (1000, 223), (13, 400), (224, 224), (225, 224), (5, 7), (720, 1280)]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth shading plus noise (flat noise alone would hide filter-support errors less well)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 64 * 4], -1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def _reference(processor, images) -> np.ndarray:
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_default_processor_equals_transformers(shape):
    img = _image(*shape)
    before = img.copy()
    got = CLIPImageProcessor()(img)
    want = _reference(CLIPImageProcessorPil(), img)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape == (1, 3, 224, 224)
    np.testing.assert_array_equal(got, want)  # exact: the same Pillow resize, the same float ops in the same order
    np.testing.assert_array_equal(img, before, err_msg="the input array was modified")


@pytest.mark.parametrize("config", [
    dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),  # the tiny vision tower's input
    dict(size={"height": 20, "width": 17}, crop_size={"height": 24, "width": 26}),  # crop larger: zero padding
    dict(size={"shortest_edge": 41}, crop_size={"height": 33, "width": 29}, resample=2,  # bilinear, odd crop
         image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 0.125]),
    dict(do_resize=False, crop_size={"height": 32, "width": 32}, do_normalize=False),
], ids=["tiny", "pad", "bilinear", "crop-only"])
def test_saved_configs_equal_transformers(tmp_path, config):
    CLIPImageProcessorPil(**config).save_pretrained(tmp_path)
    ours = ImageProcessorLoader().load(tmp_path)
    ref = CLIPImageProcessorPil.from_pretrained(tmp_path)
    images = [_image(61, 47, seed=1), _image(23, 90, seed=2)]  # a batch of differently shaped images
    np.testing.assert_array_equal(ours(images), _reference(ref, images))


def test_path_and_pil_inputs(tmp_path):
    rgb = _image(50, 70, seed=3)
    alpha = np.random.default_rng(4).integers(0, 256, (50, 70, 1), dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    gray = Image.fromarray(rgb[..., 0], "L")
    rgba.save(tmp_path / "img.png")
    ref, ours = CLIPImageProcessorPil(), CLIPImageProcessor()
    for image in (rgba, gray, Image.fromarray(rgb)):  # RGBA composited onto white, L repeated, as Transformers
        np.testing.assert_array_equal(ours(image), _reference(ref, image), err_msg=image.mode)
    np.testing.assert_array_equal(ours(tmp_path / "img.png"), _reference(ref, rgba))
    np.testing.assert_array_equal(ours(str(tmp_path / "img.png")), _reference(ref, rgba))


@pytest.mark.parametrize("bad,message", [
    (np.zeros((16, 16, 4), np.uint8), r"must be \(H, W, 3\) RGB, got shape \(16, 16, 4\)"),
    (np.zeros((16, 16), np.uint8), r"must be \(H, W, 3\) RGB, got shape \(16, 16\)"),
    (np.zeros((3, 16, 16), np.uint8), r"must be \(H, W, 3\) RGB, got shape \(3, 16, 16\)"),
    (np.zeros((16, 16, 3), np.float32), r"must be uint8 \(0-255\), got float32"),
    (np.zeros((0, 16, 3), np.uint8), r"image array is empty"),
    ([[1, 2, 3]], r"a path, a PIL.Image or a uint8 \(H, W, 3\) array, got list"),
])
def test_bad_images_are_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        CLIPImageProcessor()(bad)


def test_bad_files_and_configs(tmp_path):
    with pytest.raises(UserError, match=r"missing\.png: no such file"):
        CLIPImageProcessor()(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match=r"notes\.png: not a readable image"):
        CLIPImageProcessor()(tmp_path / "notes.png")
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json"):
        ImageProcessorLoader().load(tmp_path)  # no config in the folder
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"longest_edge": 224}}')
    with pytest.raises(CheckpointError, match=r"size=\{'longest_edge': 224\} unsupported"):
        ImageProcessorLoader().load(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"image_processor_type": "SiglipImageProcessor"}')
    with pytest.raises(CheckpointError, match=r"'SiglipImageProcessor' is not supported"):
        ImageProcessorLoader().load(tmp_path)
    with pytest.raises(UserError, match="no images given"):
        CLIPImageProcessor()([])
