"""Frame sampling: pure functions of the metadata (target times, sub-sampling, the reference's indices)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.data.sampling import (
    reference_frame_indices,
    sample_times,
    subsample,
    target_times,
    to_fraction,
)


def test_subsample_modes():
    assert subsample(5, 12) == [0, 1, 2, 3, 4]
    assert subsample(100, 12) == [int(x) for x in np.linspace(0, 99, 12)]
    assert subsample(100, 12)[:3] == [0, 9, 18] and subsample(100, 12)[-1] == 99
    assert subsample(10, 3, "head") == [0, 1, 2]
    assert subsample(10, 3, "tail") == [7, 8, 9]
    assert subsample(0, 3) == []
    with pytest.raises(ValueError):
        subsample(10, 0)
    with pytest.raises(ValueError):
        subsample(10, 3, "middle")


def test_target_times_are_exact_fractions():
    times = target_times(Fraction(300 * 1001, 30000), fps=1)
    assert times == [Fraction(k) for k in range(11)]  # 10.01 s -> 0..10
    assert target_times(Fraction(5, 2), fps=3) == [Fraction(k, 3) for k in range(8)]
    assert target_times(Fraction(1, 25), fps=1) == [0]  # a one-frame video still gives one target
    assert target_times(Fraction(10), fps=0.1) == [0]
    assert to_fraction(29.97) == Fraction(2997, 100) and to_fraction(0.1) == Fraction(1, 10)


def test_target_times_window():
    assert target_times(Fraction(10), fps=2, start=1.5, end=3) == [Fraction(3, 2), 2, Fraction(5, 2)]
    assert target_times(Fraction(10), fps=1, start=8, end=50) == [8, 9]  # end clamped to the video
    assert target_times(Fraction(10), fps=1, start=4, end=4) == [4]  # empty clip -> its start
    with pytest.raises(ValueError, match="starts at"):
        target_times(Fraction(10), fps=1, start=10)
    with pytest.raises(ValueError, match="negative"):
        target_times(Fraction(10), fps=1, start=-1)
    with pytest.raises(ValueError):
        target_times(Fraction(10), fps=0)


@settings(max_examples=200, deadline=None)
@given(
    duration=st.fractions(min_value=Fraction(1, 100), max_value=1000, max_denominator=1000),
    fps=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 29.97]),
    start_frac=st.one_of(st.none(), st.floats(0, 0.99)),
    length=st.one_of(st.none(), st.floats(0, 2000)),
    max_frames=st.integers(1, 64),
)
def test_sample_times_properties(duration, fps, start_frac, length, max_frames):
    start = None if start_frac is None else float(duration) * start_frac
    end = None if (length is None or start is None) else start + length
    every = target_times(duration, fps=fps, start=start, end=end)
    lo = Fraction(0) if start is None else to_fraction(start)
    hi = duration if end is None else min(to_fraction(end), duration)
    # One target per 1/fps inside [start, end), at least one.
    assert len(every) == max(1, math.ceil((hi - lo) * to_fraction(fps)))
    assert every[0] == lo and all(lo <= t < max(hi, lo + Fraction(1, 10**9)) for t in every)
    assert all(b - a == 1 / to_fraction(fps) for a, b in zip(every, every[1:]))
    chosen = sample_times(duration, fps=fps, max_frames=max_frames, start=start, end=end)
    assert len(chosen) == min(max_frames, len(every)) and set(chosen) <= set(every)
    assert chosen == sorted(chosen) and chosen[0] == every[0]
    if len(every) > 1 and max_frames > 1:
        assert chosen[-1] == every[-1]


def reference_oracle(num_frames: int, fps_float: float, framerate: int, max_frames: int) -> list[int]:
    """Simulates the reference's OpenCV loop (docs/reference.md §5.3) with a capture whose reads fail past the end."""
    fps = int(fps_float)
    total_duration = -(-num_frames // fps)
    interval = fps // framerate if fps // framerate > 0 else 1
    inds = np.arange(0, fps, interval)[:framerate]
    images, ret = [], True
    for sec in np.arange(0, total_duration + 1):
        if not ret:
            break
        for ind in inds:
            position = int(sec * fps) + int(ind)
            ret = position < num_frames  # cap.set(POS_FRAMES, position); ret, frame = cap.read()
            if not ret:
                break
            images.append(position)
    if len(images) > max_frames:
        images = [images[i] for i in np.linspace(0, len(images) - 1, num=max_frames, dtype=int)]
    return images


@settings(max_examples=300, deadline=None)
@given(
    num_frames=st.integers(1, 5000),
    fps=st.sampled_from([1.0, 3.0, 10.0, 23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 60.0]),
    framerate=st.integers(1, 4),
    max_frames=st.integers(1, 64),
)
def test_reference_indices_match_the_reference_loop(num_frames, fps, framerate, max_frames):
    assert reference_frame_indices(num_frames, fps, framerate=framerate, max_frames=max_frames) == reference_oracle(
        num_frames, fps, framerate, max_frames
    )


def test_reference_indices_examples():
    # 29.97 fps: the reference reads frame 29 k (drifting), one per second, plus one past the
    # ceil'd duration check: ceil(300 / 29) = 11 seconds.
    assert reference_frame_indices(300, 29.97, max_frames=100) == [29 * k for k in range(11)]
    # 3 fps preprocessed videos (docs/reference.md §6): frame 3 sec.
    assert reference_frame_indices(30, 3.0, max_frames=100) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    # With a clip window (ActivityNet/DiDeMo style integer seconds).
    assert reference_frame_indices(300, 10.0, start=5, end=8, max_frames=100) == [50, 60, 70, 80]
    assert reference_frame_indices(0, 10.0) == []
    with pytest.raises(ValueError):
        reference_frame_indices(10, 10.0, framerate=0)
