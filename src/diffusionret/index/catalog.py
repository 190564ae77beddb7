"""The index catalogue: one SQLite file with the index settings, the videos, their segments and the shards.

A video indexed whole has one feature row, named by its ``videos`` entry (``shard``, ``row``); a
video indexed in segments has one row per segment, listed in ``segments`` (its ``videos`` entry
then names its first segment's row). A catalogue without a ``segments`` table (built before
segments existed) or without rows for a video means: one whole-video segment, as before. Writers
add the table when they open an older catalogue (``CREATE TABLE IF NOT EXISTS``), which leaves it valid.

SQLite gives atomic multi-row commits, so "register a shard" (insert its videos, replace older
entries of the same files, record the shard) is a single transaction: a build killed at any
moment leaves either all of a shard's rows or none. WAL mode lets ``serve`` read while ``index
update`` writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

CATALOG_NAME = "catalog.sqlite"
FORMAT_VERSION = 1
# Replaced atomically by a build or update as its very last step (after the ANN file): readers that
# follow the index (``serve``) reload when it changes, never in the middle of an update.
COMMIT_NAME = "COMMITTED"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY,
    num_rows INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    retired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    duration REAL,
    width INTEGER,
    height INTEGER,
    num_frames INTEGER NOT NULL,
    shard TEXT NOT NULL REFERENCES shards(name),
    row INTEGER NOT NULL,
    thumbnail BLOB,
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS videos_by_shard ON videos(shard);
CREATE TABLE IF NOT EXISTS segments (
    video_id TEXT NOT NULL,
    start_s REAL NOT NULL,
    end_s REAL NOT NULL,
    shard TEXT NOT NULL REFERENCES shards(name),
    row INTEGER NOT NULL,
    PRIMARY KEY (video_id, start_s)
);
CREATE INDEX IF NOT EXISTS segments_by_shard ON segments(shard);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    error TEXT NOT NULL
);
"""

_RECORD_COLUMNS = "id, path, size, mtime_ns, duration, width, height, num_frames, shard, row"


@dataclass(frozen=True)
class VideoRecord:
    """One indexed video as the catalogue knows it.

    Attributes:
        id: stable 16-hex-digit id derived from the path (see :func:`video_id`).
        path: absolute path of the file.
        size, mtime_ns: the file state when it was encoded.
        duration: seconds, if known.
        width, height: frame size, if known.
        num_frames: real (unpadded) frames that were encoded.
        shard, row: where the features live.
        start, end: the segment (seconds) this row holds, for a row of :func:`list_rows` of a video
            indexed in segments; ``None`` for a video indexed whole (its span is ``[0, duration]``).
    """

    id: str
    path: str
    size: int
    mtime_ns: int
    duration: float | None
    width: int | None
    height: int | None
    num_frames: int
    shard: str
    row: int
    start: float | None = None
    end: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The public, JSON-ready view (no storage location)."""
        return {
            "id": self.id,
            "path": self.path,
            "name": Path(self.path).name,
            "size": self.size,
            "mtime": self.mtime_ns / 1e9,
            "duration": self.duration,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
        }


def video_id(path: str) -> str:
    """The stable public id of a video: 16 hex digits of sha256 of its absolute path.

    Derived from the path (not an autoincrement), so ids do not depend on build order, resumption
    or the number of torchrun ranks, and URLs stay valid across ``index update``.
    """
    return hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]


def connect(root: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the catalogue of the index at ``root`` (created when writable and missing).

    Raises:
        FileNotFoundError: ``readonly`` and there is no catalogue.
    """
    path = Path(root) / CATALOG_NAME
    if readonly:
        if not path.is_file():
            raise FileNotFoundError(f"no index at {root} (missing {CATALOG_NAME})")
        # as_uri() percent-encodes "?", "#" and "%", which would otherwise end or garble the file name.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0,
                               check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned is on disk, so a registered shard survives a power cut.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
    return conn


def read_info(conn: sqlite3.Connection) -> dict[str, Any]:
    """The ``info`` table as a dict of JSON-decoded values (empty for a fresh catalogue)."""
    return {key: json.loads(value) for key, value in conn.execute("SELECT key, value FROM info")}


