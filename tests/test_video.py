"""show1.video: frames -> playable MP4 (H.264, yuv420p) or GIF, never a partial file."""

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest

from show1 import video
from show1.video import write_video

# (frames, height, width) of each output stage of the cascade.
STAGE_SHAPES = [(29, 320, 576), (29, 160, 256), (29, 40, 64), (8, 40, 64)]
PRIMARY_COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)


def colour_cycle(frames, height, width):
    """Solid frames cycling red, green, blue: order and channel mix-ups both show up when decoded."""
    colours = PRIMARY_COLOURS[np.arange(frames) % 3]
    return np.broadcast_to(colours[:, None, None, :], (frames, height, width, 3)).copy()


def decode_mp4(path):
    """(frames [F, H, W, 3], ffmpeg's metadata) of a video file."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames), meta


@pytest.mark.parametrize("frames,height,width", STAGE_SHAPES)
def test_mp4_is_h264_yuv420p_with_every_frame_at_its_size_and_fps(tmp_path, frames, height, width):
    source = colour_cycle(frames, height, width)
    path = write_video(source, tmp_path / "out.mp4", fps=8, video_format="mp4")

    decoded, meta = decode_mp4(path)
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(8)
    assert decoded.shape == source.shape
    error = np.abs(decoded.astype(int) - source.astype(int)).mean(axis=(1, 2, 3))
    assert error.max() < 6, f"per-frame mean error {error}"


def test_mp4_puts_its_index_first_so_browsers_can_stream_it(tmp_path):
    data = write_video(colour_cycle(8, 40, 64), tmp_path / "out.mp4", fps=8).read_bytes()
    assert 0 <= data.index(b"moov") < data.index(b"mdat")


@pytest.mark.parametrize("fps", [1, 8, 24])
def test_mp4_keeps_the_requested_fps(tmp_path, fps):
    path = write_video(colour_cycle(8, 40, 64), tmp_path / "out.mp4", fps=fps)
    frame_count, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert frame_count == 8
    assert seconds == pytest.approx(8 / fps, abs=0.01 + 1 / fps)
    assert decode_mp4(path)[1]["fps"] == pytest.approx(fps)


@pytest.mark.parametrize("fps", [8, 10])
def test_gif_has_every_frame_in_order_looping_at_the_fps(tmp_path, fps):
    source = colour_cycle(29, 40, 64)
    path = write_video(source, tmp_path / "out.gif", fps=fps, video_format="gif")

    decoded = iio.imread(path, plugin="pillow", index=None, mode="RGB")
    assert decoded.shape == source.shape
    assert np.abs(decoded.astype(int) - source.astype(int)).max() < 8
    meta = iio.immeta(path, plugin="pillow", index=0)
    assert meta["loop"] == 0
    # GIF durations are whole hundredths of a second.
    assert meta["duration"] == pytest.approx(1000 / fps, abs=10)


def test_gif_at_full_resolution(tmp_path):
    source = colour_cycle(29, 320, 576)
    path = write_video(source, tmp_path / "out.gif", fps=8, video_format="gif")
    assert iio.imread(path, plugin="pillow", index=None, mode="RGB").shape == source.shape


BAD_FRAMES = {
    "float frames": np.zeros((8, 40, 64, 3), np.float32),
    "a list": [[[[0, 0, 0]]]],
    "no frame axis": np.zeros((40, 64, 3), np.uint8),
    "RGBA": np.zeros((8, 40, 64, 4), np.uint8),
    "no frames": np.zeros((0, 40, 64, 3), np.uint8),
    "odd height": np.zeros((8, 41, 64, 3), np.uint8),
    "odd width": np.zeros((8, 40, 63, 3), np.uint8),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
@pytest.mark.parametrize("video_format", video.VIDEO_FORMATS)
def test_bad_frames_are_rejected_before_anything_is_written(tmp_path, name, video_format):
    with pytest.raises(ValueError, match="frames|height and width"):
        write_video(BAD_FRAMES[name], tmp_path / f"out.{video_format}", fps=8, video_format=video_format)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [0, -8, float("nan"), float("inf"), "8", True, None])
def test_bad_fps_is_rejected(tmp_path, fps):
    with pytest.raises(ValueError, match="fps"):
        write_video(colour_cycle(8, 40, 64), tmp_path / "out.mp4", fps=fps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("video_format", ["webm", "MP4", "../mp4", ""])
def test_unknown_format_is_rejected(tmp_path, video_format):
    with pytest.raises(ValueError, match="video_format"):
        write_video(colour_cycle(8, 40, 64), tmp_path / "out", fps=8, video_format=video_format)
    assert list(tmp_path.iterdir()) == []


class Interrupted(BaseException):
    """Stands in for a cancellation arriving while the encoder runs."""


@pytest.mark.parametrize("failure", [RuntimeError("encoder crashed"), Interrupted()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    def write_half_then_fail(frames, path, fps):
        path.write_bytes(b"half a video")
        raise failure

    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous video")
    monkeypatch.setitem(video.ENCODERS, "mp4", write_half_then_fail)
    with pytest.raises(type(failure)):
        write_video(colour_cycle(8, 40, 64), target, fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert target.read_bytes() == b"previous video"


def test_non_contiguous_frames_are_written_correctly(tmp_path):
    source = colour_cycle(8, 40, 128)[:, :, ::2]  # a strided view, as slicing would give
    decoded, _ = decode_mp4(write_video(source, tmp_path / "out.mp4", fps=8))
    assert decoded.shape == (8, 40, 64, 3)
    assert np.abs(decoded.astype(int) - source.astype(int)).mean() < 6
