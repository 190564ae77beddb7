"""PyAV decoding: exact frame choice and timestamps on videos written here, seeking, and bad input."""

from __future__ import annotations

import math
import pickle
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from diffusionret.data import DecodeStats, VideoDecodeError, probe_video, read_frames
from diffusionret.data.decode import resize_short_side
from diffusionret.testing.videos import index_frame, read_index, write_index_video, write_video

NTSC = Fraction(30000, 1001)
VFR_PTS_MS = [0, 100, 150, 700, 710, 1500, 2300]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    v = {
        # 25 lossless frames at 10 fps: 2.5 s, pixels exactly index_frame(i).
        "lossless": write_index_video(root / "lossless.mp4", 25, fps=10, lossless=True),
        # 10.01 s at 29.97 fps (lossy, B-frames).
        "ntsc": write_index_video(root / "ntsc.mp4", 300, fps=NTSC),
        # Variable frame rate, explicit millisecond timestamps, B-frames.
        "vfr": write_index_video(root / "vfr.mp4", len(VFR_PTS_MS), pts=VFR_PTS_MS, time_base=Fraction(1, 1000)),
        "portrait": write_index_video(root / "portrait.mp4", 10, fps=10, width=48, height=64),
        "rot90": write_index_video(root / "rot90.mp4", 10, fps=10, width=48, height=64, rotation=90),
        "rot270": write_index_video(root / "rot270.mp4", 10, fps=10, width=48, height=64, rotation=-90),
        "rot180": write_index_video(root / "rot180.mp4", 10, fps=10, width=64, height=48, rotation=180),
        "odd": write_index_video(root / "odd.mp4", 8, fps=8, width=65, height=49, lossless=True),
        "one": write_index_video(root / "one.mp4", 1, fps=25),
        # Ten minutes at 2 fps with a keyframe every 20 frames (10 s): long, but tiny.
        "long": write_index_video(root / "long.mp4", 1200, fps=2, keyint=20),
        # Matroska stores millisecond timestamps (1/30 s rounds) and loads its index lazily.
        "mkv": write_index_video(root / "ms.mkv", 900, fps=30, keyint=60),
        # AVI has no presentation timestamps; with B-frames the reported ones are decode-order stamps.
        "avi_h264": write_index_video(root / "bframes.avi", 300, fps=10, keyint=50),
        "avi_mpeg4": write_video(root / "xvid.avi", (index_frame(i) for i in range(100)), fps=25, codec="mpeg4",
                                 options={"bf": "2", "g": "25", "qscale": "2"}),
    }
    return v


def indices(frames: np.ndarray) -> list[int]:
    return [read_index(frame) for frame in frames]


def displayed_at(pts_s: list[float], t: float) -> int:
    """Oracle: index of the last frame whose timestamp is <= t."""
    return max(i for i, p in enumerate(pts_s) if p <= t + 1e-9)


# -- exact frame choice and timestamps ------------------------------------------------------------------


def test_lossless_decode_equals_written_frames(videos):
    frames, times = read_frames(videos["lossless"], fps=10, max_frames=100, size=None)
    assert frames.dtype == np.uint8 and frames.shape == (25, 48, 64, 3)
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, index_frame(i, 64, 48))
    np.testing.assert_allclose(times, np.arange(25) / 10, atol=1e-9)


def test_fps_targets_pick_the_displayed_frame(videos):
    # 2.5 s at 3 samples/s: targets k/3 for k < ceil(7.5) = 8; frame floor(10 k / 3) is on screen.
    frames, times = read_frames(videos["lossless"], fps=3, max_frames=100, size=None)
    expected = [10 * k // 3 for k in range(8)]
    assert indices(frames) == expected
    np.testing.assert_allclose(times, np.array(expected) / 10, atol=1e-9)


def test_fractional_fps_below_one(videos):
    frames, _ = read_frames(videos["lossless"], fps=0.5, max_frames=100, size=None)
    assert indices(frames) == [0, 20]  # t = 0 and 2 s


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [("uniform", [0, 4, 8, 12, 16, 20, 24]), ("head", list(range(7))), ("tail", list(range(18, 25)))],
)
def test_subsampling_to_max_frames(videos, sampling, expected):
    frames, _ = read_frames(videos["lossless"], fps=10, max_frames=7, size=None, sampling=sampling)
    assert indices(frames) == expected  # uniform: floor(linspace(0, 24, 7)), written out by hand


