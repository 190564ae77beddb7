"""Where the segments of a video lie: pure functions of its duration (and of its shot cuts).

A long video is indexed as several *segments*, each encoded like one training clip (the model was
trained on clips of ``max_frames / fps`` seconds, 12 s for the reference's 12 frames at 1 fps; a
one-hour talk squeezed into 12 frames is far outside that distribution). The modes:

* ``whole``: one segment per video (the behaviour of indexes built before segments existed);
* ``fixed``: windows of ``window`` seconds every ``stride`` seconds, the last one aligned to the
  end of the video, so that every instant is covered and no window reaches past the end; a video
  no longer than one window is one segment;
* ``shots``: the video is cut at its shot boundaries (found by
  :func:`diffusionret.index.shots.detect_cuts`); shots shorter than ``min_shot`` join a neighbour,
  shots longer than ``window`` are split into ``fixed`` windows of their own;
* ``auto``: ``whole`` for videos no longer than :data:`AUTO_WHOLE_FACTOR` windows, ``fixed``
  otherwise (a clip a little longer than the training span is still one clip).

Times are seconds of video time from the first frame (as :func:`diffusionret.data.decode.read_frames`
uses them). Nothing here decodes anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = [
    "AUTO_WHOLE_FACTOR",
    "SEGMENT_MODES",
    "Segment",
    "SegmentConfig",
    "auto",
    "fixed",
    "plan_segments",
    "shots",
    "whole",
]

SegmentMode = Literal["auto", "whole", "fixed", "shots"]
SEGMENT_MODES: tuple[str, ...] = ("auto", "whole", "fixed", "shots")
# ``auto`` keeps a video whole up to this many windows: sampling 12 frames from 18 s instead of 12 s
# stays close to training, and one segment per short clip keeps indexes of clip collections small.
AUTO_WHOLE_FACTOR = 1.5
# Float slack when comparing window edges with the duration: a window ending 1 us before the end is
# not worth another window.
_EPS = 1e-6


@dataclass(frozen=True, order=True)
class Segment:
    """A time span ``[start, end]`` of a video, in seconds (``0 <= start < end``)."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.start < 0 or self.end <= self.start:
            raise ValueError(f"invalid segment [{self.start}, {self.end}]")

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class SegmentConfig:
    """How ``index build`` cuts videos into segments.

    Attributes:
        mode: ``auto``, ``whole``, ``fixed`` or ``shots`` (see the module docstring).
        window: window length in seconds; ``None``: the model's trained span (``max_frames / fps``).
        stride: seconds between window starts; ``None``: half the window.
        min_shot: shots shorter than this (seconds) join a neighbour; ``None``: a quarter window.
        shot_detector: PySceneDetect detector, ``adaptive`` or ``content``.
        shot_threshold: the detector's threshold; ``None``: PySceneDetect's default.
    """

    mode: SegmentMode = "auto"
    window: float | None = None
    stride: float | None = None
    min_shot: float | None = None
    shot_detector: Literal["adaptive", "content"] = "adaptive"
    shot_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in SEGMENT_MODES:
            raise ValueError(f"unknown segment mode {self.mode!r}; expected one of {SEGMENT_MODES}")
        for name in ("window", "stride", "min_shot"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride {self.stride} s exceeds the window {self.window} s: windows would leave gaps")
        if self.shot_detector not in ("adaptive", "content"):
            raise ValueError(f"unknown shot detector {self.shot_detector!r}; expected adaptive or content")
        if self.shot_threshold is not None and not self.shot_threshold > 0:
            raise ValueError(f"shot_threshold must be positive, got {self.shot_threshold}")

    def resolved(self, trained_span: float) -> "SegmentConfig":
        """The config with ``window``/``stride``/``min_shot`` filled in from the model's trained span (s)."""
        if not (math.isfinite(trained_span) and trained_span > 0):
            raise ValueError(f"the trained span must be positive, got {trained_span}")
        window = self.window if self.window is not None else trained_span
        stride = self.stride if self.stride is not None else window / 2
        min_shot = self.min_shot if self.min_shot is not None else window / 4
        return SegmentConfig(self.mode, window, stride, min_shot, self.shot_detector, self.shot_threshold)

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "window": self.window, "stride": self.stride, "min_shot": self.min_shot,
                "shot_detector": self.shot_detector, "shot_threshold": self.shot_threshold}


def _check_duration(duration: float) -> None:
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"a video needs a positive duration to be segmented, got {duration}")


