"""Dataset health check: counts, missing or undecodable videos and durations, before any GPU time.

:func:`check_data` reads every split of a :class:`~diffusionret.data.config.DataConfig`, probes each
unique video (open, find the video stream, decode the first frame; with ``deep=True`` decode exactly
the frames training would use) and summarises the result; :func:`format_report` renders it as text.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusionret.data.decode import probe_video, read_frames
from diffusionret.data.errors import AnnotationError, VideoDecodeError

if TYPE_CHECKING:
    from diffusionret.data.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = ["DataCheckReport", "SplitReport", "VideoStatus", "check_data", "format_report", "inspect_videos"]


@dataclass(frozen=True)
class VideoStatus:
    """Result of probing one video: ``error`` is ``None`` for a usable video."""

    path: str
    error: str | None = None
    missing: bool = False
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None


def inspect_video(
    path: str | os.PathLike, start: float | None = None, end: float | None = None,
    read_kwargs: dict[str, Any] | None = None,
) -> VideoStatus:
    """Probe one video (and with ``read_kwargs`` decode the clip as :func:`read_frames` would)."""
    try:
        info = probe_video(path)
        if start is not None and start >= info.duration:
            raise VideoDecodeError(path, f"clip starts at {start} s but the video is only {info.duration:.3f} s long")
        if read_kwargs is not None:
            read_frames(path, start=start, end=end, **read_kwargs)
    except VideoDecodeError as error:
        return VideoStatus(str(path), error=error.cause, missing=error.cause == "file not found")
    return VideoStatus(str(path), duration=info.duration, width=info.width, height=info.height, fps=info.avg_fps)


def inspect_videos(
    items: Sequence[tuple[str | os.PathLike, float | None, float | None]],
    *,
    workers: int = 0,
    read_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> list[VideoStatus]:
    """:func:`inspect_video` for each ``(path, start, end)``, in order, using ``workers`` threads
    (FFmpeg releases the GIL while demuxing and decoding)."""

    def one(item: tuple[str | os.PathLike, float | None, float | None]) -> VideoStatus:
        return inspect_video(item[0], item[1], item[2], read_kwargs)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="probing videos", unit="video")
    results: list[VideoStatus] = []
    try:
        if workers <= 0:
            for item in items:
                results.append(one(item))
                if bar is not None:
                    bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for status in pool.map(one, items):
                    results.append(status)
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


@dataclass
class SplitReport:
    """Health of one split. ``error`` is set (and counts are 0) when its annotations could not be read."""

    split: str
    reader_split: str
    records: int = 0
    videos: int = 0
    captions_per_video: tuple[int, float, int] = (0, 0.0, 0)  # min, mean, max
    missing: list[tuple[str, str]] = field(default_factory=list)  # (video_id, path)
    undecodable: list[tuple[str, str, str]] = field(default_factory=list)  # (video_id, path, cause)
    durations: dict[str, float] = field(default_factory=dict)  # min, median, mean, max, total_hours
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.missing and not self.undecodable


@dataclass
class DataCheckReport:
    dataset: str
    splits: list[SplitReport]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.splits)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "ok": self.ok, "splits": [asdict(s) for s in self.splits]}


def _duration_stats(durations: list[float]) -> dict[str, float]:
    if not durations:
        return {}
    return {
        "min": min(durations),
        "median": statistics.median(durations),
        "mean": statistics.fmean(durations),
        "max": max(durations),
        "total_hours": sum(durations) / 3600.0,
    }


def check_split(
    cfg: DataConfig, split: str, *, workers: int = 4, deep: bool = False, progress: bool = False
) -> SplitReport:
    """Read one split's annotations and probe its videos (see :func:`check_data`)."""
    from diffusionret.data.annotations import get_reader

    reader_split = cfg.reader_split(split)
    report = SplitReport(split=split, reader_split=reader_split)
    try:
        records = get_reader(cfg.dataset)(cfg.anno_path, cfg.video_path, reader_split, exclude_ids=cfg.exclude_ids)
    except (AnnotationError, ValueError) as exc:
        report.error = str(exc)
        return report
    videos: dict[str, tuple[Path, float | None, float | None]] = {}
    counts: dict[str, int] = {}
    for record in records:
        videos.setdefault(record.video_id, (record.video_path, record.start, record.end))
        counts[record.video_id] = counts.get(record.video_id, 0) + 1
    report.records, report.videos = len(records), len(videos)
    if counts:
        values = list(counts.values())
        report.captions_per_video = (min(values), statistics.fmean(values), max(values))
    read_kwargs = {"fps": cfg.fps, "max_frames": cfg.max_frames, "size": None, "sampling": cfg.sampling}
    statuses = inspect_videos(
        list(videos.values()), workers=workers, read_kwargs=read_kwargs if deep else None, progress=progress
    )
    durations = []
    for vid, status in zip(videos, statuses):
        if status.missing:
            report.missing.append((vid, status.path))
        elif status.error is not None:
            report.undecodable.append((vid, status.path, status.error))
        elif status.duration is not None:
            durations.append(status.duration)
    report.durations = _duration_stats(durations)
    return report


def check_data(
    cfg: DataConfig,
    splits: Sequence[str] | None = None,
    *,
    workers: int = 4,
    deep: bool = False,
    progress: bool = False,
) -> DataCheckReport:
    """Check the splits of a dataset config.

    Args:
        cfg: the dataset.
        splits: ``"train"``, ``"val"``, ``"test"`` or reader split names; default: the config's
            train and test splits, plus val when it differs from test.
        workers: threads probing videos.
        deep: decode the frames training would use (slower; catches truncated files).
        progress: show a progress bar.
    """
    if splits is None:
        splits = ["train", "test"] if cfg.reader_split("val") == cfg.reader_split("test") else ["train", "val", "test"]
    reports = [check_split(cfg, split, workers=workers, deep=deep, progress=progress) for split in splits]
    return DataCheckReport(dataset=cfg.dataset, splits=reports)


def format_report(report: DataCheckReport, *, max_listed: int = 10) -> str:
    """A human-readable table of a :class:`DataCheckReport`."""
    lines = [f"dataset: {report.dataset}"]
    header = (
        f"{'split':<12} {'records':>8} {'videos':>7} {'capt/video':>12} {'missing':>8} {'bad':>5}  "
        "duration s (min/median/mean/max, total h)"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for s in report.splits:
        name = s.split if s.split == s.reader_split else f"{s.split}={s.reader_split}"
        if s.error is not None:
            lines.append(f"{name:<12} ERROR: {s.error}")
            continue
        cmin, cmean, cmax = s.captions_per_video
        caps = f"{cmin}/{cmean:.1f}/{cmax}" if s.records else "-"
        d = s.durations
        durs = (f"{d['min']:.1f}/{d['median']:.1f}/{d['mean']:.1f}/{d['max']:.1f}, {d['total_hours']:.2f} h"
                if d else "-")
        counts = f"{s.records:>8} {s.videos:>7} {caps:>12} {len(s.missing):>8} {len(s.undecodable):>5}"
        lines.append(f"{name:<12} {counts}  {durs}")
    for s in report.splits:
        for title, rows in (("missing", s.missing), ("undecodable", s.undecodable)):
            if not rows:
                continue
            lines.append(f"\n{s.split}: {len(rows)} {title} video(s):")
            for row in rows[:max_listed]:
                lines.append("  " + "  ".join(row))
            if len(rows) > max_listed:
                lines.append(f"  ... and {len(rows) - max_listed} more")
    lines.append("\nOK" if report.ok else "\nPROBLEMS FOUND")
    return "\n".join(lines)