def write_info(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    with conn:
        conn.executemany(
            "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
            [(key, json.dumps(value, sort_keys=True)) for key, value in values.items()],
        )


def list_records(conn: sqlite3.Connection) -> list[VideoRecord]:
    """All videos, sorted by path (the row order of a loaded index)."""
    rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM videos ORDER BY path")
    return [VideoRecord(*row) for row in rows]


def has_segments_table(conn: sqlite3.Connection) -> bool:
    """Whether the catalogue has a ``segments`` table (a read-only catalogue from before segments may not)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'segments'").fetchone() is not None


def list_rows(conn: sqlite3.Connection) -> list[VideoRecord]:
    """One record per feature row, sorted by path then segment start (the row order of a loaded index).

    A video indexed whole gives its record as :func:`list_records` does; a video indexed in segments
    gives one copy per segment with ``start``/``end``/``shard``/``row`` of that segment.
    """
    records = list_records(conn)
    if not has_segments_table(conn):
        return records
    spans: dict[str, list[tuple[float, float, str, int]]] = {}
    query = "SELECT video_id, start_s, end_s, shard, row FROM segments ORDER BY video_id, start_s"
    for vid, start, end, shard, row in conn.execute(query):
        spans.setdefault(vid, []).append((start, end, shard, row))
    rows: list[VideoRecord] = []
    for record in records:
        segments = spans.get(record.id)
        if not segments:
            rows.append(record)
            continue
        rows.extend(dataclasses.replace(record, start=start, end=end, shard=shard, row=row)
                    for start, end, shard, row in segments)
    return rows


def count_segments(conn: sqlite3.Connection) -> int:
    """Feature rows of the index: one per video indexed whole, one per segment of the others."""
    if not has_segments_table(conn):
        return count_videos(conn)
    return conn.execute(
        "SELECT (SELECT COUNT(*) FROM videos WHERE id NOT IN (SELECT video_id FROM segments))"
        " + (SELECT COUNT(*) FROM segments WHERE video_id IN (SELECT id FROM videos))").fetchone()[0]


def file_states(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` for every indexed video."""
    return {path: (size, mtime) for path, size, mtime in conn.execute("SELECT path, size, mtime_ns FROM videos")}


def failure_states(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` for every file that failed to decode."""
    return {path: (size, mtime) for path, size, mtime in conn.execute("SELECT path, size, mtime_ns FROM failures")}


def failure_errors(conn: sqlite3.Connection) -> dict[str, str]:
    """``path -> error`` for every file that failed to decode."""
    return dict(conn.execute("SELECT path, error FROM failures"))


def list_failures(conn: sqlite3.Connection) -> list[tuple[str, int, int, str]]:
    """``(path, size, mtime_ns, error)`` of every file that failed to decode, sorted by path."""
    return list(conn.execute("SELECT path, size, mtime_ns, error FROM failures ORDER BY path"))


def shard_names(conn: sqlite3.Connection) -> set[str]:
    """Every shard the catalogue knows, retired ones included (anything else on disk is an orphan)."""
    return {name for (name,) in conn.execute("SELECT name FROM shards")}


def retired_shards(conn: sqlite3.Connection) -> list[str]:
    return [name for (name,) in conn.execute("SELECT name FROM shards WHERE retired = 1 ORDER BY name")]


def retire_shards(conn: sqlite3.Connection, names: Sequence[str]) -> None:
    """Mark shards whose rows are all dead; they stay listed until their file is gone.

    Keeping the name is what stops crash recovery from mistaking a not-yet-deleted file for an
    unregistered shard and resurrecting its stale rows.
    """
    with conn:
        conn.executemany("UPDATE shards SET retired = 1 WHERE name = ?", [(n,) for n in names])


def forget_shards(conn: sqlite3.Connection, names: Sequence[str]) -> None:
    """Drop retired shards from the catalogue once their files are deleted."""
    with conn:
        conn.executemany("DELETE FROM shards WHERE name = ? AND retired = 1", [(n,) for n in names])


def thumbnail(conn: sqlite3.Connection, video_id: str) -> bytes | None:
    row = conn.execute("SELECT thumbnail FROM videos WHERE id = ?", (video_id,)).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def register_shard(
    conn: sqlite3.Connection,
    name: str,
    created_ns: int,
    records: Sequence[VideoRecord],
    thumbnails: Sequence[bytes | None],
    failures: Iterable[tuple[str, int, int, str]],
    *,
    num_rows: int | None = None,
    segments: Sequence[tuple[str, float, float, int]] = (),
) -> None:
    """Record a shard, its videos and their segments in one transaction.

    A video already indexed under the same path (a changed file re-encoded) is replaced, so a path
    is never listed twice; its old features (and old segments) become dead rows of the old shard
    (see compaction).

    Args:
        records: one per video (a segmented video's record names its first segment's row).
        num_rows: feature rows in the shard (default: one per record).
        segments: ``(video id, start, end, row)`` of every segment row (none for videos indexed whole).
    """
    now = time.time()
    with conn:
        conn.execute("INSERT INTO shards (name, num_rows, created_ns) VALUES (?, ?, ?)",
                     (name, len(records) if num_rows is None else num_rows, created_ns))
        conn.executemany("DELETE FROM segments WHERE video_id = ?", [(r.id,) for r in records])
        conn.executemany("INSERT INTO segments (video_id, start_s, end_s, shard, row) VALUES (?, ?, ?, ?, ?)",
                         [(vid, start, end, name, row) for vid, start, end, row in segments])
        conn.executemany(
            "INSERT OR REPLACE INTO videos (id, path, size, mtime_ns, duration, width, height, num_frames, shard, row,"
            " thumbnail, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (r.id, r.path, r.size, r.mtime_ns, r.duration, r.width, r.height, r.num_frames, name, r.row,
                 thumb, now)
                for r, thumb in zip(records, thumbnails, strict=True)
            ],
        )
        conn.executemany("DELETE FROM failures WHERE path = ?", [(r.path,) for r in records])
        failures = list(failures)
        # A changed file that no longer decodes loses its stale features along with its old state.
        conn.executemany("DELETE FROM videos WHERE path = ?", [(f[0],) for f in failures])
        conn.executemany("DELETE FROM segments WHERE video_id = ?", [(video_id(f[0]),) for f in failures])
        conn.executemany("INSERT OR REPLACE INTO failures (path, size, mtime_ns, error) VALUES (?, ?, ?, ?)", failures)


def remove_paths(conn: sqlite3.Connection, paths: Iterable[str]) -> int:
    """Drop videos (and failure notes) by path in one transaction; returns the number of videos removed."""
    paths = list(paths)
    with conn:
        before = conn.total_changes
        conn.executemany("DELETE FROM videos WHERE path = ?", [(p,) for p in paths])
        removed = conn.total_changes - before
        conn.executemany("DELETE FROM segments WHERE video_id = ?", [(video_id(p),) for p in paths])
        conn.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])
    return removed


def live_rows(conn: sqlite3.Connection) -> dict[str, int]:
    """``shard -> number of rows still referenced by a video`` (0 for fully dead shards)."""
    counts = {name: 0 for (name,) in conn.execute("SELECT name FROM shards WHERE retired = 0")}
    if not has_segments_table(conn):
        for name, count in conn.execute("SELECT shard, COUNT(*) FROM videos GROUP BY shard"):
            counts[name] = count
        return counts
    # A segmented video's rows are its segments (its videos entry only repeats the first one).
    whole = "SELECT shard, COUNT(*) FROM videos WHERE id NOT IN (SELECT video_id FROM segments) GROUP BY shard"
    for name, count in conn.execute(whole):
        counts[name] = counts.get(name, 0) + count
    for name, count in conn.execute("SELECT shard, COUNT(*) FROM segments GROUP BY shard"):
        counts[name] = counts.get(name, 0) + count
    return counts


def shard_sizes(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT name, num_rows FROM shards WHERE retired = 0"))


def move_rows(conn: sqlite3.Connection, new_shard: str, new_rows: int, created_ns: int,
              moves: Sequence[tuple[str, int]], segment_moves: Sequence[tuple[str, float, int]] = ()) -> None:
    """Register a rewritten shard and point its videos and segments at it, atomically.

    Args:
        new_shard: name of the freshly written shard.
        new_rows: rows in it.
        created_ns: its creation time.
        moves: ``(video id, new row)`` for every video it holds (a segmented video: its first segment).
        segment_moves: ``(video id, segment start, new row)`` for every segment row it holds.
    """
    with conn:
        conn.execute("INSERT INTO shards (name, num_rows, created_ns) VALUES (?, ?, ?)",
                     (new_shard, new_rows, created_ns))
        conn.executemany("UPDATE videos SET shard = ?, row = ? WHERE id = ?",
                         [(new_shard, row, vid) for vid, row in moves])
        conn.executemany("UPDATE segments SET shard = ?, row = ? WHERE video_id = ? AND start_s = ?",
                         [(new_shard, row, vid, start) for vid, start, row in segment_moves])


def count_videos(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM videos").fetchone()[0]


def count_failures(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0]


def read_commit_marker(root: str | Path) -> dict[str, Any] | None:
    """The commit marker of the index at ``root`` (``None``: no finished build or update recorded one).

    It holds ``generation`` (incremented by every run that changed the index), ``fingerprint`` (the
    content fingerprint of the committed rows), ``ann`` (the ANN files of that content) and ``videos``.
    """
    try:
        text = (Path(root) / COMMIT_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        return None
    return marker if isinstance(marker, dict) else None
