"""Hostile and broken media: lying headers, absurd sizes, timestamp gaps, and the budgeted decode workers.

Every test here is bounded in time even against code that would hang: the decodes that could hang run
in a subprocess or an :class:`~diffusionret.data.isolate.IsolatedPool` with a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import absurd_resolution_mkv, lying_duration_mkv, worker_pid, write_tiny_video
from diffusionret.data import sampling
from diffusionret.data.decode import probe_video, read_frames
from diffusionret.data.errors import VideoDecodeError
from diffusionret.data.preprocess import transcode_video
from diffusionret.data.sampling import reference_frame_indices, sample_times


# ----------------------------------------------------------------------------------- sampling
def test_sampling_targets_do_not_materialise_the_timeline() -> None:
    """A million-second claim costs what a one-second video costs (it used to list every target)."""
    tracemalloc.start()
    try:
        assert len(sample_times(Fraction(1_000_000), fps=1.0, max_frames=12)) == 12
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000, f"{peak} bytes for 12 targets"
    listed = sampling.target_times(Fraction(1000), fps=2.5)
    assert sample_times(Fraction(1000), fps=2.5, max_frames=12) == [listed[i] for i in sampling.subsample(2500, 12)]
    # 136 years (the header of a 5 KB hostile file): still 12 targets, at once.
    years = sample_times(Fraction(4_300_000_000), fps=25.0, max_frames=12, mode="tail")
    assert len(years) == 12 and years[-1] < 4_300_000_000


@settings(max_examples=150, deadline=None)
@given(num_frames=st.integers(0, 3000), avg_fps=st.sampled_from([5.0, 10.0, 24.0, 25.0, 29.97, 30.0, 60.0]),
       framerate=st.integers(1, 4), max_frames=st.integers(1, 16),
       start=st.one_of(st.none(), st.sampled_from([0, 1, 2.5, 7])), end=st.one_of(st.none(), st.integers(1, 120)))
def test_reference_indices_without_listing_equal_the_reference_loop(num_frames, avg_fps, framerate, max_frames,
                                                                     start, end) -> None:
    listed = reference_frame_indices(num_frames, avg_fps, framerate=framerate, max_frames=max_frames,
                                     start=start, end=end)
    original = sampling._MAX_LISTED_FRAMES
    sampling._MAX_LISTED_FRAMES = 0  # force the closed form
    try:
        closed = reference_frame_indices(num_frames, avg_fps, framerate=framerate, max_frames=max_frames,
                                         start=start, end=end)
    finally:
        sampling._MAX_LISTED_FRAMES = original
    assert closed == listed


# ----------------------------------------------------------------------------------- decoding
_READ_SCRIPT = textwrap.dedent("""
    import sys
    from diffusionret.data.decode import probe_video, read_frames
    frames, times = read_frames(sys.argv[1], fps=1.0, max_frames=12, size=32)
    print(len(frames), float(times.max()), probe_video(sys.argv[1]).duration)
""")


@pytest.mark.slow  # starts processes
def test_a_header_claiming_136_years_is_capped_by_what_decodes(tmp_path: Path) -> None:
    path = lying_duration_mkv(tmp_path / "lying.mkv")
    result = subprocess.run([sys.executable, "-c", _READ_SCRIPT, str(path)], capture_output=True, text=True,
                            timeout=120)  # the old sampler listed 4.3e9 targets: hours and all memory
    assert result.returncode == 0, result.stderr[-2000:]
    count, last, duration = result.stdout.split()
    assert int(count) == 2 and float(last) <= 2.0 and float(duration) == pytest.approx(2.0, abs=0.2)
    assert "claims" in result.stderr  # the lie is logged


def test_truncated_and_absurd_files_still_fail_cleanly(tmp_path: Path) -> None:
    whole = write_tiny_video(tmp_path / "whole.mkv", fmt="matroska", frames=60).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VideoDecodeError, match="truncated"):
        read_frames(tmp_path / "cut.mkv", fps=1, max_frames=12, size=32)
    with pytest.raises(VideoDecodeError):
        read_frames(absurd_resolution_mkv(tmp_path / "huge.mkv"), fps=1, max_frames=12, size=32)
    assert probe_video(write_tiny_video(tmp_path / "ok.mp4")).duration == pytest.approx(2.0)


def test_preprocess_does_not_fill_a_timestamp_gap_with_frames(tmp_path: Path) -> None:
    """Frames at 0-0.4 s, then at 1000 s: the output must not hold 3000 copies of one frame."""
    source = write_tiny_video(tmp_path / "gap.mkv", fmt="matroska", frames=10, fps=10,
                              pts=[0, 1, 2, 3, 4, 10_000, 10_001, 10_002, 10_003, 10_004])
    written = transcode_video(source, tmp_path / "out.mp4", fps=3.0, short_side=16)
    # At most the real frames' span plus the 10 s a frame may be held: ~32 frames, not ~3000.
    assert written <= 40
    frames, times = read_frames(tmp_path / "out.mp4", fps=3.0, max_frames=100, size=None)
    assert len(frames) == written
    # The frames after the gap are kept (moved earlier), not dropped.
    assert frames[-1].mean() > frames[0].mean() + 40


# ------------------------------------------------------------------------------ isolated pool
@pytest.mark.slow  # starts processes
def test_pool_kills_a_job_over_its_time_budget_and_goes_on() -> None:
    from diffusionret.data.isolate import DecodeBudget, IsolatedPool, JobFailed

    with IsolatedPool(time.sleep, workers=1, budget=DecodeBudget(timeout_s=1.0)) as pool:
        results = list(pool.map([0, 600, 0]))
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], JobFailed) and "longer than 1 s" in results[1].error


@pytest.mark.slow  # starts processes
def test_pool_reports_memory_exceptions_and_crashes_per_item() -> None:
    from diffusionret.data.isolate import DecodeBudget, IsolatedPool, JobFailed

    budget = DecodeBudget(timeout_s=60.0, memory_bytes=2**30)
    with IsolatedPool(bytearray, workers=2, budget=budget) as pool:
        small, huge, negative = pool.map([16, 8 * 2**30, -1])
    assert small == bytearray(16)
    assert isinstance(huge, JobFailed) and "out of memory" in huge.error
    assert isinstance(negative, JobFailed) and "ValueError" in negative.error
    with IsolatedPool(os._exit, workers=1, budget=budget) as pool:
        crashed = list(pool.map([3, 4]))
    assert all(isinstance(r, JobFailed) and "crashed" in r.error for r in crashed)
    assert "exit status 3" in crashed[0].error


@pytest.mark.slow  # starts processes
def test_pool_reuses_its_workers_and_keeps_order() -> None:
    from diffusionret.data.isolate import IsolatedPool

    with IsolatedPool(worker_pid, workers=2) as pool:
        first = list(pool.map(range(8)))
        second = list(pool.map(range(8)))
    assert len(set(first)) <= 2 and set(second) == set(first)  # no process per file or per call
    assert os.getpid() not in first
    with IsolatedPool(abs, workers=3) as pool:
        assert list(pool.map(range(-20, 0))) == list(range(20, 0, -1))
