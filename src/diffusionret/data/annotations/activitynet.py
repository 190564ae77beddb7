"""ActivityNet Captions annotations, paragraph-to-video (docs/reference.md §5.8).

Files in ``anno_path``: ``train_ids.json`` / ``val_ids.json`` (lists of ids ``v_XXXXXXXXXXX``) and
``train.json`` / ``val_1.json`` / ``val_2.json`` (``{id: {"duration", "timestamps", "sentences"}}``).
Each video becomes one record whose caption is all its sentences (stripped) joined by single spaces,
in ``*_ids.json`` order; videos without sentences are skipped. Splits: ``"train"``, ``"val"`` (= ``"test"``
= ``val_1``, what the paper reports) and ``"val_2"``.

The record covers the whole video (``start = end = None``); the reference's ``end = ceil(duration)``
(docs/reference.md §8.36) only ever clamped to the file's own length. Video files are found by stem, with or
without the ``v_`` prefix, anywhere under ``video_path``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from diffusionret.data.annotations._io import read_json
from diffusionret.data.errors import AnnotationError
from diffusionret.data.records import VideoLocator, VideoTextPair

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "val_2")
_FILES = {
    "train": ("train_ids.json", "train.json"),
    "val": ("val_ids.json", "val_1.json"),
    "test": ("val_ids.json", "val_1.json"),
    "val_2": ("val_ids.json", "val_2.json"),
}


def read_activitynet(
    anno_path: str | Path, video_path: str | Path, split: str, *, exclude_ids: Collection[str] = ()
) -> list[VideoTextPair]:
    """One paragraph record per video of an ActivityNet Captions split.

    Raises:
        AnnotationError: missing/malformed id list or caption file (names the file and entry).
        ValueError: unknown split.
    """
    if split not in _FILES:
        raise ValueError(f"unknown ActivityNet split {split!r}; expected one of {SPLITS}")
    anno_path, locator = Path(anno_path), VideoLocator(video_path)
    ids_path, captions_path = (anno_path / name for name in _FILES[split])
    ids = read_json(ids_path, f"ActivityNet {split} id list")
    if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids):
        raise AnnotationError(ids_path, "expected a JSON list of video id strings")
    captions = read_json(captions_path, f"ActivityNet {split} captions")
    if not isinstance(captions, dict):
        raise AnnotationError(captions_path, "expected a JSON object {video_id: {...}}")
    excluded = set(exclude_ids)
    records: list[VideoTextPair] = []
    without = 0
    for vid in dict.fromkeys(ids):  # de-duplicate, keep order
        if vid in excluded:
            continue
        item = captions.get(vid)
        if item is None:
            without += 1
            continue
        sentences = item.get("sentences") if isinstance(item, dict) else None
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise AnnotationError(captions_path, "needs a 'sentences' list of strings", entry=vid)
        paragraph = " ".join(s.strip() for s in sentences if s.strip())
        if not paragraph:
            without += 1
            continue
        records.append(VideoTextPair(video_id=vid, caption=paragraph, video_path=_find(locator, vid)))
    if without:
        logger.info("ActivityNet %s: %d listed videos have no sentences and are skipped", split, without)
    logger.info("ActivityNet %s: %d paragraphs", split, len(records))
    return records


def _find(locator: VideoLocator, vid: str) -> Path:
    path = locator.find(vid)
    if not path.is_file() and vid.startswith("v_"):
        bare = locator.find(vid[2:])  # some downloads drop the "v_" prefix
        if bare.is_file():
            return bare
    return path
