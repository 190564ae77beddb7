"""Moment retrieval in long videos: does segment-level indexing find *where* a caption happens?

    diffusionret demo --out /tmp/demo                       # the model and the corpus (or --quick)
    python benchmarks/bench_moments.py --demo /tmp/demo --out /tmp/moments --threads 1
    python benchmarks/bench_moments.py --demo /tmp/demo --out /tmp/moments --videos 5 --clips 4   # smaller

Long videos are assembled from the demo corpus's test clips: ``--videos`` videos of ``--clips``
consecutive test clips each (decoded, concatenated and re-encoded with PyAV), so the clip
boundaries are the ground truth. Every clip's caption is a query for its own span.

The long videos are indexed with the demo model under ``whole`` (one segment per video, today's
behaviour), ``fixed`` (windows of the trained span, ``max_frames / fps``, every half window) and
``shots`` (PySceneDetect cuts, when installed), through the segment encoder of the index
(:mod:`diffusionret.index.segment_encode`: decode once, image tower once per sampled frame,
temporal module per segment; features kept in fp16 as the index stores them). Each query is
searched through the one retrieval path (:func:`diffusionret.retrieval.retrieve`: the segments are
candidates exactly as clips are; WTI over every segment, as the demo's evaluation scores every
clip, optionally diffusion re-ranking of the top ``K`` from the demo's config), and the 100 best
segments become moments (:func:`diffusionret.retrieval.moments.moment_hits`, one per video).

Reported per mode, without and with re-ranking: video-level R@1/R@5 (the right long video among
the top 1/5 moments), moment R@1/R@5 at IoU >= 0.5 and >= 0.7 (a top-1/5 moment in the right
video overlapping the clip that much), the mean IoU of the top moment (0 when in another video),
and indexing throughput (seconds of video indexed per CPU second, decoding and shot detection
included). The ceiling is the same clips indexed as separate files (video R@1/R@5 among all clips).

Speed-up: encoding every ``fixed`` window independently (``read_frames`` per window + the whole
video tower) against the segment encoder, in CPU seconds, on ``--speedup-videos`` long videos with
the demo model and on a ``--vit-seconds`` video (320x240, 30 fps) with a ViT-B/32-sized model
(random weights: time does not depend on them), checking that both give the same features.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("bench_moments")

IOUS = (0.5, 0.7)


@dataclass(frozen=True)
class Clip:
    """One source clip inside a long video: its caption and span (seconds)."""

    clip_id: str
    caption: str
    start: float
    end: float


@dataclass(frozen=True)
class LongVideo:
    path: Path
    clips: tuple[Clip, ...]

    @property
    def duration(self) -> float:
        return self.clips[-1].end


@dataclass(frozen=True)
class InputSettings:
    """What the model was trained on (its input config)."""

    max_frames: int
    fps: float
    max_words: int
    sampling: str = "uniform"

    @property
    def span(self) -> float:
        return self.max_frames / self.fps


@dataclass
class SegmentTable:
    """Encoded segments of a collection: row ``i`` is ``segments[i]`` of video ``videos[i]``."""

    frames: torch.Tensor  # (S, T, D) fp16
    mask: torch.Tensor  # (S, T) bool
    videos: list[int] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    video_s: float = 0.0


def _decode_all(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def assemble_long_videos(clip_paths: Sequence[Path], captions: Sequence[str], out_dir: Path, *, num_videos: int,
                         clips_per_video: int, fps: int) -> list[LongVideo]:
    """Concatenate consecutive clips into ``num_videos`` mp4 files (H.264 at ``fps``); spans from frame counts."""
    from diffusionret.demo.corpus import write_mp4

    out_dir.mkdir(parents=True, exist_ok=True)
    needed = num_videos * clips_per_video
    if len(clip_paths) < needed:
        raise ValueError(f"{needed} clips needed, {len(clip_paths)} given")
    videos = []
    for v in range(num_videos):
        parts, clips, t = [], [], 0.0
        for j in range(v * clips_per_video, (v + 1) * clips_per_video):
            frames = _decode_all(clip_paths[j])
            parts.append(frames)
            clips.append(Clip(clip_paths[j].stem, captions[j], t, t + len(frames) / fps))
            t += len(frames) / fps
        path = out_dir / f"long_{v:03d}.mp4"
        if not path.exists():
            write_mp4(path, np.concatenate(parts), fps=fps)
        videos.append(LongVideo(path, tuple(clips)))
    return videos


def index_segments(model: torch.nn.Module, paths: Sequence[Path], settings: InputSettings, mode: str,
                   **segment_options: Any) -> SegmentTable:
    """Encode every video's segments under ``mode`` (decode once, tower once per frame)."""
    from diffusionret.index.segment_encode import encode_segments, encode_timeline
    from diffusionret.index.segments import SegmentConfig, plan_segments

    config = SegmentConfig(mode=mode, **segment_options).resolved(settings.span)  # type: ignore[arg-type]
    frames, masks, videos, spans = [], [], [], []
    video_s = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for v, path in enumerate(paths):
        timeline = encode_timeline(model, path, fps=settings.fps, batch_size=64)
        cuts = None
        if mode == "shots":
            from diffusionret.index.shots import detect_cuts

            cuts = detect_cuts(path, detector=config.shot_detector, threshold=config.shot_threshold)
        segments = plan_segments(timeline.duration, config, cuts)
        seg_frames, seg_mask = encode_segments(model, timeline, segments, settings.max_frames,
                                               sampling=settings.sampling)
        frames.append(seg_frames.half())
        masks.append(seg_mask)
        videos += [v] * len(segments)
        spans += [(s.start, s.end) for s in segments]
        video_s += timeline.duration
    return SegmentTable(torch.cat(frames), torch.cat(masks), videos, spans, time.process_time() - cpu0,
                        time.perf_counter() - wall0, video_s)


