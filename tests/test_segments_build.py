"""Segmented indexing end to end, with the real decoder and a tiny model: the timeline decode in isolated
workers (same results, time budget, hostile files), bad input per file, and ``--segments shots``.

Every video is written by the test (PyAV), with known lengths, timestamps and cut points.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (hostile_corpus, lying_duration_mkv, lying_duration_mp4, run_cli, save_tiny_model,
                     segment_spans, slowed_decode, write_shot_video)
from diffusionret.data.decode import probe_video
from diffusionret.data.isolate import DecodeBudget
from diffusionret.index import catalog
from diffusionret.index.builder import build_index
from diffusionret.index.encode import ModelVideoEncoder
from diffusionret.index.features import ExtractionFailure, SegmentedFeatures, VideoFeatures
from diffusionret.index.segment_encode import encode_segments, encode_timeline, segment_thumbnail
from diffusionret.index.segment_job import square_crop
from diffusionret.index.segments import SegmentConfig, plan_segments
from diffusionret.index.store import VideoIndex
from diffusionret.models.config import InputConfig, ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.testing.videos import write_index_video

FPS, FRAMES = 4.0, 8  # the encoder's sampling: a 2 s clip span
YEAR_S = 365 * 24 * 3600


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temporary folder, for this test only (where the encoder's scratch folders go)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _leftovers(folder: Path) -> list[Path]:
    """What the encoder left in a temporary folder (multiprocessing keeps its own ``pymp-*`` there)."""
    return [p for p in folder.iterdir() if p.name.startswith("diffusionret")]


def _encoder(model: torch.nn.Module, **kwargs) -> ModelVideoEncoder:
    config = InputConfig.for_image_size(int(model.image_size)).replace(max_frames=FRAMES, fps=FPS, sampling="uniform")
    return ModelVideoEncoder(model, config, decode_workers=1, **kwargs)


def _jump_video(path: Path, years: float = 10) -> Path:
    """Three frames 0.1 s apart, then one whose timestamp is ``years`` later (a corrupt or hostile file)."""
    pts = [0, 1, 2, int(years * YEAR_S * 10)]
    return write_index_video(path, len(pts), pts=pts, time_base=Fraction(1, 10), lossless=True)


def _vfr_video(path: Path) -> Path:
    """Frames shown 0.1 s, then gaps of 0.5 and 1 s (variable frame rate): 3.1 s in all."""
    pts = [0, 1, 2, 7, 8, 13, 14, 15, 20, 30]
    return write_index_video(path, len(pts), pts=pts, time_base=Fraction(1, 10), lossless=True)


# ----------------------------------------------------------------- the isolated timeline decode
@pytest.mark.parametrize("kind", ["cfr", "slow", "vfr"])
def test_isolated_timeline_equals_in_process_encoding(tmp_path: Path, model: torch.nn.Module, scratch: Path,
                                                      kind: str) -> None:
    """The worker's timeline gives exactly what decoding and encoding in the indexing process gives."""
    if kind == "cfr":  # 64x48: resized to 43x32, then cropped to 32x32 in the worker
        path = write_index_video(tmp_path / "v.mp4", 57, fps=10)
    elif kind == "slow":  # 3 frames a second sampled 4 times a second: some samples repeat a frame
        path = write_index_video(tmp_path / "v.mp4", 20, fps=3)
    else:
        path = _vfr_video(tmp_path / "v.mkv")
    config = SegmentConfig("fixed", window=2.0, stride=1.0).resolved(2.0)
    encoder = _encoder(model)
    try:
        [result] = list(encoder.extract_segments([path], config))
    finally:
        encoder.close()
    assert isinstance(result, SegmentedFeatures), result
    timeline = encode_timeline(model, path, fps=FPS, thumbnails=True)
    spans = plan_segments(timeline.duration, config)
    frames, mask = encode_segments(model, timeline, spans, FRAMES, sampling="uniform")
    assert result.spans == [(s.start, s.end) for s in spans] and result.duration == timeline.duration
    assert torch.equal(result.frames, frames) and torch.equal(result.frame_mask, mask)
    assert result.thumbnails == [segment_thumbnail(timeline, s) for s in spans]
    info = probe_video(path)
    assert (result.width, result.height) == (info.width, info.height)
    assert _leftovers(scratch) == [], "the scratch folder is gone"


