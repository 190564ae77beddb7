"""Moments on the one retrieval path: segments are candidates, hits become moments.

A segment (a window or a shot of a longer video) is a candidate exactly as a clip is: the first
stage, WTI and diffusion re-ranking of :func:`~diffusionret.retrieval.retrieve` see rows of frame
features and nothing else. :func:`moment_hits` then merges the ranked segment hits of each video
into moments (:func:`~diffusionret.index.moments.merge_moments`) and bounds how many moments a video
contributes; every returned :class:`~diffusionret.retrieval.Hit` carries ``start``/``end``.

A candidate whose record has no span (a video indexed whole, e.g. by an index built before
segments existed) is the moment ``[0, duration]`` (``end`` ``None`` when the duration is unknown).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusionret.index.moments import MomentConfig, ScoredSegment, merge_moments
from diffusionret.retrieval.cascade import Hit

__all__ = ["SegmentRecord", "SegmentStore", "hit_span", "moment_hits"]


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
    segments = [ScoredSegment(h.video_id, s, e if e is not None else float("inf"), h.score, i)
                for i, (h, (s, e)) in enumerate(zip(hits, spans))]
    moments = merge_moments(segments, config, k)
    out = []
    for rank, moment in enumerate(moments, start=1):
        best = hits[int(moment.best.ref)]  # type: ignore[arg-type]
        end = None if moment.end == float("inf") else moment.end
        out.append(dataclasses.replace(best, rank=rank, start=moment.start, end=end))
    return out


class SegmentStore:
    """In-memory segment candidates (a :class:`~diffusionret.retrieval.CandidateStore`).

    The first stage is the cosine between the query and each segment's pooled embedding
    (:func:`~diffusionret.index.features.pool_frames`), as an index's exact first stage.

    Args:
        frames: (S, T, D) segment frame features (after the temporal module); mask: (S, T) bool.
        records: S :class:`SegmentRecord`.
    """

    def __init__(self, frames: Tensor, mask: Tensor, records: Sequence[SegmentRecord]) -> None:
        from diffusionret.index.features import pool_frames

        if frames.ndim != 3 or mask.shape != frames.shape[:2] or len(records) != frames.shape[0]:
            raise ValueError(f"expected frames (S, T, D), mask (S, T) and S records, got {tuple(frames.shape)}, "
                             f"{tuple(mask.shape)} and {len(records)}")
        self.frames, self.mask, self.records = frames, mask.bool(), list(records)
        self.pooled = pool_frames(frames, self.mask)  # (S, D) unit norm

    def __len__(self) -> int:
        return len(self.records)

    def first_stage(self, query: Tensor, n: int) -> tuple[Tensor, Tensor]:
        scores = F.normalize(query.float(), dim=-1) @ self.pooled.T  # (B, S)
        return torch.topk(scores, min(n, len(self)), dim=1)

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.frames[rows].float(), self.mask[rows]

    def gather_weights(self, rows: Tensor) -> Tensor | None:
        return None

    def record(self, row: int) -> SegmentRecord:
        return self.records[row]
