"""DiDeMo annotations, paragraph-to-video (docs/reference.md §5.9).

Files in ``anno_path``: ``{train,val,test}_list.txt`` (one video id per line) and
``{train,val,test}_data.json`` (a list of ``{"description", "times", "video", ...}``, several per
video). Each listed video becomes one record whose caption is its descriptions joined by single spaces
in JSON order; records follow the order of first appearance in the JSON. Video files are found by stem
(the id may itself contain a dot, e.g. ``X.mov`` stored as ``X.mov.mp4``) under ``video_path``.

Records cover the whole video (``start = end = None``) instead of the reference's hard-coded
0-31 s (docs/reference.md §8.36), which cut the rare clips longer than 31 s.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from diffusionret.data.annotations._io import read_id_list, read_json
from diffusionret.data.errors import AnnotationError
from diffusionret.data.records import VideoLocator, VideoTextPair

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def read_didemo(
    anno_path: str | Path, video_path: str | Path, split: str, *, exclude_ids: Collection[str] = ()
) -> list[VideoTextPair]:
    """One paragraph record per video of a DiDeMo split.

    Raises:
        AnnotationError: missing/malformed list or JSON file (names the file and line/entry).
        ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown DiDeMo split {split!r}; expected one of {SPLITS}")
    anno_path, locator = Path(anno_path), VideoLocator(video_path)
    listed = {vid for _, vid in read_id_list(anno_path / f"{split}_list.txt", f"DiDeMo {split} list")}
    listed -= set(exclude_ids)
    data_path = anno_path / f"{split}_data.json"
    data = read_json(data_path, f"DiDeMo {split} data")
    if not isinstance(data, list):
        raise AnnotationError(data_path, "expected a JSON list of {description, times, video} objects")
    paragraphs: dict[str, list[str]] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise AnnotationError(data_path, "expected an object", entry=f"[{i}]")
        vid, description = item.get("video"), item.get("description")
        if not isinstance(vid, str) or not isinstance(description, str):
            raise AnnotationError(data_path, "needs string fields 'video' and 'description'", entry=f"[{i}]")
        if vid in listed and description.strip():
            paragraphs.setdefault(vid, []).append(description.strip())
    missing = len(listed - paragraphs.keys())
    if missing:
        logger.info("DiDeMo %s: %d listed videos have no description and are skipped", split, missing)
    records = [
        VideoTextPair(video_id=vid, caption=" ".join(parts), video_path=locator.find(vid))
        for vid, parts in paragraphs.items()
    ]
    logger.info("DiDeMo %s: %d paragraphs", split, len(records))
    return records
