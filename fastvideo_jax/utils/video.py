"""Writing frames to mp4 (imageio-ffmpeg's bundled ffmpeg; no system ffmpeg needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 16) -> Path:
    """frames: (F, H, W, 3) uint8. H and W must be even (H.264 with yuv420p)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 expects uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_mp4: height and width must be even for H.264, got {frames.shape[1:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # imageio starts ffmpeg by fork+exec; JAX's fork warning does not apply
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        _write(path, frames, fps)
    return path


def _write(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio.v2 as imageio

    writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=1)
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def read_mp4(path: str | Path) -> np.ndarray:
    """All frames of a video as (F, H, W, 3) uint8 (read frame by frame: the reader's length is unknown)."""
    import imageio.v2 as imageio

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        reader = imageio.get_reader(path, format="FFMPEG")
    try:
        frames = [frame for frame in reader]
    finally:
        reader.close()
    return np.stack(frames)
