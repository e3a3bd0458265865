"""Writing generated frames to a video file: H.264 MP4 for browsers and players, or an animated GIF.

Frames are uint8 RGB arrays shaped [frames, height, width, 3], as the pipeline returns them.
A file appears at its final path only once it is complete (show1.files.written_atomically), so an
error or a cancellation never leaves a truncated video.
"""

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from .files import written_atomically

VIDEO_FORMATS = ("mp4", "gif")

# libx264 at a visually near-lossless quality; faststart puts the index first so browsers can
# start playing before the download ends.
MP4_ENCODER_OPTIONS = ["-crf", "18", "-movflags", "+faststart"]


def check_frames(frames) -> None:
    """Raise ValueError unless frames is a non-empty uint8 array [F, H, W, 3] with even H and W
    (H.264 in yuv420p stores colour at half resolution, so odd sizes cannot be encoded as is)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        got = f"{type(frames).__name__} {getattr(frames, 'dtype', '')}"
        raise ValueError(f"frames must be a uint8 numpy array, got {got}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be shaped [frames, height, width, 3] with no empty axis, got {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for H.264 yuv420p, got {width}x{height}")


def check_fps(fps) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def encode_mp4(frames: np.ndarray, path: Path, fps) -> None:
    # macro_block_size=2 keeps the exact size (the default, 16, would pad 64x40 to 64x48).
    iio.imwrite(
        path, frames, plugin="FFMPEG", extension=".mp4", fps=fps, codec="libx264", pixelformat="yuv420p",
        macro_block_size=2, quality=None, output_params=MP4_ENCODER_OPTIONS,
    )


def encode_gif(frames: np.ndarray, path: Path, fps) -> None:
    # GIF stores frame durations in hundredths of a second; Pillow rounds to that.
    iio.imwrite(path, frames, plugin="pillow", extension=".gif", duration=1000 / fps, loop=0)


ENCODERS = {"mp4": encode_mp4, "gif": encode_gif}


def write_video(frames: np.ndarray, path, fps, video_format: str = "mp4") -> Path:
    """Write frames to path as `video_format` ("mp4" or "gif") at fps frames per second.
    The file at path is replaced only by a complete video; returns path."""
    if video_format not in ENCODERS:
        raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")
    check_frames(frames)
    check_fps(fps)
    path = Path(path)
    with written_atomically(path) as partial:
        ENCODERS[video_format](np.ascontiguousarray(frames), partial, fps)
    return path