def segment_store(table: SegmentTable, names: Sequence[str]) -> Any:
    """The encoded segments as candidates of the one retrieval path."""
    from diffusionret.retrieval.moments import SegmentRecord, SegmentStore

    records = [SegmentRecord(names[v], start, end) for v, (start, end) in zip(table.videos, table.spans)]
    return SegmentStore(table.frames, table.mask, records)


@torch.no_grad()
def search_moments(model: torch.nn.Module, store: Any, queries: Sequence[str], settings: InputSettings, *,
                   reranker: Any = None, candidates: int = 100, per_video: int = 1,
                   merge_margin: float = 0.0) -> list[list[Any]]:
    """The top 5 moments of each query: :func:`~diffusionret.retrieval.retrieve` over the segments
    (first stage, WTI, optional re-ranking, as for clips), then :func:`moment_hits`."""
    from diffusionret.retrieval.moments import MomentConfig
    from diffusionret.retrieval import encode_queries, retrieve
    from diffusionret.retrieval.moments import moment_hits

    config = MomentConfig(per_video=per_video, merge_margin=merge_margin)
    results = []
    for start in range(0, len(queries), 64):
        batch = list(queries[start:start + 64])
        tokens, mask, cls = encode_queries(model, batch, settings.max_words, trim=True)
        n = min(candidates, len(store))
        for hits in retrieve(model, tokens, mask, cls, store, k=n, candidates=n, reranker=reranker):
            results.append(moment_hits(hits, config, k=5))
    return results


def moment_metrics(results: Sequence[Sequence[Any]], targets: Sequence[tuple[str, float, float]]) -> dict[str, float]:
    """Video and moment recall of ranked moments (see the module docstring)."""
    from diffusionret.retrieval.moments import iou

    counts = {"video_R1": 0.0, "video_R5": 0.0, "mean_IoU_top1": 0.0}
    for thr in IOUS:
        counts[f"moment_R1@{thr}"] = counts[f"moment_R5@{thr}"] = 0.0
    for moments, (video, start, end) in zip(results, targets, strict=True):
        overlaps = [iou(m.start, m.end, start, end) if m.video_id == video else -1.0 for m in moments[:5]]
        counts["video_R1"] += overlaps[0] >= 0
        counts["video_R5"] += any(o >= 0 for o in overlaps)
        counts["mean_IoU_top1"] += max(0.0, overlaps[0])
        for thr in IOUS:
            counts[f"moment_R1@{thr}"] += overlaps[0] >= thr
            counts[f"moment_R5@{thr}"] += any(o >= thr for o in overlaps)
    return {key: round(100.0 * value / len(targets), 2) if key != "mean_IoU_top1" else round(value / len(targets), 4)
            for key, value in counts.items()}