def test_auto_keeps_short_videos_whole_as_extract_does(tmp_path: Path, model: torch.nn.Module) -> None:
    path = write_index_video(tmp_path / "short.mp4", 25, fps=10)  # 2.5 s <= 1.5 x 2 s windows
    encoder = _encoder(model)
    try:
        [auto] = list(encoder.extract_segments([path], SegmentConfig("auto").resolved(2.0)))
        [whole] = list(encoder.extract([path]))
    finally:
        encoder.close()
    assert isinstance(auto, VideoFeatures) and isinstance(whole, VideoFeatures)
    assert torch.equal(auto.frames, whole.frames) and auto.thumbnail == whole.thumbnail


def test_square_crop_leaves_the_transform_output_unchanged() -> None:
    from diffusionret.data.transforms import ClipTransform

    rng = np.random.default_rng(0)
    for shape in [(3, 32, 43, 3), (3, 57, 32, 3), (3, 32, 32, 3), (3, 40, 50, 3)]:
        frames = rng.integers(0, 256, size=shape, dtype=np.uint8)
        assert torch.equal(ClipTransform(32)(square_crop(frames, 32)), ClipTransform(32)(frames)), shape


def test_timeline_decode_is_killed_at_the_time_budget(tmp_path: Path, model: torch.nn.Module, scratch: Path) -> None:
    """A timeline that would run for hours (a 10-year timestamp jump, no length cap) is killed at the
    decode budget: the gap earns no progress (filling it decodes nothing), so the job stalls, at 0.2 s
    of media (the speed floor may fire first: 3 s + 0.2 s from the start); the file fails alone, the
    next one is indexed, nothing is left behind."""
    jump = _jump_video(tmp_path / "jump.mkv")
    good = write_index_video(tmp_path / "good.mp4", 30, fps=10)
    encoder = _encoder(model, budget=DecodeBudget(timeout_s=3.0), max_timeline_s=1e12)
    try:
        failed, indexed = list(encoder.extract_segments([jump, good], SegmentConfig("fixed").resolved(2.0)))
    finally:
        encoder.close()
    assert isinstance(failed, ExtractionFailure)
    assert ("no progress for 3 s" in failed.error or "slower than 1x real time" in failed.error) \
        and "--decode-timeout" in failed.error, failed.error
    assert isinstance(indexed, SegmentedFeatures) and indexed.frame_mask.any(dim=1).all()
    assert _leftovers(scratch) == []


def _scratch_children(scratch: Path) -> list[Path]:
    """The per-file folders inside the encoder's scratch folder (while it runs)."""
    return [child for folder in _leftovers(scratch) for child in folder.iterdir()]


@pytest.mark.parametrize("case", ["stall", "slow"])
def test_a_stalled_or_too_slow_timeline_is_killed_and_its_scratch_deleted(
        tmp_path: Path, model: torch.nn.Module, scratch: Path, case: str) -> None:
    """A fake decoder (the real job at 3x real time, hung after 4 s of media, or slowed to 0.4x real time)
    is killed at the stall timeout or the speed floor, the file fails with the limit and the option to change, its
    scratch folder goes at once (before the next file), and the next file is indexed."""
    video = write_index_video(tmp_path / "long.mp4", 100, fps=10)  # 10 s: 25 s to decode at 0.4x
    good = write_index_video(tmp_path / "good.mp4", 30, fps=10)
    job = functools.partial(slowed_decode, delay_s=0.03, stall_after=40, only="long.mp4") if case == "stall" else \
        functools.partial(slowed_decode, delay_s=0.25, only="long.mp4")
    encoder = _encoder(model, budget=DecodeBudget(timeout_s=1.0), decode_job=job, batch_size=1)
    try:
        results = encoder.extract_segments([video, good], SegmentConfig("fixed").resolved(2.0))
        failed = next(results)
        assert _scratch_children(scratch) == []
        indexed, *rest = list(results)
    finally:
        encoder.close()
    assert isinstance(failed, ExtractionFailure)
    if case == "stall":
        assert "no progress for 1 s" in failed.error and "--decode-timeout" in failed.error, failed.error
    else:
        assert "slower than 1x real time" in failed.error and "--decode-min-speed" in failed.error, failed.error
    assert isinstance(indexed, SegmentedFeatures) and indexed.frame_mask.any(dim=1).all() and rest == []
    assert _leftovers(scratch) == []


