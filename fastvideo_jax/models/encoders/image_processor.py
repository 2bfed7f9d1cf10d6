"""CLIP image preprocessing (Transformers' ``CLIPImageProcessor``) in numpy, bit-exact.

Steps, as Transformers runs them on a uint8 RGB image: resize so the shortest edge is ``size["shortest_edge"]``
(the long edge ``int(short * long / short_in)``, truncated) with Pillow's resampling filter; center crop
(``top = (H - h) // 2``, zero padding when the image is smaller); rescale (``uint8 -> float64 * factor ->
float32``); normalise ``(x - mean) / std`` in float32; channels first.

Why Pillow does the resize (and only the resize): Transformers' processor resizes through the installed Pillow,
whose uint8 path is fixed-point and two-pass, each pass rounded to uint8, with an antialiasing support that widens
with the downscale factor. A numpy port of Pillow's published algorithm (horizontal pass, then vertical) matched
the installed Pillow 13.0.0 bit for bit, except that this Pillow sometimes runs the vertical pass first (measured:
1000x223 -> 224x49 vertical first, 720x1280 -> 17x9 horizontal first), and the two orders differ by one uint8
level on ~13% of pixels. Calling Pillow keeps
the result equal to Transformers' with whichever Pillow is installed (imageio already requires it); the rest
(crop, rescale, normalise, layout) is numpy. Inputs: ``PIL.Image`` ones are converted to RGB as Transformers
does (RGBA and transparent palettes composited onto white); arrays must already be uint8 RGB.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastvideo_jax.errors import CheckpointError, UserError

__all__ = ["CLIPImageProcessor", "load_rgb", "pillow_resize", "center_crop"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# PIL.Image.Resampling values.
RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def pillow_resize(img: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """A uint8 (H, W, 3) image resized to (height, width) by Pillow, as Transformers' processor does it."""
    from PIL import Image

    if resample not in RESAMPLE_NAMES:
        raise UserError(f"image resize: resample={resample} is not a Pillow filter; filters: {RESAMPLE_NAMES}")
    return np.asarray(Image.fromarray(img).resize((width, height), resample=resample))


def load_rgb(image: Any) -> np.ndarray:
    """A uint8 (H, W, 3) RGB array from a path, a ``PIL.Image`` or a uint8 (H, W, 3) array (never modified)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path}: no such file")
        try:
            with Image.open(path) as opened:
                return load_rgb(opened.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"image {path}: not a readable image ({e})") from None
    if type(image).__module__.startswith("PIL."):
        from PIL import Image

        if "A" in image.getbands() or image.info.get("transparency") is not None:  # onto white, as Transformers
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"))
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise UserError(f"image must be a path, a PIL.Image or a uint8 (H, W, 3) array, got {type(image).__name__}")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise UserError(f"image array must be (H, W, 3) RGB, got shape {tuple(array.shape)} "
                        f"({array.shape[-1] if array.ndim else 0} channels?)")
    if array.dtype != np.uint8:
        raise UserError(f"image array must be uint8 (0-255), got {array.dtype}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise UserError(f"image array is empty: shape {tuple(array.shape)}")
    return array


def _hw(value: Any, key: str, source: str) -> tuple[int, int] | int:
    """``{"height", "width"}`` -> (h, w); ``{"shortest_edge"}`` or an int -> the int."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"])
        if set(value) == {"height", "width"}:
            return int(value["height"]), int(value["width"])
    raise CheckpointError(f"{source}: {key}={value!r} unsupported; expected an int, {{'shortest_edge': N}} or "
                          "{'height': H, 'width': W}")


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
    """``preprocessor_config.json`` fields of Transformers' ``CLIPImageProcessor`` (its defaults)."""

    do_resize: bool = True
    size: int | tuple[int, int] = 224  # shortest edge, or (height, width)
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_NAMES:
            raise UserError(f"CLIPImageProcessor: resample={self.resample} is not a Pillow filter; filters: "
                            f"{RESAMPLE_NAMES}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise UserError(f"CLIPImageProcessor: image_mean/image_std need 3 values (RGB), got {self.image_mean}, "
                            f"{self.image_std}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "preprocessor_config.json") -> CLIPImageProcessor:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "size" in kwargs:
            kwargs["size"] = _hw(kwargs["size"], "size", source)
        if "crop_size" in kwargs:
            crop = _hw(kwargs["crop_size"], "crop_size", source)
            kwargs["crop_size"] = (crop, crop) if isinstance(crop, int) else crop
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        return cls(**kwargs)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after resize (Transformers' ``get_resize_output_image_size`` with ``default_to_square=False``)."""
        if not self.do_resize:
            return height, width
        if isinstance(self.size, tuple):
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def preprocess_one(self, image: Any) -> np.ndarray:
        """(3, H, W) float32 pixel values of one image."""
        img = load_rgb(image)
        if self.do_resize:
            img = pillow_resize(img, *self.output_size(*img.shape[:2]), self.resample)
        if self.do_center_crop:
            img = center_crop(img, *self.crop_size)
        x = (img.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.do_rescale else img
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            x = (x - np.asarray(self.image_mean, x.dtype)) / np.asarray(self.image_std, x.dtype)
        return np.ascontiguousarray(np.moveaxis(x, -1, 0))

    def __call__(self, images: Any | Sequence[Any]) -> np.ndarray:
        """(B, 3, H, W) float32 ``pixel_values`` of one image or a list of them (each a path, a ``PIL.Image`` or a
        uint8 (H, W, 3) array)."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise UserError("CLIPImageProcessor: no images given")
        return np.stack([self.preprocess_one(im) for im in batch])


def center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Transformers' ``center_crop`` of an (H, W, C) image: ``top = (H - h) // 2``; zero padding (centred,
    rounded up) where the image is smaller than the crop."""
    h, w = img.shape[:2]
    if h >= height and w >= width:
        top, left = (h - height) // 2, (w - width) // 2
        return img[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    canvas = np.zeros((new_h, new_w) + img.shape[2:], img.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = img
    top, left = (h - height) // 2 + pad_top, (w - width) // 2 + pad_left
    return canvas[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]
