"""The demo's last step: find a moment inside a long video.

A few test clips are concatenated into one long video (``corpus/long_demo.mp4``), which is
indexed as overlapping windows of the span the model was trained on (decode once, image tower once
per frame, temporal module per window: :mod:`diffusionret.index.segment_encode`). A fresh
description of one of the clips is the query; the best window becomes a moment
(:func:`~diffusionret.retrieval.moments.merge_moments`), reported with the clip's true span. It costs a
few seconds and uses its own random generator, so the demo's metrics do not move.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusionret.demo.corpus import Corpus, caption, write_mp4

__all__ = ["MomentAnswer", "long_video_query", "mmss"]

LONG_VIDEO_NAME = "long_demo.mp4"


@dataclass(frozen=True)
class MomentAnswer:
    """The long-video query and the moment found.

    Attributes:
        query: the text.
        video: the long video.
        start, end: the moment found (seconds).
        truth_start, truth_end: where the described clip is.
        iou: temporal IoU of the two.
        score: the moment's score.
        windows: windows indexed.
        duration: the long video's decoded duration (seconds).
    """

    query: str
    video: Path
    start: float
    end: float
    truth_start: float
    truth_end: float
    iou: float
    score: float
    windows: int
    duration: float = 0.0


def mmss(seconds: float) -> str:
    """``75.4`` -> ``"01:15"`` (minutes may exceed 59)."""
    whole = int(seconds)
    return f"{whole // 60:02d}:{whole % 60:02d}"


def _decode_all(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@torch.no_grad()
def long_video_query(model: Any, corpus: Corpus, *, fps: int, max_frames: int, max_words: int, seed: int,
                     num_clips: int = 6, sample_fps: float | None = None) -> MomentAnswer:
    """Concatenate ``num_clips`` test clips, index them as windows and look for one of them.

    Args:
        model: the trained model.
        corpus: the demo corpus (its first ``num_clips`` test clips are used).
        fps: the clips' frame rate (the long video is written at it).
        max_frames, max_words: the model's input config.
        seed: seeds the choice of the clip and its description.
        num_clips: clips in the long video (at most the test split's size).
        sample_fps: the model's sampling rate (default ``fps``); the window is ``max_frames / sample_fps``.
    """
    from diffusionret.retrieval.moments import MomentConfig, ScoredSegment, iou, merge_moments
    from diffusionret.index.segment_encode import encode_segments, encode_timeline
    from diffusionret.index.segments import SegmentConfig, plan_segments
    from diffusionret.tokenizer import tokenize

    rng = np.random.default_rng([seed, 11])  # its own stream: the demo's generator is left alone
    sample_fps = float(sample_fps or fps)
    specs = corpus.test[:num_clips]
    parts = [_decode_all(corpus.video_dir / f"{spec.video_id}.mp4") for spec in specs]
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]) / fps
    path = corpus.root / LONG_VIDEO_NAME
    write_mp4(path, np.concatenate(parts), fps=fps)
    target = int(rng.integers(len(specs)))
    query = caption(specs[target], rng)

    timeline = encode_timeline(model, path, fps=sample_fps)
    config = SegmentConfig(mode="fixed").resolved(max_frames / sample_fps)
    segments = plan_segments(timeline.duration, config)
    video, mask = encode_segments(model, timeline, segments, max_frames)
    ids, text_mask = tokenize([query], max_words=max_words)
    tokens, _ = model.encode_text(ids, text_mask)
    scores = model.similarity(tokens, text_mask, video, mask.long())[0]
    candidates = [ScoredSegment(path.name, s.start, s.end, float(v)) for s, v in zip(segments, scores.tolist())]
    best = merge_moments(candidates, MomentConfig(per_video=1), k=1)[0]
    lo, hi = float(bounds[target]), float(bounds[target + 1])
    return MomentAnswer(query=query, video=path, start=best.start, end=best.end, truth_start=lo, truth_end=hi,
                        iou=iou(best.start, best.end, lo, hi), score=best.score, windows=len(segments),
                        duration=timeline.duration)
