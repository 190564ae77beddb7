"""Moments: scored segments become time spans, on the one retrieval path.

A segment (a window or a shot of a longer video) is a candidate exactly as a clip is: the first
stage, WTI and diffusion re-ranking of :func:`~diffusionret.retrieval.retrieve` see rows of frame
features and nothing else (:class:`SegmentStore` holds segments in memory; an index's rows may be
segments too). :func:`moment_hits` then turns one query's ranked hits into moments:

* overlapping windows of the same video around a match all score well, and listing them
  separately would fill the top ``k`` with one video. :func:`merge_moments` walks the segments
  from the best score down: a segment overlapping or touching a moment already taken from its
  video joins it (the moment grows to the union) when its score is within ``merge_margin`` of that
  moment's best score (an event longer than one window lights up several windows in a row); a
  segment overlapping a moment that it does not join is suppressed (temporal non-maximum
  suppression: a worse view of the same moment); otherwise it opens a new moment, if its video
  has fewer than ``per_video`` moments;
* a moment keeps the score of its best segment, so moments rank exactly as their best segments did;
* a candidate whose record has no span (a video indexed whole, e.g. by an index built before
  segments existed) is the moment ``[0, duration]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

from torch import Tensor

from diffusionret.retrieval.cascade import FeatureStore, Hit

__all__ = ["Moment", "MomentConfig", "ScoredSegment", "SegmentRecord", "SegmentStore", "hit_span", "iou",
           "merge_moments", "moment_hits"]

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
    """A moment being merged: its video, span, best segment and merged segments (by position)."""

    video: Hashable
    start: float
    end: float
    best: int
    parts: list[int]


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
    opened = _merge([s.video for s in segments], [s.start for s in segments], [s.end for s in segments],
                    [s.score for s in segments], config or MomentConfig(), k)
    return [Moment(m.video, m.start, m.end, segments[m.best].score, segments[m.best],
                   tuple(segments[i] for i in m.parts)) for m in opened]


def _merge(videos: Sequence[Hashable], starts: Sequence[float], ends: Sequence[float], scores: Sequence[float],
           config: MomentConfig, k: int | None) -> list[_Open]:
    """:func:`merge_moments` on parallel columns (segment i is ``videos[i], starts[i], ends[i], scores[i]``).

    Works on positions rather than segment objects, so :func:`moment_hits` builds neither
    :class:`ScoredSegment` nor :class:`Moment` objects (a search query's 100 candidates spent most
    of the merge there).

    Returns:
        the first ``k`` (``None``: all) moments by score, descending, as :class:`_Open` positions.
    """
    negated = [-score for score in scores]
    order = sorted(range(len(scores)), key=negated.__getitem__)  # stable: ties keep input order
    moments: list[_Open] = []
    by_video: dict[Hashable, list[_Open]] = {}
    for i in order:
        start, end, score = starts[i], ends[i], scores[i]
        taken = by_video.setdefault(videos[i], [])
        near = [m for m in taken if start <= m.end + _TOUCH_S and end >= m.start - _TOUCH_S]
        if near:
            # Overlapping or touching: join the best such moment if the score is close, else suppress.
            target = near[0]  # moments are opened best-first, so near[0] scores highest
            overlaps = any(min(end, m.end) - max(start, m.start) > _TOUCH_S for m in near)
            if score >= scores[target.best] - config.merge_margin:
                target.start, target.end = min(target.start, start), max(target.end, end)
                target.parts.append(i)
                _absorb(target, taken, moments)
                continue
            if overlaps:
                continue
        if len(taken) >= config.per_video:
            continue
        opened = _Open(videos[i], start, end, i, [i])
        taken.append(opened)
        moments.append(opened)
    moments.sort(key=lambda m: negated[m.best])
    return moments if k is None else moments[:k]


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


@dataclass(frozen=True)
class SegmentRecord:
    """A segment of a video as a candidate.

    Attributes:
        id: the video's id (segments of one video share it).
        start, end: the segment in seconds.
        path: the video file, when known.
        duration: the video's duration in seconds, when known.
    """

    id: str
    start: float
    end: float
    path: str | None = None
    duration: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "video_id": self.id, "path": self.path, "duration": self.duration}


def hit_span(hit: Hit) -> tuple[float, float | None]:
    """The time span of a candidate: its record's segment, else the whole video ``[0, duration]``."""
    record = hit.record
    start = getattr(record, "start", None)
    if start is not None:
        return float(start), float(record.end)
    duration = getattr(record, "duration", None)
    return 0.0, None if duration is None else float(duration)


def moment_hits(hits: Sequence[Hit], config: MomentConfig | None = None, k: int | None = None) -> list[Hit]:
    """Merge ranked segment hits into moments (best first), at most ``config.per_video`` per video.

    Args:
        hits: one query's hits (any order; typically the cascade's top candidates).
        config: ``per_video`` and ``merge_margin``.
        k: the most moments returned.

    Returns:
        Hits re-ranked 1..n: each is its moment's best segment hit, with ``start``/``end`` set to
        the moment's span (the union of the merged segments).
    """
    spans = [hit_span(h) for h in hits]
    inf = float("inf")
    moments = _merge([h.video_id for h in hits], [s for s, _ in spans], [inf if e is None else e for _, e in spans],
                     [h.score for h in hits], config or MomentConfig(), k)
    out = []
    for rank, moment in enumerate(moments, start=1):
        end = None if moment.end == inf else moment.end
        out.append(dataclasses.replace(hits[moment.best], rank=rank, start=moment.start, end=end))
    return out


class SegmentStore(FeatureStore):
    """In-memory segment candidates (a :class:`~diffusionret.retrieval.CandidateStore`): every
    segment is scored by WTI, as :class:`~diffusionret.retrieval.FeatureStore` scores clips.

    Args:
        frames: (S, T, D) segment frame features (after the temporal module); mask: (S, T) bool.
        records: S :class:`SegmentRecord`.
    """

    def __init__(self, frames: Tensor, mask: Tensor, records: Sequence[SegmentRecord]) -> None:
        super().__init__(frames.float(), mask.bool(), [r.id for r in records])
        self.records = list(records)

    def record(self, row: int) -> SegmentRecord:
        return self.records[row]