def test_clip_window_start_end(videos):
    frames, times = read_frames(videos["lossless"], fps=2, start=0.5, end=1.5, size=None)
    assert indices(frames) == [5, 10]  # 0.5 s and 1.0 s; 1.5 s is the exclusive end
    np.testing.assert_allclose(times, [0.5, 1.0])
    # An end past the video is clamped; a clip that starts after the end is an error naming the file.
    frames, _ = read_frames(videos["lossless"], fps=1, start=1.0, end=99.0, size=None)
    assert indices(frames) == [10, 20]
    with pytest.raises(VideoDecodeError, match="lossless.mp4.*starts at 3.000 s"):
        read_frames(videos["lossless"], start=3.0, end=5.0)


def test_ntsc_has_no_integer_fps_drift(videos):
    frames, times = read_frames(videos["ntsc"], fps=1, max_frames=100, size=None)
    # 10.01 s -> 11 targets; frame floor(k * 29.97) is displayed at k seconds.
    expected = [math.floor(k * NTSC) for k in range(11)]
    assert expected[-1] == 299 and indices(frames) == expected
    np.testing.assert_allclose(times, [float(i / NTSC) for i in expected], atol=1e-9)


def test_vfr_uses_real_timestamps(videos):
    pts_s = [p / 1000 for p in VFR_PTS_MS]
    frames, times = read_frames(videos["vfr"], fps=10, max_frames=1000, size=None)
    assert len(frames) >= 24  # the last frame (2.3 s) is reached although MP4's dts-based duration is shorter
    expected = [displayed_at(pts_s, k / 10) for k in range(len(frames))]
    assert indices(frames) == expected
    assert expected[-1] == len(VFR_PTS_MS) - 1
    np.testing.assert_allclose(times, [pts_s[i] for i in expected], atol=1e-6)


def test_matroska_millisecond_timestamps_and_lazy_index(videos):
    stats = DecodeStats()
    frames, times = read_frames(videos["mkv"], fps=1, max_frames=100, size=None, stats=stats)
    assert indices(frames) == [30 * k for k in range(30)]
    np.testing.assert_allclose(times, np.arange(30), atol=1e-3)
    frames, _ = read_frames(videos["mkv"], fps=1, max_frames=3, size=None, stats=(sparse := DecodeStats()))
    assert indices(frames) == [0, 420, 870]  # floor(linspace(0, 29, 3)) seconds
    assert sparse.seeks >= 1 and sparse.frames_decoded < 300  # the cues were loaded and used


@pytest.mark.parametrize(("name", "rate", "count"), [("avi_h264", 10, 300), ("avi_mpeg4", 25, 100)])
def test_avi_with_b_frames_is_timed_by_counting(videos, name, rate, count):
    frames, times = read_frames(videos[name], fps=rate, max_frames=1000, size=None)
    assert indices(frames) == list(range(count))
    np.testing.assert_allclose(times, np.arange(count) / rate, atol=1e-9)
    frames, _ = read_frames(videos[name], fps=1, max_frames=4, size=None)
    seconds = count // rate
    assert indices(frames) == [rate * int(s) for s in np.linspace(0, seconds - 1, 4)]


# -- geometry ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["portrait", "rot90", "rot270"])
def test_portrait_and_rotation_metadata(videos, name):
    info = probe_video(videos[name])
    assert (info.width, info.height) == (48, 64)
    assert info.rotation == {"portrait": 0, "rot90": 90, "rot270": 270}[name]
    frames, _ = read_frames(videos[name], fps=10, max_frames=100, size=None)
    assert frames.shape == (10, 64, 48, 3)
    assert indices(frames) == list(range(10))  # readable only in the right orientation