def load_demo(demo: Path, limit: int) -> tuple[list[Path], list[str]]:
    """The demo's test clips and their captions, in test.csv order."""
    with open(demo / "corpus" / "test.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:limit]
    return [demo / "corpus" / "videos" / row["video"] for row in rows], [row["caption"] for row in rows]


def per_window_speedup(model: torch.nn.Module, paths: Sequence[Path], settings: InputSettings) -> dict[str, float]:
    """CPU time of encoding each ``fixed`` window as its own clip vs the segment encoder; feature agreement."""
    from diffusionret.data.decode import read_frames
    from diffusionret.data.transforms import ClipTransform
    from diffusionret.index.segment_encode import encode_segments, encode_timeline
    from diffusionret.index.segments import SegmentConfig, plan_segments

    config = SegmentConfig(mode="fixed").resolved(settings.span)
    size = int(model.image_size)
    transform = ClipTransform(size)
    cpu0 = time.process_time()
    shared, plans = [], []
    for path in paths:
        timeline = encode_timeline(model, path, fps=settings.fps, batch_size=64)
        plans.append(plan_segments(timeline.duration, config))
        shared.append(encode_segments(model, timeline, plans[-1], settings.max_frames, sampling=settings.sampling))
    shared_s = time.process_time() - cpu0
    cpu0 = time.process_time()
    worst = 0.0
    windows = 0
    with torch.no_grad():
        for path, segments, (frames_s, mask_s) in zip(paths, plans, shared):
            for s, segment in enumerate(segments):
                raw, _ = read_frames(path, fps=settings.fps, max_frames=settings.max_frames, start=segment.start,
                                     end=segment.end, size=size, sampling=settings.sampling)
                clip = torch.zeros(1, settings.max_frames, 3, size, size)
                clip[0, :len(raw)] = transform(raw)
                mask = (torch.arange(settings.max_frames) < len(raw))[None]
                feats = model.encode_video(clip, mask.long())[0] * mask[0, :, None]
                if int(mask.sum()) == int(mask_s[s].sum()):
                    worst = max(worst, float((feats - frames_s[s]).abs().max()))
                else:
                    worst = float("inf")
                windows += 1
    per_window_s = time.process_time() - cpu0
    return {"windows": windows, "segment_encoder_cpu_s": round(shared_s, 3),
            "per_window_cpu_s": round(per_window_s, 3), "speedup": round(per_window_s / max(shared_s, 1e-9), 2),
            "max_abs_feature_diff": worst}


def vit_speedup(out: Path, seconds: int = 60) -> dict[str, float]:
    """:func:`per_window_speedup` with a ViT-B/32-sized model (random weights, 224 px, 12 frames at 1 fps)
    on a 320x240, 30 fps video of ``seconds`` s: the image tower, not decoding, dominates there."""
    from diffusionret.models.config import ModelConfig
    from diffusionret.models.factory import build_model
    from diffusionret.testing.videos import write_video

    path = out / f"vit_{seconds}s.mp4"
    if not path.exists():
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
        frames = (np.roll(base, 3 * i, axis=1) for i in range(30 * seconds))  # content moving every frame
        write_video(path, frames, fps=30, options={"crf": "23", "preset": "veryfast"})
    model = build_model(ModelConfig.vit_b32(), generator=torch.Generator().manual_seed(0)).eval()
    settings = InputSettings(max_frames=12, fps=1.0, max_words=32)
    return per_window_speedup(model, [path], settings)


def run(demo: Path, out: Path, *, num_videos: int, clips_per_video: int, modes: Sequence[str], rerank_top_k: int,
        speedup_videos: int, merge_margins: Sequence[float] = (0.0,), vit_seconds: int = 0) -> dict[str, Any]:
    """The whole benchmark; returns the result dictionary (also printed as JSON lines)."""
    from diffusionret.models.checkpoint import load_checkpoint
    from diffusionret.retrieval import RerankConfig, Reranker

    loaded = load_checkpoint(demo / "stage2" / "model.safetensors")
    model, given = loaded.model, loaded.input
    settings = InputSettings(given.max_frames, given.fps, given.max_words, given.sampling)
    rerankers = {"wti": None}
    if rerank_top_k > 0 and model.has_denoisers:
        rerankers["rerank"] = Reranker(model, RerankConfig.for_schedule(loaded.diffusion, top_k=rerank_top_k))
    clip_paths, captions = load_demo(demo, num_videos * clips_per_video)
    videos = assemble_long_videos(clip_paths, captions, out / "long", num_videos=num_videos,
                                  clips_per_video=clips_per_video, fps=round(settings.fps))
    queries = [c.caption for v in videos for c in v.clips]
    targets = [(v.path.name, c.start, c.end) for v in videos for c in v.clips]
    results: dict[str, Any] = {"settings": vars(settings) | {"span_s": settings.span},
                               "videos": num_videos, "clips_per_video": clips_per_video, "queries": len(queries),
                               "rerank_top_k": rerank_top_k}

    # Ceiling: every clip its own file (one segment each); a hit is right when it is the query's clip.
    clips_table = index_segments(model, clip_paths, settings, "whole")
    clip_store = segment_store(clips_table, [p.name for p in clip_paths])
    ceiling = {}
    for name, reranker in rerankers.items():
        found = search_moments(model, clip_store, queries, settings, reranker=reranker)
        ceiling[name] = moment_metrics(found, [(p.name, *span) for p, span in zip(clip_paths, clips_table.spans)])
    ceiling["throughput_video_s_per_cpu_s"] = round(clips_table.video_s / clips_table.cpu_s, 2)
    results["separate_files"] = ceiling
    emit("separate_files", ceiling)

    for mode in modes:
        if mode == "shots":
            try:
                from diffusionret.index.shots import require_scenedetect

                require_scenedetect()
            except RuntimeError as exc:
                logger.warning("skipping shots: %s", exc)
                continue
        table = index_segments(model, [v.path for v in videos], settings, mode)
        row: dict[str, Any] = {"segments": len(table.videos),
                               "throughput_video_s_per_cpu_s": round(table.video_s / table.cpu_s, 2)}
        store = segment_store(table, [v.path.name for v in videos])
        for name, reranker in rerankers.items():
            for margin in merge_margins:
                key = name if margin == 0 else f"{name}_margin{margin}"
                found = search_moments(model, store, queries, settings, reranker=reranker, merge_margin=margin)
                row[key] = moment_metrics(found, targets)
        ref = ceiling["wti"]["video_R1"]
        row["moment_R1@0.5_over_separate_video_R1"] = round(row["wti"]["moment_R1@0.5"] / ref, 3) if ref else None
        results[mode] = row
        emit(mode, row)

    if speedup_videos:
        results["speedup"] = per_window_speedup(model, [v.path for v in videos[:speedup_videos]], settings)
        emit("speedup", results["speedup"])
    if vit_seconds:
        results["speedup_vit_b32"] = vit_speedup(out, vit_seconds)
        emit("speedup_vit_b32", results["speedup_vit_b32"])
    return results


def emit(name: str, row: dict[str, Any]) -> None:
    print(f"{name}: " + json.dumps(row))
    print("JSON " + json.dumps({"bench": "moments", "name": name, **row}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from _common import add_thread_arg, apply_threads, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a `diffusionret demo --out` folder")
    parser.add_argument("--out", type=Path, required=True, help="where the long videos and results go")
    parser.add_argument("--videos", type=int, default=25)
    parser.add_argument("--clips", type=int, default=10, help="clips per long video")
    parser.add_argument("--modes", default="whole,fixed,shots")
    parser.add_argument("--rerank-top-k", type=int, default=None, help="default: the demo's top_k")
    parser.add_argument("--merge-margins", default="0", help="comma-separated merge margins to report")
    parser.add_argument("--speedup-videos", type=int, default=5, help="long videos for the per-window timing (0: skip)")
    parser.add_argument("--vit-seconds", type=int, default=60,
                        help="also time a ViT-B/32-sized model on a video this long (0: skip)")
    add_thread_arg(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    logging.basicConfig(level=logging.WARNING)
    top_k = args.rerank_top_k
    if top_k is None:
        metrics = args.demo / "metrics.json"
        top_k = json.loads(metrics.read_text())["config"]["top_k"] if metrics.exists() else 32
    print(machine())
    results = run(args.demo, args.out, num_videos=args.videos, clips_per_video=args.clips,
                  modes=args.modes.split(","), rerank_top_k=top_k, speedup_videos=args.speedup_videos,
                  merge_margins=[float(m) for m in args.merge_margins.split(",")], vit_seconds=args.vit_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