def whole(duration: float) -> list[Segment]:
    """One segment ``[0, duration]``."""
    _check_duration(duration)
    return [Segment(0.0, float(duration))]


def fixed(duration: float, window: float, stride: float, *, offset: float = 0.0) -> list[Segment]:
    """Windows of ``window`` s starting every ``stride`` s, the last one ending at ``duration``.

    Args:
        duration: seconds to cover (``> 0``).
        window: window length (``> 0``).
        stride: distance between starts (``0 < stride <= window``, so consecutive windows touch or overlap).
        offset: added to every start and end (for splitting a shot that starts at ``offset``).

    Returns:
        Segments sorted by start, covering ``[offset, offset + duration]``, none past the end; one
        segment ``[offset, offset + duration]`` when ``duration <= window``.
    """
    _check_duration(duration)
    if not (window > 0 and 0 < stride <= window):
        raise ValueError(f"need 0 < stride <= window, got window {window}, stride {stride}")
    if duration <= window + _EPS:
        return [Segment(offset, offset + duration)]
    # k * stride rather than a running sum: no drift over thousands of windows.
    count = math.ceil((duration - window - _EPS) / stride)  # windows that end strictly before the end
    starts = [k * stride for k in range(count)]
    last = duration - window
    if not starts or last > starts[-1] + _EPS:
        starts.append(last)
    return [Segment(offset + s, offset + s + window) for s in starts[:-1]] + [Segment(offset + last, offset + duration)]


def auto(duration: float, window: float, stride: float) -> list[Segment]:
    """``whole`` up to :data:`AUTO_WHOLE_FACTOR` windows, ``fixed`` beyond."""
    _check_duration(duration)
    if duration <= AUTO_WHOLE_FACTOR * window + _EPS:
        return whole(duration)
    return fixed(duration, window, stride)


def shot_spans(duration: float, cuts: Sequence[float], min_shot: float) -> list[Segment]:
    """Shots between ``cuts``, shots shorter than ``min_shot`` merged into a neighbour.

    Cuts outside ``(0, duration)``, repeated or unsorted cuts are tolerated (a detector that ran on
    a file whose header disagrees with its frames may report a cut past the decoded end). A cut
    that comes less than ``min_shot`` after the last kept cut is dropped (the short shot it would
    end joins the shot after it), and a short last shot joins the one before, so thousands of
    spurious cuts collapse into shots of at least ``min_shot`` seconds, and no cut at all gives one shot.
    """
    _check_duration(duration)
    inner = sorted({float(c) for c in cuts if math.isfinite(c) and _EPS < c < duration - _EPS})
    bounds = [0.0, *inner, float(duration)]
    kept = [bounds[0]]
    for edge in bounds[1:-1]:
        if edge - kept[-1] >= min_shot:  # the shot ending here is long enough: keep the cut
            kept.append(edge)
    kept.append(bounds[-1])
    if len(kept) > 2 and kept[-1] - kept[-2] < min_shot:  # a short last shot joins the previous one
        del kept[-2]
    return [Segment(a, b) for a, b in zip(kept[:-1], kept[1:])]


def shots(duration: float, cuts: Sequence[float], window: float, stride: float, min_shot: float) -> list[Segment]:
    """Shot segments: :func:`shot_spans`, each shot longer than ``window`` split by :func:`fixed`."""
    segments: list[Segment] = []
    for shot in shot_spans(duration, cuts, min_shot):
        segments.extend(fixed(shot.duration, window, stride, offset=shot.start))
    return segments


def plan_segments(duration: float, config: SegmentConfig, cuts: Sequence[float] | None = None) -> list[Segment]:
    """The segments of a video of ``duration`` seconds under a resolved ``config``.

    Args:
        duration: the decoded duration in seconds (what decodes, not what the header says).
        config: a config whose ``window``/``stride``/``min_shot`` are set (:meth:`SegmentConfig.resolved`).
        cuts: shot boundaries in seconds (``shots`` mode only).

    Raises:
        ValueError: unresolved config, non-positive duration, or ``shots`` without cuts.
    """
    if config.window is None or config.stride is None or config.min_shot is None:
        raise ValueError("resolve the segment config against the model's trained span first")
    if config.mode == "whole":
        return whole(duration)
    if config.mode == "fixed":
        return fixed(duration, config.window, config.stride)
    if config.mode == "auto":
        return auto(duration, config.window, config.stride)
    if cuts is None:
        raise ValueError("shots mode needs the shot cuts of the video")
    return shots(duration, cuts, config.window, config.stride, config.min_shot)
