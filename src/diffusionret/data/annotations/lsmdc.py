"""LSMDC annotations (docs/reference.md §5.7).

Files in ``anno_path``, tab-separated with 6 fields per line
``clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence``:
``LSMDC16_annos_training.csv`` (train), ``LSMDC16_annos_val.csv`` (val),
``LSMDC16_challenge_1000_publictect.csv`` (test). One record per line; the clip files are found by stem
(the clip id) anywhere under ``video_path``. The time columns describe where the clip was cut from the
movie; the clip files are already cut, so records cover whole files.

Known-broken clips: the reference hard-codes six clip ids to skip (docs/reference.md §5.7). The three whose full ids
are known are skipped by default (:data:`BROKEN_CLIPS`); pass more through ``exclude_ids``, or let the
dataset's ``on_error="skip"`` policy drop and report any clip that fails to decode.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from diffusionret.data.annotations._io import read_text
from diffusionret.data.errors import AnnotationError
from diffusionret.data.records import VideoLocator, VideoTextPair

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
BROKEN_CLIPS: frozenset[str] = frozenset(
    {
        "0017_Pianist_00.23.28.872-00.23.34.843",
        "0017_Pianist_00.30.36.767-00.30.38.009",
        "3064_SPARKLE_2012_01.41.07.000-01.41.11.793",
    }
)


def read_lsmdc(
    anno_path: str | Path, video_path: str | Path, split: str, *, exclude_ids: Collection[str] = ()
) -> list[VideoTextPair]:
    """Records of an LSMDC split, one per sentence.

    Raises:
        AnnotationError: missing file, or a line without exactly 6 tab-separated fields or with an
            empty clip id/sentence (names the line).
        ValueError: unknown split.
    """
    if split not in FILES:
        raise ValueError(f"unknown LSMDC split {split!r}; expected one of {SPLITS}")
    path = Path(anno_path) / FILES[split]
    locator = VideoLocator(video_path, default_ext=".avi")
    excluded = BROKEN_CLIPS | set(exclude_ids)
    records: list[VideoTextPair] = []
    skipped = 0
    for line, text in enumerate(read_text(path, f"LSMDC {split} annotations").splitlines(), start=1):
        if not text.strip():
            continue
        fields = text.rstrip("\r\n").split("\t")
        if len(fields) != 6:
            raise AnnotationError(path, f"expected 6 tab-separated fields, got {len(fields)}", line=line)
        clip_id, sentence = fields[0].strip(), fields[5].strip()
        if not clip_id or not sentence:
            raise AnnotationError(path, "empty clip id or sentence", line=line)
        if clip_id in excluded:
            skipped += 1
            continue
        records.append(VideoTextPair(video_id=clip_id, caption=sentence, video_path=locator.find(clip_id)))
    logger.info("LSMDC %s: %d sentences (%d excluded clips skipped)", split, len(records), skipped)
    return records