def test_a_long_progressing_timeline_outlives_the_flat_timeout(tmp_path: Path, model: torch.nn.Module,
                                                              scratch: Path) -> None:
    """Decoding steadily (3x real time) for three times the timeout is not killed, and gives what an
    unhurried decode gives."""
    video = write_index_video(tmp_path / "long.mp4", 100, fps=10)
    config = SegmentConfig("fixed").resolved(2.0)
    # 2 s, not 1: the checks before the timeline report no progress and must fit in the budget even
    # on a loaded machine
    slow = _encoder(model, budget=DecodeBudget(timeout_s=2.0),
                    decode_job=functools.partial(slowed_decode, delay_s=0.06))
    try:
        start = time.monotonic()
        [result] = list(slow.extract_segments([video], config))
        elapsed = time.monotonic() - start
    finally:
        slow.close()
    encoder = _encoder(model)
    try:
        [expected] = list(encoder.extract_segments([video], config))
    finally:
        encoder.close()
    assert elapsed >= 6.0  # 100 frames x 0.06 s of sleep: a flat 2 s budget would have killed it
    assert isinstance(result, SegmentedFeatures) and isinstance(expected, SegmentedFeatures), result
    assert result.spans == expected.spans and torch.equal(result.frames, expected.frames)
    assert _leftovers(scratch) == []


def test_a_timestamp_jump_is_a_clear_error_not_a_timeline_of_years(tmp_path: Path, model: torch.nn.Module,
                                                                   scratch: Path) -> None:
    jump = _jump_video(tmp_path / "jump.mkv")
    encoder = _encoder(model, max_timeline_s=30.0)
    try:
        [failed] = list(encoder.extract_segments([jump], SegmentConfig("fixed").resolved(2.0)))
    finally:
        encoder.close()
    assert isinstance(failed, ExtractionFailure) and "frames run past 30 s" in failed.error, failed
    assert _leftovers(scratch) == []


# ------------------------------------------------------------------------------- bad input, per file
def _check_rows(root: Path) -> VideoIndex:
    """Every row has a real frame and no zero feature where its mask is set; spans stay inside the video."""
    index = VideoIndex.load(root)
    for i, record in enumerate(index.records):
        mask = index.frame_mask[i]
        assert mask.any(), record.path
        assert (index.frames[i][mask].float().abs().sum(dim=-1) > 0).all(), f"zero-filled features in {record.path}"
        assert (index.frames[i][~mask] == 0).all()
        if record.start is not None:
            assert 0 <= record.start < record.end <= record.duration + 1e-6, record
    return index


