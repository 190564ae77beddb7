"""Exceptions of the data pipeline; every one names the file (and the line or entry) it is about."""

from __future__ import annotations

import os
from pathlib import Path


class VideoDecodeError(RuntimeError):
    """A video cannot be used: missing, empty, truncated, audio-only, not a video, or undecodable.

    Attributes:
        path: the offending file.
        cause: a short human-readable reason (``"file not found"``, ``"no video stream"``...).
    """

    def __init__(self, path: str | os.PathLike, cause: str) -> None:
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

    def __reduce__(self):  # picklable across DataLoader workers (the default would call __init__(message))
        return (type(self), (str(self.path), self.cause))


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the line or entry.

    Attributes:
        path: the annotation file.
        line: 1-based line number for line-oriented formats (CSV, TSV, JSONL, id lists), else ``None``.
        entry: the offending key or list position for JSON/pickle formats, else ``None``.
    """

    def __init__(
        self, path: str | os.PathLike, message: str, *, line: int | None = None, entry: str | None = None
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.entry = entry
        self.reason = message
        where = f"{self.path}"
        if line is not None:
            where += f":{line}"
        if entry is not None:
            where += f" (entry {entry})"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return (_rebuild_annotation_error, (str(self.path), self.reason, self.line, self.entry))


def _rebuild_annotation_error(path: str, message: str, line: int | None, entry: str | None) -> AnnotationError:
    return AnnotationError(path, message, line=line, entry=entry)


class MissingVideosError(RuntimeError):
    """An evaluation set lost videos to ``on_error="skip"``; metrics over it would not be comparable.

    Attributes:
        missing: ids of the videos that were skipped.
        total: number of videos the split should have.
    """

    def __init__(self, missing: list[str], total: int) -> None:
        self.missing = list(missing)
        self.total = total
        shown = ", ".join(self.missing[:5]) + (", ..." if len(self.missing) > 5 else "")
        super().__init__(
            f"{len(self.missing)} of {total} test videos were skipped ({shown}); metrics over an incomplete "
            "test set are not comparable with published numbers. Fix the videos, or pass the explicit "
            "allow-missing flag to report metrics over the remaining videos."
        )

    def __reduce__(self):
        return (type(self), (self.missing, self.total))
