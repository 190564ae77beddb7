"""Which frames of a video to use: pure functions of the video's metadata (no decoding here).

Two families:

* **Timestamp sampling** (``"uniform"``, ``"head"``, ``"tail"``): target times ``start + k / fps`` for every
  ``k`` with the time inside ``[start, end)``, computed with exact fractions (no integer-fps truncation,
  so 29.97 fps videos do not drift), then reduced to ``max_frames`` targets. The decoder then takes,
  for each target, the frame *displayed* at that time (the last frame whose presentation timestamp is
  ``<= t``), which is also correct for variable-frame-rate videos.
* **Reference sampling** (``"reference"``): the frame indices the reference's OpenCV pipeline reads
  (docs/reference.md §5.3), for numerical compatibility with released checkpoints.

Reducing ``n`` candidates to ``max_frames`` (:func:`subsample`): ``"uniform"`` takes
``floor(linspace(0, n - 1, max_frames))`` (the reference's choice), ``"head"`` the first and ``"tail"``
the last ``max_frames``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import numpy as np

from diffusionret.inputs import REFERENCE_INPUT

SamplingMode = Literal["uniform", "head", "tail", "reference"]
SAMPLING_MODES: tuple[str, ...] = ("uniform", "head", "tail", "reference")


def to_fraction(value: float | int | Fraction) -> Fraction:
    """Exact-enough rational form of a user-given number of seconds or frames per second.

    ``limit_denominator`` turns binary floats such as ``0.1`` or ``29.97`` back into the decimal the
    user meant, so ``k / fps`` targets land exactly on frame boundaries when they should.
    """
    if isinstance(value, Fraction):
        return value
    if isinstance(value, int):
        return Fraction(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return Fraction(value).limit_denominator(1_000_000)


def subsample(n: int, max_frames: int, mode: str = "uniform") -> list[int]:
    """Indices of the candidates kept when ``n`` exceed ``max_frames``.

    Args:
        n: number of candidates.
        max_frames: ``T``, the most to keep (``>= 1``).
        mode: ``"uniform"`` (also used by ``"reference"``), ``"head"`` or ``"tail"``.

    Returns:
        ``min(n, T)`` sorted indices into the candidates. Uniform uses NumPy's ``linspace`` cast to int
        (floor), which is bit-for-bit the reference's choice.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if n <= max_frames:
        return list(range(n))
    if mode in ("uniform", "reference"):
        return [int(i) for i in np.linspace(0, n - 1, num=max_frames).astype(int)]
    if mode == "head":
        return list(range(max_frames))
    if mode == "tail":
        return list(range(n - max_frames, n))
    raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLING_MODES}")


def window(duration: Fraction, start: float | None, end: float | None) -> tuple[Fraction, Fraction]:
    """The clip ``[start, end)`` clamped to ``[0, duration]``.

    Raises:
        ValueError: when the clip starts at or after the end of the video (an annotation that does
            not fit the file), or ``start`` is negative.
    """
    lo = Fraction(0) if start is None else to_fraction(start)
    hi = duration if end is None else min(to_fraction(end), duration)
    if lo < 0:
        raise ValueError(f"clip start {float(lo)} s is negative")
    if lo >= duration:
        raise ValueError(f"clip starts at {float(lo):.3f} s but the video is only {float(duration):.3f} s long")
    return lo, max(hi, lo)


def target_times(
    duration: Fraction, *, fps: float, start: float | None = None, end: float | None = None
) -> list[Fraction]:
    """All sampling times ``start + k / fps`` inside the clip ``[start, end)``, at least one.

    Args:
        duration: video duration in seconds (exact).
        fps: samples per second (any positive number, e.g. ``1``, ``0.5``, ``2.5``).
        start, end: clip bounds in seconds; ``None`` means the start/end of the video.

    Returns:
        ``n = max(1, ceil((end - start) * fps))`` times, in seconds from the start of the video.
    """
    lo, rate, n = _target_grid(duration, fps=fps, start=start, end=end)
    return [lo + Fraction(k) / rate for k in range(n)]