def test_rotation_180(videos):
    frames, _ = read_frames(videos["rot180"], fps=10, max_frames=100, size=None)
    assert frames.shape == (10, 48, 64, 3) and indices(frames) == list(range(10))


def test_resize_short_side_portrait(videos):
    frames, _ = read_frames(videos["rot90"], fps=10, max_frames=3, size=32)
    assert frames.shape == (3, 42, 32, 3)  # int(32 * 64 / 48) = 42


def test_odd_sizes_lossless(videos):
    frames, _ = read_frames(videos["odd"], fps=8, max_frames=100, size=None)
    assert frames.shape == (8, 49, 65, 3)
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, index_frame(i, 65, 49))
    assert read_frames(videos["odd"], max_frames=1, size=20)[0].shape == (1, 20, 26, 3)


@pytest.mark.parametrize(("width", "height", "size"), [(64, 48, 24), (48, 64, 24), (65, 49, 30), (50, 50, 20)])
def test_resize_matches_torchvision_on_pil(width, height, size):
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = np.asarray(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(Image.fromarray(image)))
    np.testing.assert_array_equal(resize_short_side(image, size), expected)


# -- short and long videos, seeking ----------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "reference"])
def test_one_frame_video(videos, sampling):
    frames, times = read_frames(videos["one"], fps=1, size=None, sampling=sampling)
    assert frames.shape == (1, 48, 64, 3) and indices(frames) == [0] and times.tolist() == [0.0]
    info = probe_video(videos["one"])
    assert info.num_frames == 1 and info.duration == pytest.approx(0.04)


def test_long_video_seeks_instead_of_decoding_everything(videos):
    info = probe_video(videos["long"])
    assert info.duration == 600 and info.num_frames == 1200 and info.num_keyframes == 60
    fast, slow = DecodeStats(), DecodeStats()
    frames, times = read_frames(videos["long"], fps=1, max_frames=12, size=None, stats=fast)
    seq_frames, seq_times = read_frames(videos["long"], fps=1, max_frames=12, size=None, seek=False, stats=slow)
    # 600 targets (one per second) reduced to floor(linspace(0, 599, 12)) seconds = frames 2 t.
    expected = [2 * int(t) for t in np.linspace(0, 599, 12)]
    assert indices(frames) == expected == indices(seq_frames)
    np.testing.assert_array_equal(times, seq_times)
    assert slow.frames_decoded == 1200 and slow.seeks == 0
    assert fast.seeks == 11  # one per target after the first (each lies in a later GOP)
    assert fast.frames_decoded <= 12 * 20  # at most one GOP per target


def test_dense_sampling_decodes_sequentially(videos):
    stats = DecodeStats()
    frames, _ = read_frames(videos["long"], fps=2, max_frames=2000, size=None, stats=stats)
    assert len(frames) == 1200 and stats.seeks == 0 and stats.frames_decoded == 1200
    assert indices(frames[:5]) == [0, 1, 2, 3, 4] and read_index(frames[-1]) == 1199


# -- reference sampling (docs/reference.md §5.3) -----------------------------------------------------------------------


