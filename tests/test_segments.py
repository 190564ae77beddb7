"""Segment planning (window arithmetic, shots) and the merge of scored segments into moments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.retrieval.moments import MomentConfig, ScoredSegment, iou, merge_moments
from diffusionret.index.segments import (
    AUTO_WHOLE_FACTOR,
    Segment,
    SegmentConfig,
    auto,
    fixed,
    plan_segments,
    shot_spans,
    shots,
    whole,
)

# At most ~1000 / (0.5 * 0.1) = 20k windows per example: long enough to show drift, quick to check.
durations = st.floats(min_value=0.01, max_value=1000.0, allow_nan=False)
windows = st.floats(min_value=0.5, max_value=120.0, allow_nan=False)
fractions = st.floats(min_value=0.1, max_value=1.0, allow_nan=False)


def _check_cover(segments: list[Segment], lo: float, hi: float) -> None:
    assert segments, "at least one segment"
    assert segments[0].start == pytest.approx(lo, abs=1e-9)
    assert segments[-1].end == pytest.approx(hi, abs=1e-9)
    for a, b in zip(segments, segments[1:]):
        assert a.start < b.start, "starts strictly increase"
        assert b.start <= a.end + 1e-9, "no gap between consecutive segments"
    for s in segments:
        assert lo - 1e-9 <= s.start < s.end <= hi + 1e-9, "no segment outside the video"


@settings(max_examples=150, deadline=None)
@given(duration=durations, window=windows, frac=fractions)
def test_fixed_windows_cover_the_video_in_order(duration: float, window: float, frac: float) -> None:
    stride = window * frac
    segments = fixed(duration, window, stride)
    _check_cover(segments, 0.0, duration)
    if duration <= window:
        assert segments == [Segment(0.0, duration)]
        return
    for s in segments:
        assert s.duration == pytest.approx(window, rel=1e-9, abs=1e-9), "every window has the window's length"
    assert segments[-1].end == duration, "the last window ends at the end"
    for a, b in zip(segments[:-2], segments[1:-1]):
        assert b.start - a.start == pytest.approx(stride, rel=1e-6, abs=1e-6)
    # Count: one window per stride before the end-aligned one, never a duplicate of it.
    assert len(segments) <= int((duration - window) / stride) + 2


@settings(max_examples=100, deadline=None)
@given(duration=durations, window=windows, frac=fractions, offset=st.floats(min_value=0, max_value=1000))
def test_fixed_with_offset_shifts_every_window(duration: float, window: float, frac: float, offset: float) -> None:
    base = fixed(duration, window, window * frac)
    shifted = fixed(duration, window, window * frac, offset=offset)
    assert len(base) == len(shifted)
    for a, b in zip(base, shifted):
        assert b.start == pytest.approx(a.start + offset) and b.end == pytest.approx(a.end + offset)


def test_fixed_examples() -> None:
    assert fixed(30.0, 12.0, 6.0) == [Segment(0, 12), Segment(6, 18), Segment(12, 24), Segment(18, 30)]
    # Not a multiple of the stride: the last window is aligned to the end and overlaps more.
    assert fixed(25.0, 12.0, 6.0) == [Segment(0, 12), Segment(6, 18), Segment(12, 24), Segment(13, 25)]
    assert fixed(12.0, 12.0, 6.0) == [Segment(0, 12)]
    assert fixed(5.0, 12.0, 6.0) == [Segment(0, 5)]  # shorter than a window: one segment
    assert fixed(0.04, 12.0, 6.0) == [Segment(0, 0.04)]  # a single frame


@pytest.mark.parametrize("bad", [dict(duration=0.0), dict(duration=-1.0), dict(duration=float("nan")),
                                 dict(duration=float("inf"))])
def test_bad_durations_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="positive duration"):
        fixed(bad["duration"], 12.0, 6.0)
    with pytest.raises(ValueError, match="positive duration"):
        whole(bad["duration"])


def test_stride_must_not_leave_gaps() -> None:
    with pytest.raises(ValueError, match="stride"):
        fixed(60.0, 12.0, 13.0)
    with pytest.raises(ValueError, match="gaps"):
        SegmentConfig(mode="fixed", window=12.0, stride=13.0)


@settings(max_examples=100, deadline=None)
@given(duration=durations, window=windows, frac=fractions)
def test_auto_is_whole_up_to_one_and_a_half_windows(duration: float, window: float, frac: float) -> None:
    segments = auto(duration, window, window * frac)
    if duration <= AUTO_WHOLE_FACTOR * window:
        assert segments == whole(duration)
    else:
        assert segments == fixed(duration, window, window * frac)
        assert len(segments) >= 2


@settings(max_examples=150, deadline=None)
@given(duration=st.floats(min_value=0.5, max_value=600.0), window=windows, frac=fractions,
       min_frac=st.floats(min_value=0.01, max_value=1.0),
       cuts=st.lists(st.floats(min_value=-10.0, max_value=6000.0, allow_nan=False), max_size=60))
def test_shots_cover_the_video_and_respect_the_limits(duration: float, window: float, frac: float,
                                                      min_frac: float, cuts: list[float]) -> None:
    min_shot = window * min_frac
    spans = shot_spans(duration, cuts, min_shot)
    _check_cover(spans, 0.0, duration)
    for a, b in zip(spans, spans[1:]):
        assert a.end == b.start, "shots tile the video"
    if len(spans) > 1:
        assert all(s.duration >= min_shot - 1e-9 for s in spans), "no shot shorter than the minimum"
    inner = {c for c in cuts if 1e-6 < c < duration - 1e-6}
    assert {s.start for s in spans[1:]} <= inner, "boundaries only at detected cuts"
    segments = shots(duration, cuts, window, window * frac, min_shot)
    _check_cover(segments, 0.0, duration)
    assert all(s.duration <= window + 1e-6 or s in spans for s in segments), "long shots are split"


def test_shots_examples() -> None:
    # Cuts at 10 and 14 s; min shot 3 s: all kept. The 30 s last shot splits into 12 s windows.
    assert shots(44.0, [10.0, 14.0], 12.0, 6.0, 3.0) == [
        Segment(0, 10), Segment(10, 14), Segment(14, 26), Segment(20, 32), Segment(26, 38), Segment(32, 44)]
    # A 1 s flash shot joins the shot after it (the cut that ends it comes too soon and is dropped).
    assert shot_spans(20.0, [5.0, 6.0], 3.0) == [Segment(0, 5), Segment(5, 20)]
    # A short first shot joins the next; a short last shot joins the previous.
    assert shot_spans(20.0, [1.0, 10.0, 19.5], 3.0) == [Segment(0, 10), Segment(10, 20)]


def test_shots_without_cuts_or_with_thousands_of_cuts() -> None:
    assert shots(30.0, [], 12.0, 6.0, 3.0) == fixed(30.0, 12.0, 6.0), "no cut: one shot, split like fixed"
    flicker = [i * 0.04 for i in range(1, 7500)]  # a cut at every frame of a 5-minute 25 fps video
    spans = shot_spans(300.0, flicker, 3.0)
    assert 90 <= len(spans) <= 100 and all(s.duration >= 3.0 - 1e-9 for s in spans)
    assert shot_spans(30.0, [-5.0, 0.0, 30.0, 45.0, float("nan")], 3.0) == [Segment(0, 30)], "cuts outside ignored"


def test_plan_segments_resolves_defaults_from_the_trained_span() -> None:
    config = SegmentConfig(mode="fixed").resolved(12.0)
    assert (config.window, config.stride, config.min_shot) == (12.0, 6.0, 3.0)
    assert plan_segments(30.0, config) == fixed(30.0, 12.0, 6.0)
    assert plan_segments(30.0, SegmentConfig(mode="whole").resolved(12.0)) == [Segment(0, 30)]
    assert plan_segments(17.0, SegmentConfig().resolved(12.0)) == [Segment(0, 17)]
    with pytest.raises(ValueError, match="resolve"):
        plan_segments(30.0, SegmentConfig(mode="fixed"))
    with pytest.raises(ValueError, match="cuts"):
        plan_segments(30.0, SegmentConfig(mode="shots").resolved(12.0))
    with pytest.raises(ValueError, match="unknown segment mode"):
        SegmentConfig(mode="scenes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- moments


def _seg(video: str, start: float, end: float, score: float) -> ScoredSegment:
    return ScoredSegment(video, start, end, score)


def test_overlapping_high_windows_merge_into_one_moment() -> None:
    hits = [_seg("a", 0, 12, 0.50), _seg("a", 6, 18, 0.90), _seg("a", 12, 24, 0.88), _seg("a", 18, 30, 0.20),
            _seg("b", 0, 12, 0.70)]
    moments = merge_moments(hits, MomentConfig(merge_margin=0.05))
    assert [(m.video, m.start, m.end) for m in moments] == [("a", 6, 24), ("b", 0, 12)]
    assert moments[0].score == 0.90 and len(moments[0].parts) == 2
    # Without a margin a moment is its best window; the overlapping windows are suppressed.
    moments = merge_moments(hits, MomentConfig(merge_margin=0.0))
    assert [(m.video, m.start, m.end) for m in moments] == [("a", 6, 18), ("b", 0, 12)]


def test_adjacent_windows_merge_and_far_ones_do_not() -> None:
    hits = [_seg("a", 0, 10, 0.9), _seg("a", 10, 20, 0.89), _seg("a", 40, 50, 0.895)]
    moments = merge_moments(hits, MomentConfig(per_video=2, merge_margin=0.02))
    assert [(m.start, m.end) for m in moments] == [(0, 20), (40, 50)]


def test_per_video_bounds_the_moments_of_a_video() -> None:
    hits = [_seg("a", 0, 10, 0.9), _seg("a", 30, 40, 0.8), _seg("a", 60, 70, 0.7), _seg("b", 0, 10, 0.6)]
    assert [m.video for m in merge_moments(hits)] == ["a", "b"]
    assert [m.video for m in merge_moments(hits, MomentConfig(per_video=2))] == ["a", "a", "b"]
    assert [m.video for m in merge_moments(hits, MomentConfig(per_video=3), k=2)] == ["a", "a"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 20), st.integers(1, 6),
                          st.floats(min_value=-1, max_value=2, allow_nan=False)), min_size=1, max_size=40),
       st.integers(1, 3), st.floats(min_value=0, max_value=0.5))
def test_moment_invariants(raw: list, per_video: int, margin: float) -> None:
    hits = [_seg(v, float(s), float(s + d), score) for v, s, d, score in raw]
    moments = merge_moments(hits, MomentConfig(per_video=per_video, merge_margin=margin))
    scores = [m.score for m in moments]
    assert scores == sorted(scores, reverse=True)
    assert moments[0].score == max(h.score for h in hits), "the best segment always leads"
    for video in "abc":
        mine = [m for m in moments if m.video == video]
        assert len(mine) <= per_video
        for i, a in enumerate(mine):
            assert a.start == min(p.start for p in a.parts) and a.end == max(p.end for p in a.parts)
            assert a.score == max(p.score for p in a.parts)
            for b in mine[i + 1:]:
                assert min(a.end, b.end) - max(a.start, b.start) <= 1e-6, "moments of a video never overlap"


def test_iou() -> None:
    assert iou(0, 10, 0, 10) == 1.0
    assert iou(0, 10, 5, 15) == pytest.approx(5 / 15)
    assert iou(0, 10, 10, 20) == 0.0
    assert iou(0, 10, 20, 30) == 0.0


# ------------------------------------------------------------------------------------ hits -> moments


def test_moment_hits_on_the_retrieval_path() -> None:
    import dataclasses

    import torch

    from diffusionret.retrieval import FeatureStore, Hit, retrieve
    from diffusionret.retrieval.moments import SegmentRecord, SegmentStore, hit_span, moment_hits

    whole = dataclasses.make_dataclass("Whole", [("id", str), ("path", str), ("duration", float)])
    old = Hit(rank=1, score=0.5, record=whole("v", "/v.mp4", 30.0))
    assert hit_span(old) == (0.0, 30.0), "a video indexed whole is the moment [0, duration]"
    seg = [Hit(rank=i + 1, score=s, record=SegmentRecord("a", st, en))
           for i, (s, st, en) in enumerate([(0.9, 6, 18), (0.89, 12, 24), (0.5, 0, 12)])]
    merged = moment_hits(seg + [dataclasses.replace(old, rank=4, score=0.4)], MomentConfig(merge_margin=0.05))
    assert [(h.rank, h.video_id, h.start, h.end) for h in merged] == [(1, "a", 6, 24), (2, "v", 0.0, 30.0)]
    assert merged[0].record == seg[0].record and merged[0].score == 0.9

    # Segments are candidates exactly as clips: the same features give the same scores either way.
    class TinyModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def similarity(self, tokens, mask, video, frame_mask, **options):
            return tokens[:, 0] @ video.mean(1).T  # (1, N)

    frames = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 3, dtype=torch.bool)
    tokens, tmask, cls = torch.randn(1, 2, 4), torch.ones(1, 2), torch.randn(1, 4)
    records = [SegmentRecord("a", float(i), float(i + 2)) for i in range(5)]
    as_segments = retrieve(TinyModel(), tokens, tmask, cls, SegmentStore(frames, mask, records), k=5, candidates=5)[0]
    as_clips = retrieve(TinyModel(), tokens, tmask, cls, FeatureStore(frames, mask, list("abcde")), k=5,
                        candidates=5)[0]
    assert [h.score for h in as_segments] == [h.score for h in as_clips]
