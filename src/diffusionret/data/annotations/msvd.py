"""MSVD annotations (docs/reference.md §5.6).

Files in ``anno_path``: ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` (one video id per
line) and ``raw-captions.pkl`` (``{video_id: [[token, ...], ...]}``; a caption is its tokens joined
by spaces). Every caption of every listed video becomes a record, grouped contiguously per video in
list order, so evaluation is multi-caption (about 40 captions per video). Videos are found by file
stem anywhere under ``video_path`` (MSVD ships ``.avi`` files).

The pickle is read with an unpickler that accepts plain lists, dicts and strings only.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from diffusionret.data.annotations._io import read_id_list, read_plain_pickle
from diffusionret.data.errors import AnnotationError
from diffusionret.data.records import VideoLocator, VideoTextPair

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CAPTIONS = "raw-captions.pkl"


def read_msvd(
    anno_path: str | Path, video_path: str | Path, split: str, *, exclude_ids: Collection[str] = ()
) -> list[VideoTextPair]:
    """Records of an MSVD split: all captions of each listed video.

    Raises:
        AnnotationError: missing/malformed list or caption file, or a listed video without captions.
        ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown MSVD split {split!r}; expected one of {SPLITS}")
    anno_path, locator = Path(anno_path), VideoLocator(video_path, default_ext=".avi")
    list_path = anno_path / f"{split}_list.txt"
    ids = read_id_list(list_path, f"MSVD {split} list")
    captions_path = anno_path / CAPTIONS
    captions = read_plain_pickle(captions_path, "MSVD captions")
    if not isinstance(captions, dict):
        raise AnnotationError(captions_path, f"expected a dict video_id -> captions, got {type(captions).__name__}")
    excluded = set(exclude_ids)
    records: list[VideoTextPair] = []
    for line, vid in ids:
        if vid in excluded:
            continue
        if vid not in captions:
            raise AnnotationError(list_path, f"video {vid!r} has no captions in {captions_path}", line=line)
        path = locator.find(vid)
        for caption in _captions_of(captions_path, vid, captions[vid]):
            records.append(VideoTextPair(video_id=vid, caption=caption, video_path=path))
    logger.info("MSVD %s: %d captions of %d videos", split, len(records), len(ids))
    return records


def _captions_of(path: Path, vid: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise AnnotationError(path, "expected a non-empty list of captions", entry=vid)
    result = []
    for k, caption in enumerate(value):
        if isinstance(caption, str):  # already joined
            text = caption
        elif isinstance(caption, list) and all(isinstance(token, str) for token in caption):
            text = " ".join(caption)
        else:
            raise AnnotationError(path, f"caption {k} is neither a token list nor a string", entry=vid)
        if not text.strip():
            raise AnnotationError(path, f"caption {k} is empty", entry=vid)
        result.append(text.strip())
    return result
