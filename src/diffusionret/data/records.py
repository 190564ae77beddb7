"""Plain records produced by the annotation readers, stable video keys and video-file lookup.

Readers only read annotations: they return :class:`VideoTextPair` records and never decode a video.
Finding a video file is the one filesystem touch they need, done by :class:`VideoLocator`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Extensions treated as videos when walking a folder (lower case, with the dot).
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".ogv"}
)


@dataclass(frozen=True)
class VideoTextPair:
    """One (video, text) sample.

    Attributes:
        video_id: the dataset's id of the video (e.g. ``"video7020"``, ``"v_QOlSCBRmfWY"``).
        caption: one caption, or for paragraph datasets (ActivityNet, DiDeMo) all captions of the video
            joined with single spaces.
        video_path: where the video file is expected; the file may be missing (the dataset's
            ``on_error`` policy and ``diffusionret data check`` deal with that).
        start: start of the clip in seconds from the start of the video, ``None`` for the beginning.
        end: end of the clip in seconds, ``None`` for the end of the video.
    """

    video_id: str
    caption: str
    video_path: Path
    start: float | None = None
    end: float | None = None

    def __post_init__(self) -> None:
        if self.start is not None and self.start < 0:
            raise ValueError(f"{self.video_id}: start must be >= 0, got {self.start}")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"{self.video_id}: end {self.end} is before start {self.start}")


def video_key(video_id: str) -> int:
    """A stable signed 64-bit key of a video id, equal in every process and on every rank.

    The reference used Python's ``hash(str)``, which is randomised per process, so the same video got
    different ids on different ranks (docs/reference.md §8.4). blake2b does not depend on ``PYTHONHASHSEED``.
    """
    digest = hashlib.blake2b(video_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class VideoLocator:
    """Finds video files by id under a root folder (recursive), as the reference's ``os.walk`` did.

    The folder is walked once, lazily; both the file stem (name minus its last extension, so
    ``X.mov.mp4`` is found as ``X.mov``) and the full file name are indexed. When an id has no file,
    :meth:`find` returns ``root/<id><default_ext>`` (which does not exist) so that the problem is reported
    later with the path the user would expect.
    """

    def __init__(self, root: str | os.PathLike, default_ext: str = ".mp4") -> None:
        self.root = Path(root)
        self.default_ext = default_ext
        self._index: dict[str, Path] | None = None

    def _build(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        duplicates = 0
        if not self.root.is_dir():
            logger.warning("video folder %s does not exist; every video will be reported missing", self.root)
            return index
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()  # deterministic choice between duplicates
            for name in sorted(filenames):
                if name.startswith("."):  # hidden files and our own partial outputs
                    continue
                path = Path(dirpath) / name
                if path.suffix.lower() not in VIDEO_EXTENSIONS:
                    continue
                for key in (path.stem, name):
                    if key in index and index[key] != path:
                        duplicates += 1
                        continue
                    index[key] = path
        if duplicates:
            logger.warning("%s: %d video names occur more than once; using the first in sorted order", self.root,
                           duplicates)
        return index

    def find(self, video_id: str) -> Path:
        """Path of the video ``video_id`` (an existing file when there is one)."""
        direct = self.root / f"{video_id}{self.default_ext}"
        if self._index is None:
            # Fast path: the common layout root/<id>.mp4 needs no walk at all.
            if direct.is_file():
                return direct
            self._index = self._build()
        return self._index.get(video_id, direct)

    def exists(self, video_id: str) -> bool:
        return self.find(video_id).is_file()
