"""Reading training clips as FastVideo's preprocessing does: frames resampled to ``train_fps``, a temporal crop
of ``num_frames``, a centre crop to the target aspect, then an antialiased bilinear resize, scaled to [-1, 1].

The resize is PyTorch's ``interpolate(mode="bilinear", align_corners=True, antialias=True)`` (what FastVideo's
``CenterCropResizeVideo`` calls), written as two separable weight matrices: the triangle filter widened by the
scale when shrinking, scale ``(in - 1) / (out - 1)``, tap centres at ``scale * (i + 0.5)``, weights normalised
per output pixel. FastVideo resizes the decoded uint8 frames, so PyTorch runs its fixed-point uint8 kernel (a
horizontal then a vertical pass, each rounded to uint8); ``transform_frames`` does the same integer arithmetic
and equals FastVideo's ``CenterCropResizeVideo`` bit for bit (``tests/test_preprocess.py``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np

__all__ = ["ClipSpec", "BadVideo", "frame_indices", "center_crop_box", "resize_weights", "transform_frames", "read_clip"]


class BadVideo(Exception):
    """A video that cannot give a training clip (unreadable, too short): reported and skipped."""


class ClipSpec:
    def __init__(self, num_frames: int, height: int, width: int, train_fps: float, seed: int = 42,
                 random_crop: bool = True):
        self.num_frames, self.height, self.width = num_frames, height, width
        self.train_fps, self.seed, self.random_crop = train_fps, seed, random_crop


def frame_indices(fps: float, duration: float, spec: ClipSpec, rng: random.Random) -> list[int]:
    """FastVideo's FrameSamplingStage: every ``fps / train_fps``-th source frame, then ``num_frames`` of them
    from a random start (TemporalRandomCrop) or from the first. Raises ``BadVideo`` when too few remain."""
    total = math.ceil(fps * duration)
    picks = np.arange(0, total, fps / spec.train_fps).astype(int)
    if len(picks) < spec.num_frames:
        raise BadVideo(f"too short: {len(picks)} frames at {spec.train_fps} fps ({duration:.2f} s at {fps:g} fps), "
                       f"{spec.num_frames} needed")
    begin = rng.randint(0, max(0, len(picks) - spec.num_frames - 1)) if spec.random_crop else 0
    return picks[begin:begin + spec.num_frames].tolist()


def center_crop_box(h: int, w: int, th: int, tw: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the largest centred crop of aspect th/tw (FastVideo's center_crop_th_tw,
    Python's round included)."""
    ratio = th / tw
    new_h, new_w = (int(w * ratio), w) if h / w > ratio else (h, int(h / ratio))
    return int(round((h - new_h) / 2.0)), int(round((w - new_w) / 2.0)), new_h, new_w


def resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float64 weights of an antialiased bilinear resize with align_corners=True."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else size_in / size_out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        taps = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((taps - center + 0.5) * inv), 0.0, None)
        total = w.sum()
        weights[i, lo:hi] = w / total if total > 0 else w
    return weights


def fixed_point_weights(size_in: int, size_out: int) -> tuple[np.ndarray, int]:
    """``resize_weights`` as the integers PyTorch's uint8 path uses: scaled by 2**precision, the largest
    precision (< 22) whose largest weight still fits in int16, rounded half away from zero."""
    weights = resize_weights(size_in, size_out)
    biggest, precision = weights.max(), 0
    while precision < 22 and int(0.5 + biggest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)).astype(np.int64), precision


def _resize_axis(x: np.ndarray, size_out: int, axis: int) -> np.ndarray:
    """One separable uint8 pass: integer weights, round by half an output step, shift, clamp to [0, 255]."""
    if x.shape[axis] == size_out:
        return x
    weights, precision = fixed_point_weights(x.shape[axis], size_out)
    moved = np.moveaxis(x, axis, -1).astype(np.int64)
    out = np.clip((moved @ weights.T + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def transform_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (3, F, height, width) float32 in [-1, 1]: centre crop, then the resize on uint8
    as FastVideo runs it (PyTorch's uint8 antialiased path: horizontal pass, then vertical, each rounded to
    uint8 in fixed point), then x / 127.5 - 1."""
    top, left, ch, cw = center_crop_box(frames.shape[1], frames.shape[2], height, width)
    crop = frames[:, top:top + ch, left:left + cw]
    out = _resize_axis(_resize_axis(crop, width, 2), height, 1).astype(np.float32)
    return np.transpose(out / 127.5 - 1.0, (3, 0, 1, 2))


def read_clip(path: Path, spec: ClipSpec, rng: random.Random) -> tuple[np.ndarray, list[int]]:
    """The training clip of ``path`` (3, num_frames, height, width) in [-1, 1] and the source frame indices.
    ``BadVideo`` for a file that cannot be decoded or is too short."""
    import imageio.v2 as iio

    try:
        reader = iio.get_reader(str(path), "ffmpeg")
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad video, reported by the caller
        raise BadVideo(f"unreadable ({_reason(e)})") from None
    try:
        meta = reader.get_meta_data()
        fps, duration = float(meta.get("fps") or 0), float(meta.get("duration") or 0)
        if fps <= 0 or duration <= 0:
            raise BadVideo(f"no frame rate or duration in the file (fps={fps}, duration={duration})")
        picks = frame_indices(fps, duration, spec, rng)
        wanted, frames = set(picks), {}
        try:
            for i, frame in enumerate(reader):
                if i in wanted:
                    frames[i] = np.asarray(frame)[..., :3]
                if i >= picks[-1]:
                    break
        except Exception as e:  # noqa: BLE001
            raise BadVideo(f"decoding failed at frame {len(frames)} ({_reason(e)})") from None
        if len(frames) < len(picks):
            raise BadVideo(f"too short: the file ends after {len(frames)} of the {len(picks)} sampled frames")
    finally:
        reader.close()
    return transform_frames(np.stack([frames[i] for i in picks]), spec.height, spec.width), picks


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)