def spec_reference_indices(frame_count: float, fps: float, max_frames: int, framerate: int = 1) -> list[int]:
    """docs/reference.md §5.3, written out independently of the library: int fps, ceil duration in whole seconds,
    frame sec * fps + offset for sec in 0..duration inclusive until the first read past the end,
    then floor(linspace) to max_frames."""
    fps = int(fps)
    total_duration = math.ceil(frame_count / fps)
    interval = max(1, fps // framerate)
    offsets = list(range(0, fps, interval))[:framerate]
    read = []
    for sec in range(0, total_duration + 1):
        stop = False
        for offset in offsets:
            if sec * fps + offset >= frame_count:
                stop = True
                break
            read.append(sec * fps + offset)
        if stop:
            break
    if len(read) > max_frames:
        read = [read[int(i)] for i in np.linspace(0, len(read) - 1, num=max_frames)]
    return read


@pytest.mark.parametrize(
    ("name", "frame_count", "fps", "max_frames"),
    [
        ("lossless", 25, 10, 12),
        ("ntsc", 300, 29.97, 12),  # int(29.97) = 29: the reference drifts one frame per second
        ("ntsc", 300, 29.97, 4),
        ("long", 1200, 2, 12),
        ("portrait", 10, 10, 12),
        ("one", 1, 25, 12),
    ],
)
def test_reference_sampling_reproduces_reference_indices(videos, name, frame_count, fps, max_frames):
    expected = spec_reference_indices(frame_count, fps, max_frames)
    frames, times = read_frames(videos[name], fps=1, max_frames=max_frames, size=None, sampling="reference")
    assert indices(frames) == expected
    np.testing.assert_allclose(times, [i / fps for i in expected], atol=1e-3)
    if name == "ntsc" and max_frames == 12:
        assert expected[:3] == [0, 29, 58]  # not 59: the truncation the reference has


def test_reference_sampling_framerate_two(videos):
    frames, _ = read_frames(videos["lossless"], fps=2, max_frames=100, size=None, sampling="reference")
    assert indices(frames) == spec_reference_indices(25, 10, 100, framerate=2) == [0, 5, 10, 15, 20]
    with pytest.raises(ValueError, match="integer fps"):
        read_frames(videos["lossless"], fps=1.5, sampling="reference")


# -- bad input ----------------------------------------------------------------------------------------------


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, videos) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is not a video\n")
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "folder.mp4").mkdir()
    whole = videos["ntsc"].read_bytes()
    (root / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # moov (index) at the end: cut away
    # A streamable container cut in the middle: opens fine, ends early.
    full = write_index_video(root / "full.mkv", 100, fps=10, keyint=10)
    data = full.read_bytes()
    (root / "cut.mkv").write_bytes(data[: len(data) // 2])
    return {
        "missing": root / "missing.mp4",
        "empty": root / "empty.mp4",
        "text": root / "notes.mp4",
        "noise": root / "noise.mp4",
        "folder": root / "folder.mp4",
        "cut_mp4": root / "cut.mp4",
        "cut_mkv": root / "cut.mkv",
        "audio": write_audio_only(root / "audio.m4a"),
    }


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("missing", "file not found"),
        ("empty", "empty file"),
        ("text", "not a readable video"),
        ("noise", "not a readable video"),
        ("folder", "not a regular file"),
        ("cut_mp4", "no streams found|not a readable video"),  # depends on where the cut falls
        ("cut_mkv", "truncated"),
        ("audio", "no video stream"),
    ],
)
def test_bad_input_raises_video_decode_error(bad_files, name, cause):
    path = bad_files[name]
    with pytest.raises(VideoDecodeError) as info:
        read_frames(path, fps=1, max_frames=12)
    assert info.value.path == path and re.search(cause, info.value.cause)
    assert str(path) in str(info.value)
    # The error survives the trip from a DataLoader worker to the main process.
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, VideoDecodeError) and again.path == path and again.cause == info.value.cause


def test_probe_reports_metadata(videos):
    info = probe_video(videos["ntsc"])
    assert info.num_frames == 300 and info.avg_fps == pytest.approx(29.97, abs=1e-3)
    assert info.duration == pytest.approx(10.01) and (info.width, info.height) == (64, 48)
    assert info.codec == "h264" and info.rotation == 0


def test_invalid_arguments(videos):
    for kwargs in ({"fps": 0}, {"max_frames": 0}, {"size": 0}, {"sampling": "random"}):
        with pytest.raises(ValueError):
            read_frames(videos["one"], **kwargs)


def test_write_video_rejects_empty_input(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "x.mp4", [])
