"""Serve an index that changes on disk: swap in a freshly loaded searcher after ``index update``.

The server holds the index in memory, so an ``index update`` (new, changed or deleted videos) would
otherwise only show after a restart. :class:`ReloadingBackend` watches the index's catalogue and,
once it has stopped changing for ``settle_s`` (an update commits shard by shard; reloading after
every shard would waste work), loads a new searcher on a background thread and swaps it in. Searches
keep running on the old one meanwhile, and a reload that fails (a half-written index, a model that
no longer matches) is logged and leaves the old searcher serving. While the two overlap, both
indexes are in memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from diffusionret.index.catalog import CATALOG_NAME
from diffusionret.index.searcher import SearchHit

logger = logging.getLogger(__name__)

Signature = tuple[tuple[int, int], ...]


def catalog_signature(root: str | os.PathLike) -> Signature:
    """(mtime_ns, size) of the catalogue and its write-ahead log: changes with every committed write.

    SQLite in WAL mode appends commits to ``-wal`` and folds them into the main file at checkpoints,
    so between them the two files see every commit; a missing file reads as (0, 0).
    """
    parts = []
    for name in (CATALOG_NAME, CATALOG_NAME + "-wal"):
        try:
            stat = os.stat(Path(root) / name)
        except FileNotFoundError:
            parts.append((0, 0))
        else:
            parts.append((stat.st_mtime_ns, stat.st_size))
    return tuple(parts)


class ReloadingBackend:
    """A search backend (see :class:`diffusionret.serve.app.SearchBackend`) that follows its index on disk.

    Args:
        root: the index folder.
        open_searcher: loads a searcher for ``root`` (model + index); called once here, then on changes.
        poll_s: how often to look at the catalogue.
        settle_s: how long the catalogue must stay unchanged before a reload starts.
        start: start the watcher thread (tests drive :meth:`poll` by hand with ``start=False``).
    """

    def __init__(self, root: str | os.PathLike, open_searcher: Callable[[], Any], *, poll_s: float = 5.0,
                 settle_s: float = 5.0, start: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        if poll_s <= 0 or settle_s < 0:
            raise ValueError(f"poll_s must be positive and settle_s >= 0, got {poll_s}, {settle_s}")
        self.root = Path(root)
        self._open = open_searcher
        self._poll_s, self._settle_s, self._clock = poll_s, settle_s, clock
        self._loaded = catalog_signature(self.root)  # read before loading: a write during the load is seen
        self._current = open_searcher()
        self._seen, self._seen_at = self._loaded, clock()
        self.reloads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="index-reloader", daemon=True)
            self._thread.start()

    # --------------------------------------------------------------------- the backend protocol
    @property
    def index(self) -> Any:
        return self._current.index

    def search(self, query: str, k: int = 10) -> Sequence[SearchHit]:
        return self._current.search(query, k)

    def describe(self) -> dict[str, Any]:
        return {**self._current.describe(), "reloads": self.reloads}

    # --------------------------------------------------------------------------- watching
    def poll(self) -> bool:
        """Look at the catalogue once; reload when it changed and has settled. Returns whether it reloaded."""
        signature, now = catalog_signature(self.root), self._clock()
        if signature != self._seen:
            self._seen, self._seen_at = signature, now
        if signature == self._loaded or now - self._seen_at < self._settle_s:
            return False
        try:
            fresh = self._open()
        except Exception:  # keep serving what we have; the next change triggers another try
            logger.exception("reloading the index at %s failed; still serving the previous one", self.root)
            self._loaded = signature
            return False
        # One reference assignment: a search in flight finishes on the searcher it started with.
        self._current, self._loaded = fresh, signature
        self.reloads += 1
        logger.info("index %s changed on disk: reloaded, %d videos", self.root, len(fresh.index))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.poll()

    def close(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
