"""Writing frames to mp4 (imageio-ffmpeg's bundled ffmpeg; no system ffmpeg needed), all or nothing.

``check_output_path`` validates a target before any work (so a bad path never throws away a generation);
``write_videos`` writes each video to a temporary name beside its target, reads it back, and only then renames
it into place: a failure (read-only directory, full disk, a writer error) raises ``OutputPathError`` naming
the path and the cause and leaves no file behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fastvideo_jax.errors import OutputPathError
from fastvideo_jax.utils.paths import give_ordinary_mode

__all__ = ["VIDEO_SUFFIXES", "check_output_path", "numbered_paths", "write_mp4", "write_videos", "read_mp4"]

VIDEO_SUFFIXES = (".mp4",)


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` if a video can be written there, else ``OutputPathError`` saying why. Missing parent folders
    are allowed (they are created when the video is written) as long as the nearest existing one is a
    writable directory; an existing file is replaced."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory; give a file name, e.g. {path / 'video.mp4'}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        got = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise OutputPathError(f"{path}: the output must be an .mp4 file (got {got})")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{path}: exists and is not a regular file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():
            raise OutputPathError(f"{path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{path}: {parent} is not a directory")
    try:  # the only sure test (permissions, read-only mounts, root): create a file there and remove it
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write in {parent} ({e.strerror or e})") from None
    return path


def numbered_paths(path: str | os.PathLike, count: int) -> list[Path]:
    """``[path]`` for one video; ``name_0.mp4, name_1.mp4, ...`` beside it for several."""
    path = Path(path).expanduser()
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 16) -> Path:
    """frames: (F, H, W, 3) uint8. H and W must be even (H.264 with yuv420p)."""
    return write_videos([path], [frames], fps)[0]


def write_videos(paths: Sequence[str | os.PathLike], videos: Sequence[np.ndarray], fps: int = 16) -> list[Path]:
    """Write every video (F, H, W, 3) uint8 to its path, or none of them."""
    videos = [_check_frames(v) for v in videos]
    paths = [check_output_path(p) for p in paths]
    if len(paths) != len(videos):
        raise ValueError(f"write_videos: {len(paths)} paths for {len(videos)} videos")
    created: list[Path] = []
    temps: list[Path] = []
    try:
        for path, frames in zip(paths, videos):
            created += _make_parents(path)
            temps.append(_write_checked(path, frames, fps))
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        for folder in reversed(created):  # the folders this call made, deepest first, if still empty
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return paths


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 expects uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_mp4: height and width must be even for H.264, got {frames.shape[1:3]}")
    return frames


def _make_parents(path: Path) -> list[Path]:
    missing = [p for p in reversed(path.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{path}: cannot create {path.parent} ({_cause(e, path.parent)})") from None
    return missing


def _write_checked(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Write to a temporary name in ``path``'s folder and read it back; the temporary path on success."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.partial-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    give_ordinary_mode(tmp)  # mkstemp's 0600 would follow the rename into place
    try:
        with warnings.catch_warnings():  # imageio starts ffmpeg by fork+exec; JAX's fork warning does not apply
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            _write(tmp, frames, fps)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            got = _count_frames(tmp)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise OutputPathError(f"{path}: writing the video failed ({_cause(e, path.parent)})") from e
    if got != len(frames):
        cause = _cause(None, path.parent)
        tmp.unlink(missing_ok=True)
        raise OutputPathError(f"{path}: the written video reads back {got} of {len(frames)} frames ({cause})")
    return tmp


def _cause(e: BaseException | None, folder: Path) -> str:
    """One line: a full disk is named as such whatever layer reported it."""
    text = "" if e is None else (e.strerror if isinstance(e, OSError) and e.strerror else str(e))
    full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e or "")
    try:
        full = full or shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        pass
    if full:
        return f"no space left on device in {folder}"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line or (type(e).__name__ if e is not None else "unreadable file; the writer reported no error")


def _write(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio.v2 as imageio

    writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=1)
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _count_frames(path: Path) -> int:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return sum(1 for _ in reader)
    finally:
        reader.close()


def read_mp4(path: str | os.PathLike) -> np.ndarray:
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
