"""A user's own videos: a folder of video files plus a CSV or JSONL of ``video,caption[,start,end]``.

* ``video``: path of the file relative to the video folder (``clips/a.mp4``), or a name without
  extension that is looked up by stem anywhere under the folder.
* ``caption``: one caption; a video may appear on several rows (multi-caption evaluation).
* ``start``, ``end`` (optional, seconds, may be blank): a clip of the file. Rows with different
  clips of one file are different "videos": their id gets a media-fragment suffix ``#t=start,end``.

``anno_path`` is either the annotation file itself (used for every split) or a folder holding
``<split>.csv`` or ``<split>.jsonl`` (e.g. ``train.csv`` and ``test.csv``, the layout the demo corpus
writes). Errors name the file and the line.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

from diffusionret.data.annotations._io import read_csv_rows, read_text
from diffusionret.data.errors import AnnotationError
from diffusionret.data.records import VIDEO_EXTENSIONS, VideoLocator, VideoTextPair

logger = logging.getLogger(__name__)

SUFFIXES = (".csv", ".jsonl")


def annotation_file(anno_path: str | Path, split: str) -> Path:
    """The annotation file of ``split``: ``anno_path`` itself, or ``anno_path/<split>.{csv,jsonl}``."""
    anno_path = Path(anno_path)
    if anno_path.is_file():
        return anno_path
    for candidate in (anno_path / split, *(anno_path / f"{split}{suffix}" for suffix in SUFFIXES)):
        if candidate.is_file():
            return candidate
    raise AnnotationError(
        anno_path, f"no annotation file for split {split!r} (looked for {split}.csv / {split}.jsonl)"
    )


def read_custom(
    anno_path: str | Path, video_path: str | Path, split: str = "train", *, exclude_ids: Collection[str] = ()
) -> list[VideoTextPair]:
    """Records from a user's CSV/JSONL annotation file.

    Raises:
        AnnotationError: missing file, unknown format, missing columns, empty video/caption, or
            malformed start/end (names the file and line).
    """
    path = annotation_file(anno_path, split)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = list(read_csv_rows(path, "annotation file", ("video", "caption")))
    elif suffix in (".jsonl", ".ndjson"):
        rows = list(_read_jsonl(path))
    else:
        raise AnnotationError(path, f"unsupported annotation format {suffix!r}; use .csv or .jsonl")
    root = Path(video_path)
    locator = VideoLocator(root)
    excluded = set(exclude_ids)
    records: list[VideoTextPair] = []
    for line, row in rows:
        record = _record(path, line, row, root, locator)
        if record.video_id not in excluded:
            records.append(record)
    logger.info("%s: %d captions of %d videos", path, len(records), len({r.video_id for r in records}))
    return records


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, text in enumerate(read_text(path, "annotation file").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnnotationError(path, f"invalid JSON: {exc.msg}", line=line) from exc
        if not isinstance(row, dict):
            raise AnnotationError(path, "expected a JSON object per line", line=line)
        rows.append((line, row))
    return rows


def _seconds(path: Path, line: int, name: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise AnnotationError(path, f"{name} must be a number of seconds, got {value!r}", line=line) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise AnnotationError(path, f"{name} must be a finite number >= 0, got {value!r}", line=line)
    return seconds


def _record(path: Path, line: int, row: dict[str, Any], root: Path, locator: VideoLocator) -> VideoTextPair:
    video, caption = row.get("video"), row.get("caption")
    if not isinstance(video, str) or not video.strip():
        raise AnnotationError(path, "missing or empty 'video'", line=line)
    if not isinstance(caption, str) or not caption.strip():
        raise AnnotationError(path, "missing or empty 'caption'", line=line)
    start = _seconds(path, line, "start", row.get("start"))
    end = _seconds(path, line, "end", row.get("end"))
    if start is not None and end is not None and end <= start:
        raise AnnotationError(path, f"end ({end}) must be after start ({start})", line=line)
    video = video.strip()
    relative = Path(video)
    if relative.suffix.lower() in VIDEO_EXTENSIONS:
        video_file, video_id = root / relative, relative.with_suffix("").as_posix()
    else:  # a bare name: look it up by stem
        video_file, video_id = locator.find(video), video
    if start is not None or end is not None:
        video_id += f"#t={'' if start is None else f'{start:g}'},{'' if end is None else f'{end:g}'}"
    return VideoTextPair(video_id=video_id, caption=caption.strip(), video_path=video_file, start=start, end=end)
