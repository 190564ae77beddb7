"""Find the videos an index should hold: a folder scanned recursively, a text list or a CSV.

Every source resolves to absolute, symlink-free paths, so one file reached through two names is
indexed once and the index never stores a path that depends on the working directory.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp", ".ogv"}
)
# Column names tried, in order, when a CSV names its path column (MSR-VTT style files use ``video``).
_CSV_PATH_COLUMNS = ("path", "video_path", "file", "filename", "video")


@dataclass(frozen=True)
class FileState:
    """What decides whether an indexed file changed: its size and modification time.

    Attributes:
        size: bytes.
        mtime_ns: modification time in nanoseconds (``os.stat().st_mtime_ns``).
    """

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileState":
        st = os.stat(path)
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns)


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def scan_directory(root: Path) -> list[Path]:
    """Every video file below ``root`` (recursively; hidden folders skipped; symlinked folders not followed)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Hidden folders hold caches (.git, our own index's shards) and never the collection.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and is_video_file(path):
                found.append(path)
    return found


def read_list_file(list_path: Path, video_root: Path | None = None) -> list[Path]:
    """Paths from a ``.txt`` list (one per line, ``#`` comments) or a ``.csv`` with a path column.

    Relative entries are resolved against ``video_root`` (default: the list's folder, so a list
    travels with its videos). A CSV entry without a suffix (MSR-VTT's ``video1234``) gets ``.mp4``.
    """
    base = video_root if video_root is not None else list_path.parent
    entries: list[str] = []
    if list_path.suffix.lower() == ".csv":
        with open(list_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            column = next((c for c in _CSV_PATH_COLUMNS if c in fields), None)
            if column is None:
                raise ValueError(
                    f"{list_path}: no path column (looked for {', '.join(_CSV_PATH_COLUMNS)}; got {fields})"
                )
            entries = [row[column].strip() for row in reader if (row.get(column) or "").strip()]
        entries = [e if Path(e).suffix else f"{e}.mp4" for e in entries]
    else:
        for line in list_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line)
    return [Path(e) if Path(e).is_absolute() else base / e for e in entries]


def discover_videos(
    sources: str | os.PathLike | Sequence[str | os.PathLike], video_root: str | os.PathLike | None = None
) -> list[Path]:
    """Resolve video sources to a sorted, de-duplicated list of absolute file paths.

    Args:
        sources: one or more folders (scanned recursively), list files (``.txt``/``.csv``) or video
            files.
        video_root: folder that relative entries of list files are relative to (default: each
            list's own folder); annotation CSVs usually name videos relative to a video folder.

    Returns:
        Sorted absolute paths (symlinks resolved). Entries of a list that do not exist are skipped
        with a warning: a list that mentions a deleted file must not stop an index update.

    Raises:
        FileNotFoundError: a source itself does not exist.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    candidates: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            candidates.extend(scan_directory(path))
        elif path.is_file() and is_video_file(path):
            candidates.append(path)
        elif path.is_file():
            candidates.extend(read_list_file(path, Path(video_root) if video_root is not None else None))
        else:
            raise FileNotFoundError(f"video source not found: {path}")
    return _resolve_unique(candidates)


def _resolve_unique(paths: Iterable[Path]) -> list[Path]:
    unique: set[Path] = set()
    for path in paths:
        resolved = path.resolve()
        if resolved.is_file():
            unique.add(resolved)
        else:
            logger.warning("skipping missing video %s", path)
    return sorted(unique)