def _target_grid(
    duration: Fraction, *, fps: float, start: float | None, end: float | None
) -> tuple[Fraction, Fraction, int]:
    """``(lo, rate, n)``: the targets of :func:`target_times` are ``lo + k / rate`` for ``k < n``."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rate = to_fraction(fps)
    lo, hi = window(duration, start, end)
    return lo, rate, max(1, math.ceil((hi - lo) * rate))


def sample_times(
    duration: Fraction,
    *,
    fps: float,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    mode: str = "uniform",
) -> list[Fraction]:
    """:func:`target_times` reduced to at most ``max_frames`` by :func:`subsample` (``mode``).

    Only the kept targets are computed: the work does not grow with the duration, which a
    container header may claim to be anything (136 years in 5 KB).
    """
    lo, rate, n = _target_grid(duration, fps=fps, start=start, end=end)
    return [lo + Fraction(k) / rate for k in subsample(n, max_frames, mode)]


# Above this many candidate frames, reference sampling computes only the kept indices (see
# :func:`_reference_indices_closed_form`); below it, it follows the reference's loop step by step.
_MAX_LISTED_FRAMES = 1_000_000


def _reference_indices_closed_form(
    num_frames: int, fps: int, offsets: list[int], start_sec: float, seconds: int, max_frames: int, mode: str
) -> list[int]:
    """The reference loop's result without listing every candidate (for absurdly long videos).

    Candidate ``i`` is frame ``int((start + i // m) * fps) + offsets[i % m]`` (``m`` offsets); the
    candidates increase with ``i``, so the loop's stop (the first frame past the end) is found by
    bisection.
    """
    m = len(offsets)

    def frame(i: int) -> int:
        return int((start_sec + i // m) * fps) + offsets[i % m]

    lo, hi = 0, seconds * m  # the count n of candidates before the first one >= num_frames
    while lo < hi:
        mid = (lo + hi) // 2
        if frame(mid) >= num_frames:
            hi = mid
        else:
            lo = mid + 1
    return [frame(i) for i in subsample(lo, max_frames, mode)]


def reference_frame_indices(
    num_frames: int,
    avg_fps: float,
    *,
    framerate: int = 1,
    max_frames: int = REFERENCE_INPUT.max_frames,
    start: float | None = None,
    end: float | None = None,
    mode: str = "uniform",
) -> list[int]:
    """Frame indices the reference's OpenCV pipeline reads (docs/reference.md §5.3), before the 224 transform.

    The reference truncates the frame rate to an integer (``int(29.97) == 29``), measures the video in
    whole seconds ``ceil(num_frames / fps)``, reads frame ``int(sec * fps) + offset`` for every second
    ``sec`` of ``[start, end]`` (inclusive) and every in-second offset, stops at the first frame past
    the end, then keeps ``floor(linspace(0, n - 1, max_frames))`` of the ``n`` frames read.

    Args:
        num_frames: the container's frame count (OpenCV's ``CAP_PROP_FRAME_COUNT``).
        avg_fps: the stream's average frame rate (OpenCV's ``CAP_PROP_FPS``).
        framerate: the reference's ``--video_framerate`` (an integer number of frames per second).
        max_frames: ``T``.
        start, end: clip bounds in seconds, ``None`` for the whole video.
        mode: how to reduce to ``max_frames`` (the reference uses ``"uniform"``).

    Returns:
        Sorted 0-based frame indices, at most ``max_frames`` of them; empty only when the video has no
        frames.
    """
    if framerate < 1 or int(framerate) != framerate:
        raise ValueError(f"reference sampling needs an integer framerate >= 1, got {framerate}")
    framerate = int(framerate)
    # The reference would divide by zero for videos slower than 1 fps; reading one frame per second
    # of such a video is the natural extension.
    fps = max(1, int(avg_fps))
    total_duration = -(-num_frames // fps)  # ceil, in integer arithmetic as the reference does
    start_sec = 0 if start is None else start
    end_sec = total_duration if end is None else min(end, total_duration)
    interval = max(1, fps // framerate)
    offsets = list(range(0, fps, interval))[:framerate]
    seconds = math.floor(end_sec - start_sec) + 1 if end_sec >= start_sec else 0
    if seconds * len(offsets) > _MAX_LISTED_FRAMES:
        return _reference_indices_closed_form(num_frames, fps, offsets, start_sec, seconds, max_frames, mode)
    indices: list[int] = []
    sec = start_sec
    while sec <= end_sec:
        base = int(sec * fps)
        for offset in offsets:
            index = base + offset
            if index >= num_frames:  # the reference's first failed read ends the loop
                return [indices[i] for i in subsample(len(indices), max_frames, mode)]
            indices.append(index)
        sec += 1
    return [indices[i] for i in subsample(len(indices), max_frames, mode)]