def test_bad_input_gives_sensible_segments_or_a_clear_error(tmp_path: Path, model: torch.nn.Module,
                                                            scratch: Path) -> None:
    videos = tmp_path / "videos"
    write_index_video(videos / "short.mp4", 15, fps=10)  # 1.5 s: shorter than the 2 s window
    write_index_video(videos / "single.mp4", 1, fps=25)  # one frame: 0.04 s
    _vfr_video(videos / "vfr.mkv")  # 3.1 s, frames 0.1 to 1 s apart
    lying_duration_mkv(videos / "lying_136_years.mkv")  # 2 s of frames under a 136-year header
    lying_duration_mp4(videos / "lying_header.mp4")
    write_index_video(videos / "long.mp4", 53, fps=10)  # 5.3 s: the last window ends at the end, not past it
    _jump_video(videos / "jump.mkv")
    (videos / "empty.mp4").write_bytes(b"")
    encoder = _encoder(model, max_timeline_s=60.0)
    try:
        report = build_index(tmp_path / "idx", videos, encoder, progress=False,
                             segments=SegmentConfig("fixed", window=2.0, stride=1.0))
    finally:
        encoder.close()
    failures = {Path(p).name: error for p, error in report.failures}
    assert set(failures) == {"jump.mkv", "empty.mp4"} and report.added == 6, failures
    assert "frames run past 60 s" in failures["jump.mkv"] and "empty file" in failures["empty.mp4"]
    spans = segment_spans(tmp_path / "idx")
    assert spans["short.mp4"] == [(0.0, pytest.approx(1.5))]
    assert spans["single.mp4"] == [(0.0, pytest.approx(0.04))]
    vfr_end = spans["vfr.mkv"][-1][1]  # the end of the last frame: 3.1 s
    assert vfr_end == pytest.approx(3.1, abs=0.11)
    assert spans["vfr.mkv"] == [(0.0, 2.0), (1.0, 3.0), (pytest.approx(vfr_end - 2.0), vfr_end)]
    for name in ("lying_136_years.mkv", "lying_header.mp4"):  # what decodes (2 s), not the header
        assert spans[name] == [(0.0, pytest.approx(2.0, abs=0.11))], (name, spans[name])
    assert spans["long.mp4"] == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0), (pytest.approx(3.3), pytest.approx(5.3))]
    index = _check_rows(tmp_path / "idx")
    single = [i for i, r in enumerate(index.records) if Path(r.path).name == "single.mp4"]
    assert [int(index.frame_mask[i].sum()) for i in single] == [1]
    assert _leftovers(scratch) == []


