"""merge_moments and moment_hits against a straightforward segment-object reference (the original form)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Hashable

from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.retrieval.cascade import Hit
from diffusionret.retrieval.moments import (_TOUCH_S, Moment, MomentConfig, ScoredSegment, SegmentRecord, hit_span,
                                            merge_moments, moment_hits)


@dataclass
class _RefOpen:
    video: Hashable
    start: float
    end: float
    best: ScoredSegment
    parts: list[ScoredSegment]


def _reference_merge(segments, config=None, k=None) -> list[Moment]:
    config = config or MomentConfig()
    order = sorted(range(len(segments)), key=lambda i: -segments[i].score)
    moments: list[_RefOpen] = []
    by_video: dict = {}
    for i in order:
        seg = segments[i]
        taken = by_video.setdefault(seg.video, [])
        near = [m for m in taken if seg.start <= m.end + _TOUCH_S and seg.end >= m.start - _TOUCH_S]
        if near:
            target = near[0]
            overlaps = any(min(seg.end, m.end) - max(seg.start, m.start) > _TOUCH_S for m in near)
            if seg.score >= target.best.score - config.merge_margin:
                target.start, target.end = min(target.start, seg.start), max(target.end, seg.end)
                target.parts.append(seg)
                for other in list(taken):
                    if other is target or min(target.end, other.end) - max(target.start, other.start) <= _TOUCH_S:
                        continue
                    target.start, target.end = min(target.start, other.start), max(target.end, other.end)
                    target.parts.extend(other.parts)
                    taken.remove(other)
                    moments.remove(other)
                continue
            if overlaps:
                continue
        if len(taken) >= config.per_video:
            continue
        opened = _RefOpen(seg.video, seg.start, seg.end, seg, [seg])
        taken.append(opened)
        moments.append(opened)
    result = [Moment(m.video, m.start, m.end, m.best.score, m.best, tuple(m.parts)) for m in moments]
    result.sort(key=lambda m: -m.score)
    return result if k is None else result[:k]


def _reference_moment_hits(hits, config=None, k=None) -> list[Hit]:
    spans = [hit_span(h) for h in hits]
    segments = [ScoredSegment(h.video_id, s, e if e is not None else float("inf"), h.score, i)
                for i, (h, (s, e)) in enumerate(zip(hits, spans))]
    out = []
    for rank, moment in enumerate(_reference_merge(segments, config, k), start=1):
        end = None if moment.end == float("inf") else moment.end
        out.append(dataclasses.replace(hits[int(moment.best.ref)], rank=rank, start=moment.start, end=end))
    return out


_segment = st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(1, 4),
                     st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5, 0.9]), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(_segment, max_size=30), st.integers(1, 3), st.sampled_from([0.0, 0.05, 0.2, 1.0]),
       st.one_of(st.none(), st.integers(1, 12)))
def test_merge_and_moment_hits_equal_the_reference(parts, per_video, margin, k):
    config = MomentConfig(per_video, margin)
    # Windows on a 0.5 s grid (touching and overlapping ones), few distinct scores (ties), and some
    # whole videos (no span: [0, duration] or [0, inf)).
    records = [SegmentRecord(f"v{v}", s * 0.5, s * 0.5 + w, None, 10.0) if segmented
               else SegmentRecord(f"w{v}", None, None, None, None if s % 2 else 6.0)
               for v, s, w, _, segmented in parts]
    hits = [Hit(rank=i + 1, score=score, record=record, stage_scores={"wti": score})
            for i, ((_, _, _, score, _), record) in enumerate(zip(parts, records))]
    assert moment_hits(hits, config, k) == _reference_moment_hits(hits, config, k)
    segments = [ScoredSegment(h.video_id, *(lambda s, e: (s, float("inf") if e is None else e))(*hit_span(h)),
                              h.score, f"ref{i}") for i, h in enumerate(hits)]
    assert merge_moments(segments, config, k) == _reference_merge(segments, config, k)
