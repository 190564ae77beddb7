"""MSR-VTT annotations (docs/reference.md §5.5).

Files in ``anno_path``:

* ``MSRVTT_data.json``: ``{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption",
  ...}]}``; captions for every training split (about 20 per video).
* ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv``: one column ``video_id``.
* ``MSRVTT_JSFUSION_test.csv``: columns ``key, vid_key, video_id, sentence``; the 1k-A test set, one
  caption per video.

Splits: ``"train"`` / ``"train9k"`` (every caption of the 9,000 videos of the 9k list, in JSON order),
``"train7k"``, ``"train_full"`` (the official 6,513 ``train`` videos of ``MSRVTT_data.json``),
``"val"`` / ``"test"`` (1k-A, csv order; the reference validates on the test set, docs/reference.md §8.8),
``"test_full"`` (the official 2,990 ``test`` videos with all their captions). Videos are
``<video_path>/<video_id>.mp4`` (or any file named after the id under ``video_path``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from diffusionret.data.annotations._io import read_csv_rows, read_json
from diffusionret.data.errors import AnnotationError
from diffusionret.data.records import VideoLocator, VideoTextPair

logger = logging.getLogger(__name__)

SPLITS = ("train", "train9k", "train7k", "train_full", "val", "test", "test_full")
DATA_JSON = "MSRVTT_data.json"
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
TRAIN_CSV = {"train": "MSRVTT_train.9k.csv", "train9k": "MSRVTT_train.9k.csv", "train7k": "MSRVTT_train.7k.csv"}


def read_msrvtt(
    anno_path: str | Path, video_path: str | Path, split: str, *, exclude_ids: Collection[str] = ()
) -> list[VideoTextPair]:
    """Records of an MSR-VTT split (see the module docstring for files and split names).

    Raises:
        AnnotationError: a file is missing or malformed (names the file and line/entry).
        ValueError: unknown split.
    """
    anno_path, locator = Path(anno_path), VideoLocator(video_path)
    excluded = set(exclude_ids)
    if split in ("val", "test"):
        pairs = _read_jsfusion(anno_path / TEST_CSV)
    elif split in TRAIN_CSV:
        csv_path = anno_path / TRAIN_CSV[split]
        wanted = {row["video_id"].strip() for _, row in read_csv_rows(csv_path, "MSR-VTT train list", ("video_id",))}
        pairs = _read_sentences(anno_path / DATA_JSON, wanted)
        _check_covered(csv_path, wanted, pairs)
    elif split in ("train_full", "test_full"):
        data_path = anno_path / DATA_JSON
        wanted = _official_split(data_path, "train" if split == "train_full" else "test")
        pairs = _read_sentences(data_path, wanted)
    else:
        raise ValueError(f"unknown MSR-VTT split {split!r}; expected one of {SPLITS}")
    records = [
        VideoTextPair(video_id=vid, caption=caption, video_path=locator.find(vid))
        for vid, caption in pairs
        if vid not in excluded
    ]
    logger.info("MSR-VTT %s: %d captions of %d videos", split, len(records), len({r.video_id for r in records}))
    return records


def _read_jsfusion(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line, row in read_csv_rows(path, "MSR-VTT 1k-A test csv", ("video_id", "sentence")):
        vid, sentence = (row["video_id"] or "").strip(), (row["sentence"] or "").strip()
        if not vid or not sentence:
            raise AnnotationError(path, "empty video_id or sentence", line=line)
        pairs.append((vid, sentence))
    return pairs


def _sentences(path: Path) -> tuple[dict, list]:
    data = read_json(path, "MSR-VTT annotations (MSRVTT_data.json, needed for training)")
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise AnnotationError(path, "expected an object with a 'sentences' list")
    return data, data["sentences"]


def _read_sentences(path: Path, wanted: set[str]) -> list[tuple[str, str]]:
    """Every sentence of a wanted video, in JSON order (a set lookup: the reference's ``in list`` was
    quadratic, docs/reference.md §8.35)."""
    _, sentences = _sentences(path)
    pairs = []
    for i, item in enumerate(sentences):
        if not isinstance(item, dict):
            raise AnnotationError(path, "expected an object", entry=f"sentences[{i}]")
        vid, caption = item.get("video_id"), item.get("caption")
        if not isinstance(vid, str) or not isinstance(caption, str):
            raise AnnotationError(path, "needs string fields 'video_id' and 'caption'", entry=f"sentences[{i}]")
        if vid in wanted:
            pairs.append((vid, caption.strip()))
    return pairs


def _official_split(path: Path, name: str) -> set[str]:
    data, _ = _sentences(path)
    videos = data.get("videos")
    if not isinstance(videos, list):
        raise AnnotationError(path, "expected a 'videos' list (for the official splits)")
    wanted = set()
    for i, item in enumerate(videos):
        if not isinstance(item, dict) or not isinstance(item.get("video_id"), str):
            raise AnnotationError(path, "needs a string 'video_id'", entry=f"videos[{i}]")
        if item.get("split") == name:
            wanted.add(item["video_id"])
    if not wanted:
        raise AnnotationError(path, f"no video has split == {name!r}")
    return wanted


def _check_covered(csv_path: Path, wanted: set[str], pairs: list[tuple[str, str]]) -> None:
    without = wanted - {vid for vid, _ in pairs}
    if without:
        logger.warning(
            "%s: %d of %d listed videos have no caption in %s (e.g. %s); they are left out",
            csv_path, len(without), len(wanted), DATA_JSON, sorted(without)[:3],
        )