@pytest.mark.slow  # starts processes
def test_hostile_corpus_with_segments_is_reported_per_file(tmp_path: Path, model_file: Path) -> None:
    """``index build --segments fixed`` over good, lying, broken and timestamp-jumping files: the good
    ones are indexed in segments, each bad one is listed with its reason (as when indexed whole), the
    build finishes."""
    decodable, broken = hostile_corpus(tmp_path / "videos")
    jump = _jump_video(tmp_path / "videos" / "jump.mkv", years=1)  # past the 24 h cap (at 1 fps: 86400 samples)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    root = tmp_path / "idx"
    command = [sys.executable, "-m", "diffusionret", "index", "build", "--model", str(model_file), "--videos",
               str(tmp_path / "videos"), "--out", str(root), "--frames", "2", "--fps", "1", "--segments", "fixed",
               "--window", "1", "--no-progress", "--decode-timeout", "120"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("5 videos indexed: 5 added, 0 re-encoded, 0 removed, 0 unchanged, 5 failed"), \
        result.stdout
    for path in [*broken, jump]:
        assert f"failed: {path.resolve()}: " in result.stdout
    assert f"failed: {jump.resolve()}: its frames run past 24 h" in result.stdout
    spans = segment_spans(root)
    assert set(spans) == {p.name for p in decodable}
    assert spans["lying_136_years.mkv"][-1][1] == pytest.approx(2.0, abs=0.11)
    assert f"failed: {(tmp_path / 'videos' / 'truncated.mkv').resolve()}: stream ends at" in result.stdout
    _check_rows(root)
    assert _leftovers(scratch) == []
    code, out, _ = run_cli(["index", "info", str(root), "--json"])
    assert code == 0 and {Path(f["path"]).name for f in json.loads(out)["failed_files"]} == \
        {p.name for p in [*broken, jump]}


# ------------------------------------------------------------------------------------- shots
def test_shots_through_index_build_and_update(tmp_path: Path, model_file: Path, scratch: Path) -> None:
    """``--segments shots``: the catalogue's segments are the shots of videos with known cuts (within
    a frame); ``index update`` re-segments the changed file only."""
    videos = tmp_path / "videos"
    write_shot_video(videos / "cuts.mp4", [25, 60, 95], 130)  # shots of 2.5, 3.5, 3.5 and 3.5 s
    write_shot_video(videos / "still.mp4", [], 60)  # 6 s, no cut: windows as in fixed mode
    root = tmp_path / "idx"
    base = ["--no-progress", "--decode-workers", "1"]
    code, out, err = run_cli(["index", "build", "--model", str(model_file), "--videos", str(videos), "--out",
                              str(root), "--frames", "4", "--fps", "2", "--segments", "shots", "--window", "4", *base])
    assert code == 0 and out.startswith("2 videos indexed: 2 added"), (out, err)
    spans = segment_spans(root)
    frame = 0.1
    assert len(spans["cuts.mp4"]) == 4, spans
    for (start, end), (a, b) in zip(spans["cuts.mp4"], [(0, 2.5), (2.5, 6.0), (6.0, 9.5), (9.5, 13.0)], strict=True):
        assert abs(start - a) <= frame + 1e-6 and abs(end - b) <= frame + 1e-6, spans["cuts.mp4"]
    assert spans["still.mp4"] == [(0.0, 4.0), (2.0, 6.0)]
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        assert catalog.read_info(conn)["segments"]["mode"] == "shots"
    before = {(r.path, r.start): (f.clone(), m.clone()) for r, f, m in _rows(root)}

    write_shot_video(videos / "cuts.mp4", [40, 80], 120)  # changed: shots of 4, 4 and 4 s
    write_shot_video(videos / "new.mp4", [30], 50)  # added: 3 s and 2 s
    code, out, err = run_cli(["index", "update", str(root), *base])
    assert code == 0 and out.startswith("3 videos indexed: 1 added, 1 re-encoded, 0 removed, 1 unchanged"), (out, err)
    spans = segment_spans(root)
    for (start, end), (a, b) in zip(spans["cuts.mp4"], [(0, 4.0), (4.0, 8.0), (8.0, 12.0)], strict=True):
        assert abs(start - a) <= frame + 1e-6 and abs(end - b) <= frame + 1e-6, spans["cuts.mp4"]
    assert len(spans["new.mp4"]) == 2 and abs(spans["new.mp4"][0][1] - 3.0) <= frame + 1e-6
    assert spans["still.mp4"] == [(0.0, 4.0), (2.0, 6.0)]
    for r, f, m in _rows(root):  # the unchanged video's rows were kept, not encoded again
        if Path(r.path).name == "still.mp4":
            old_f, old_m = before[(r.path, r.start)]
            assert torch.equal(f, old_f) and torch.equal(m, old_m)
    _check_rows(root)
    assert _leftovers(scratch) == []


def _rows(root: Path) -> list[tuple]:
    index = VideoIndex.load(root)
    return [(r, index.frames[i], index.frame_mask[i]) for i, r in enumerate(index.records)]


def test_thousands_of_shot_cuts_collapse_into_sensible_segments(tmp_path: Path, model: torch.nn.Module,
                                                                scratch: Path) -> None:
    from diffusionret.index.shots import detect_cuts

    videos = tmp_path / "videos"
    flicker = write_shot_video(videos / "flicker.mp4", list(range(1, 1200)), 1200, fps=30, flat=True)  # 40 s
    assert len(detect_cuts(flicker, detector="content")) >= 1000
    encoder = _encoder(model)
    config = SegmentConfig("shots", window=4.0, stride=2.0, shot_detector="content")
    try:
        report = build_index(tmp_path / "idx", videos, encoder, progress=False, segments=config)
    finally:
        encoder.close()
    assert report.added == 1 and report.failed == 0
    spans = segment_spans(tmp_path / "idx")["flicker.mp4"]
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(40.0)
    assert all(1.0 - 1e-6 <= end - start <= 4.0 + 1e-6 for start, end in spans), spans  # min_shot .. window
    assert len(spans) <= 40
    _check_rows(tmp_path / "idx")
