"""Decode once, encode once per frame: the timeline reader, the segment encoder, shot cuts, bad input."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_shot_video
from diffusionret.data.decode import read_frames
from diffusionret.data.errors import VideoDecodeError
from diffusionret.data.timeline import TimelineReader
from diffusionret.data.transforms import ClipTransform
from diffusionret.index.segment_encode import (
    encode_segments,
    encode_timeline,
    segment_frame_indices,
    segment_thumbnail,
)
from diffusionret.index.segments import Segment, SegmentConfig, fixed, plan_segments, shots
from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.testing.videos import read_index, write_index_video, write_video


def _timeline(path: Path, fps: float, size: int | None = None) -> tuple[np.ndarray, np.ndarray, TimelineReader]:
    reader = TimelineReader(path, fps=fps, size=size, batch_size=7)
    batches = list(reader)
    assert [b.first for b in batches] == list(np.cumsum([0] + [len(b.times) for b in batches[:-1]]))
    return np.concatenate([b.frames for b in batches]), np.concatenate([b.times for b in batches]), reader


@pytest.mark.parametrize("fps", [1.0, 2.5, 4.0, 25.0])
def test_timeline_frames_are_read_frames_frames(tmp_path: Path, fps: float) -> None:
    path = write_index_video(tmp_path / "v.mp4", 53, fps=10, lossless=True, keyint=10)  # 5.3 s
    frames, times, reader = _timeline(path, fps)
    assert reader.duration == pytest.approx(5.3)
    np.testing.assert_allclose(times, np.arange(len(times)) / fps)
    assert times[-1] < 5.3 <= times[-1] + 1 / fps + 1e-9, "samples up to the decoded end, none past it"
    expected, stamps = read_frames(path, fps=fps, max_frames=10_000, size=None)
    assert [read_index(f) for f in frames] == [read_index(f) for f in expected]
    assert len(stamps) == len(times)


def test_timeline_of_a_variable_frame_rate_video(tmp_path: Path) -> None:
    # Frames shown for 0.1 s, then 0.5 s gaps: the displayed frame at each time, as read_frames picks it.
    pts = [0, 1, 2, 7, 8, 13, 14, 15, 20, 30]
    path = write_index_video(tmp_path / "vfr.mkv", len(pts), pts=pts, time_base=Fraction(1, 10), lossless=True)
    frames, _, reader = _timeline(path, 2.0)
    expected, _ = read_frames(path, fps=2.0, max_frames=10_000, size=None)
    assert [read_index(f) for f in frames] == [read_index(f) for f in expected]
    assert reader.duration == pytest.approx(3.1, abs=0.11)


def test_single_frame_video_is_one_segment(tmp_path: Path) -> None:
    path = write_index_video(tmp_path / "one.mp4", 1, fps=25, lossless=True)
    frames, times, reader = _timeline(path, 1.0)
    assert len(frames) == 1 and times.tolist() == [0.0]
    assert reader.duration == pytest.approx(0.04)
    config = SegmentConfig(mode="fixed").resolved(12.0)
    assert plan_segments(reader.duration, config) == [Segment(0.0, reader.duration)]


def test_max_duration_caps_the_timeline(tmp_path: Path) -> None:
    path = write_index_video(tmp_path / "v.mp4", 50, fps=10, lossless=True)
    _, times, reader = _timeline(path, 2.0)
    assert len(times) == 10
    capped = TimelineReader(path, fps=2.0, size=None, max_duration=2.0)
    assert sum(len(b.times) for b in capped) == 4 and capped.duration == 2.0


def test_undecodable_files_raise_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        list(TimelineReader(bad, fps=1.0, size=32))
    with pytest.raises(VideoDecodeError, match="file not found"):
        list(TimelineReader(tmp_path / "missing.mp4", fps=1.0, size=32))


def test_segment_frame_indices() -> None:
    times = np.arange(40) / 4.0  # 10 s at 4 fps
    assert segment_frame_indices(times, Segment(2.0, 4.0), 8) == list(range(8, 16))
    assert segment_frame_indices(times, Segment(0.0, 10.0), 4) == [0, 13, 26, 39]  # floor(linspace)
    assert segment_frame_indices(times, Segment(2.1, 2.2), 8) == [8], "shorter than a sample: the nearest one"
    assert segment_frame_indices(times, Segment(9.9, 10.0), 8) == [39]


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0)).eval()


def test_segment_features_equal_encoding_each_window_as_a_clip(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(43, 48, 64, 3), dtype=np.uint8)  # 10.75 s at 4 fps
    path = write_video(tmp_path / "long.mp4", frames, fps=4, codec="libx264rgb", options={"crf": "0"})
    timeline = encode_timeline(tiny_model, path, fps=4.0, batch_size=16, thumbnails=True)
    assert timeline.num_samples == 43 and timeline.duration == pytest.approx(10.75)
    segments = fixed(timeline.duration, 2.0, 1.0)
    feats, mask = encode_segments(tiny_model, timeline, segments, 8)
    assert feats.shape == (len(segments), 8, 64) and mask.all()
    transform = ClipTransform(32)
    with torch.no_grad():
        for s, segment in enumerate(segments):
            raw, _ = read_frames(path, fps=4.0, max_frames=8, start=segment.start, end=segment.end, size=32)
            expected = tiny_model.encode_video(transform(raw)[None], torch.ones(1, len(raw), dtype=torch.long))[0]
            assert len(raw) == int(mask[s].sum())
            torch.testing.assert_close(feats[s, :len(raw)], expected, atol=1e-5, rtol=1e-5)
    thumb = segment_thumbnail(timeline, segments[-1])
    assert thumb is not None and thumb[:2] == b"\xff\xd8"  # a JPEG


def test_short_segments_are_padded_and_masked(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    path = write_index_video(tmp_path / "short.mp4", 6, fps=4)  # 1.5 s, shorter than a 2 s window
    timeline = encode_timeline(tiny_model, path, fps=4.0)
    feats, mask = encode_segments(tiny_model, timeline, plan_segments(timeline.duration,
                                                                     SegmentConfig("fixed").resolved(2.0)), 8)
    assert mask.tolist() == [[True] * 6 + [False] * 2]
    assert torch.all(feats[0, 6:] == 0), "padded positions are zero, never a repeated frame"


# ------------------------------------------------------------------------------------------------ shots


def test_shot_cuts_are_found_within_one_frame(tmp_path: Path) -> None:
    from diffusionret.index.shots import detect_cuts

    path = write_shot_video(tmp_path / "shots.mp4", [25, 60, 95], 130)
    for detector in ("adaptive", "content"):
        cuts = detect_cuts(path, detector=detector)
        assert len(cuts) == 3, (detector, cuts)
        assert np.allclose(cuts, [2.5, 6.0, 9.5], atol=0.1 + 1e-9), (detector, cuts)
    segments = shots(13.0, detect_cuts(path), window=3.0, stride=1.5, min_shot=0.75)
    assert segments[0] == Segment(0.0, 2.5)
    assert all(s.duration <= 3.0 + 1e-9 for s in segments)


def test_shot_detection_without_cuts_and_on_flicker(tmp_path: Path) -> None:
    from diffusionret.index.shots import detect_cuts

    still = write_shot_video(tmp_path / "still.mp4", [], 40)
    assert detect_cuts(still) == []
    assert shots(4.0, [], 2.0, 1.0, 0.5) == fixed(4.0, 2.0, 1.0), "no cut: windows as in fixed mode"
    flicker = write_shot_video(tmp_path / "flicker.mp4", list(range(1, 60)), 60)  # a new colour every frame
    cuts = detect_cuts(flicker, detector="content")
    assert len(cuts) > 20
    segments = shots(6.0, cuts, 2.0, 1.0, 0.5)
    assert all(s.duration >= 0.5 - 1e-9 for s in segments) and len(segments) <= 12


def test_shot_detection_names_an_undecodable_file(tmp_path: Path) -> None:
    from diffusionret.index.shots import detect_cuts

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        detect_cuts(bad)


def test_demo_long_video_query(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    from diffusionret.demo.corpus import CorpusConfig, write_corpus
    from diffusionret.demo.moment_query import long_video_query, mmss

    corpus = write_corpus(tmp_path / "corpus", CorpusConfig(num_train=1, num_test=6), np.random.default_rng(0))
    answer = long_video_query(tiny_model, corpus, fps=4, max_frames=8, max_words=16, seed=0)
    assert answer.video.is_file() and answer.windows == 11 and answer.duration == pytest.approx(12.0)  # 2 s windows every 1 s
    assert answer.truth_end - answer.truth_start == pytest.approx(2.0) and answer.truth_start % 2 == 0
    assert 0 <= answer.start < answer.end <= 12.0 and answer.end - answer.start == pytest.approx(2.0)
    assert 0 <= answer.iou <= 1 and answer.query
    assert mmss(75.4) == "01:15" and mmss(3600) == "60:00"


@pytest.mark.parametrize("maker", ["lying_duration_mkv", "lying_duration_mp4"])
def test_lying_duration_header_is_capped_by_what_decodes(tmp_path: Path, maker: str) -> None:
    import helpers

    path = getattr(helpers, maker)(tmp_path / f"lying.{maker[-3:]}")
    _, times, reader = _timeline(path, 1.0)
    assert reader.duration < 10 and len(times) == math.ceil(reader.duration), "the timeline ends with the frames"
    segments = plan_segments(reader.duration, SegmentConfig("fixed").resolved(12.0))
    assert segments == [Segment(0.0, reader.duration)], "one segment, nothing past the end"
