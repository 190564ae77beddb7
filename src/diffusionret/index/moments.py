"""From scored segments to moments: merge neighbouring windows, bound the moments per video.

Search scores segments (windows or shots); a user wants *moments*. Overlapping windows of the same
video around a match all score well, and listing them separately would fill the top ``k`` with
one video. :func:`merge_moments` walks the segments from the best score down:

* a segment overlapping or touching a moment already taken from its video joins it (the moment
  grows to the union) when its score is within ``merge_margin`` of that moment's best score: an
  event longer than one window lights up several windows in a row;
* a segment overlapping a moment that it does not join is suppressed (temporal non-maximum
  suppression: it is a worse view of the same moment);
* otherwise it opens a new moment, if its video has fewer than ``per_video`` moments.

A moment keeps the score of its best segment, so moments rank exactly as their best segments did.
Pure Python over a few hundred candidates: nothing here touches tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

__all__ = ["Moment", "MomentConfig", "ScoredSegment", "iou", "merge_moments"]

# Windows closer than this (seconds) count as touching: k * stride in float64 may differ in the last bits.
_TOUCH_S = 1e-6


@dataclass(frozen=True)
class ScoredSegment:
    """A candidate from the cascade.

    Attributes:
        video: what identifies the video (e.g. its id).
        start, end: the segment in seconds.
        score: its final score (higher is better).
        ref: anything the caller needs back (e.g. the index row).
    """

    video: Hashable
    start: float
    end: float
    score: float
    ref: object = None


@dataclass(frozen=True)
class Moment:
    """A merged span of one video.

    Attributes:
        video: the video.
        start, end: the union of the merged segments, in seconds.
        score: the best merged segment's score.
        best: that segment.
        parts: every merged segment, best first.
    """

    video: Hashable
    start: float
    end: float
    score: float
    best: ScoredSegment
    parts: tuple[ScoredSegment, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class MomentConfig:
    """How hits become moments.

    Attributes:
        per_video: most moments one video contributes to the results (``>= 1``).
        merge_margin: a neighbouring segment joins a moment when its score is at least the moment's
            score minus this margin (score units: WTI similarity in [-1, 1], plus the re-ranking
            bonus); 0 merges only exact ties, so a moment is its best window.
    """

    per_video: int = 1
    merge_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.per_video < 1:
            raise ValueError(f"per_video must be >= 1, got {self.per_video}")
        if self.merge_margin < 0:
            raise ValueError(f"merge_margin must be >= 0, got {self.merge_margin}")


def iou(a_start: float, a_end: float, b_start: float, b_end: float) -> float:
    """Temporal intersection over union of two spans (0 for disjoint or empty spans)."""
    inter = min(a_end, b_end) - max(a_start, b_start)
    union = max(a_end, b_end) - min(a_start, b_start)
    return max(0.0, inter) / union if union > 0 else 0.0


@dataclass
class _Open:
    video: Hashable
    start: float
    end: float
    best: ScoredSegment
    parts: list[ScoredSegment]


def merge_moments(segments: Sequence[ScoredSegment], config: MomentConfig | None = None,
                  k: int | None = None) -> list[Moment]:
    """Moments from scored segments, best first (see the module docstring).

    Args:
        segments: candidates in any order (ties keep their given order).
        config: ``per_video`` and ``merge_margin``.
        k: stop after this many moments (``None``: all).

    Returns:
        Moments sorted by score, descending; within a video they never overlap.
    """
    config = config or MomentConfig()
    order = sorted(range(len(segments)), key=lambda i: -segments[i].score)  # stable: ties keep input order
    moments: list[_Open] = []
    by_video: dict[Hashable, list[_Open]] = {}
    for i in order:
        seg = segments[i]
        taken = by_video.setdefault(seg.video, [])
        near = [m for m in taken if seg.start <= m.end + _TOUCH_S and seg.end >= m.start - _TOUCH_S]
        if near:
            # Overlapping or touching: join the best such moment if the score is close, else suppress.
            target = near[0]  # moments are opened best-first, so near[0] scores highest
            overlaps = any(min(seg.end, m.end) - max(seg.start, m.start) > _TOUCH_S for m in near)
            if seg.score >= target.best.score - config.merge_margin:
                target.start, target.end = min(target.start, seg.start), max(target.end, seg.end)
                target.parts.append(seg)
                _absorb(target, taken, moments)
                continue
            if overlaps:
                continue
        if len(taken) >= config.per_video:
            continue
        opened = _Open(seg.video, seg.start, seg.end, seg, [seg])
        taken.append(opened)
        moments.append(opened)
    result = [Moment(m.video, m.start, m.end, m.best.score, m.best, tuple(m.parts)) for m in moments]
    result.sort(key=lambda m: -m.score)
    return result if k is None else result[:k]


def _absorb(grown: _Open, taken: list[_Open], moments: list[_Open]) -> None:
    """A moment that grew may now overlap a worse moment of its video: take that one in, so that
    the moments of a video never overlap."""
    for other in list(taken):
        if other is grown or min(grown.end, other.end) - max(grown.start, other.start) <= _TOUCH_S:
            continue
        grown.start, grown.end = min(grown.start, other.start), max(grown.end, other.end)
        grown.parts.extend(other.parts)
        taken.remove(other)
        moments.remove(other)
