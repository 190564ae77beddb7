"""Serve an index that changes on disk: swap in a freshly loaded searcher after ``index update``.

The server holds the index in memory, so an ``index update`` (new, changed or deleted videos) would
otherwise only show after a restart. :class:`ReloadingBackend` watches the index's commit marker
(:data:`~diffusionret.index.catalog.COMMIT_NAME`), which a build or update replaces as its very last
step, after every catalogue write and the ANN file: so the server reloads once per finished update,
never after each shard of a long one, and always finds the ANN file of what it loads. It watches
that file only: reading the index (SQLite creates ``-wal``/``-shm`` files even for read-only
connections) cannot trigger a reload. The new searcher is loaded on a background thread and swapped
in; searches keep running on the old one meanwhile. A reload that fails (a corrupted shard, a model
that no longer matches) is logged, the old searcher keeps serving, and the reload is tried again
with exponential backoff. While the two overlap, both indexes are in memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from diffusionret.index.catalog import COMMIT_NAME
from diffusionret.index.searcher import SearchHit

logger = logging.getLogger(__name__)

# Longest wait between two tries of a reload that keeps failing.
MAX_RETRY_S = 300.0


def commit_signature(root: str | os.PathLike) -> str | None:
    """The contents of the index's commit marker (``None`` when there is none): changes once per finished update."""
    try:
        return (Path(root) / COMMIT_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


class ReloadingBackend:
    """A search backend (see :class:`diffusionret.serve.app.SearchBackend`) that follows its index on disk.

    Args:
        root: the index folder.
        open_searcher: loads a searcher for ``root`` (model + index); called once here, then on changes.
        poll_s: how often to look at the commit marker; also the first retry delay of a failed reload.
        settle_s: the least time between two reloads (an update loop committing every second does
            not make the server reload every second).
        start: start the watcher thread (tests drive :meth:`poll` by hand with ``start=False``).
        clock: monotonic seconds.
        max_retry_s: the longest retry delay (the delay doubles after each failed try).
    """

    def __init__(self, root: str | os.PathLike, open_searcher: Callable[[], Any], *, poll_s: float = 5.0,
                 settle_s: float = 0.0, start: bool = True, clock: Callable[[], float] = time.monotonic,
                 max_retry_s: float = MAX_RETRY_S) -> None:
        if poll_s <= 0 or settle_s < 0 or max_retry_s <= 0:
            raise ValueError(f"poll_s and max_retry_s must be positive and settle_s >= 0, got {poll_s}, "
                             f"{max_retry_s}, {settle_s}")
        self.root = Path(root)
        self._open = open_searcher
        self._poll_s, self._settle_s, self._max_retry_s, self._clock = poll_s, settle_s, max_retry_s, clock
        self._loaded = commit_signature(self.root)  # read before loading: a commit during the load is seen
        self._current = open_searcher()
        self._reloaded_at = clock()
        self._failures = 0
        self._retry_at = 0.0
        self._failed: str | None = None  # the marker whose reload failed
        self.reloads = 0
        self.failed_reloads = 0
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

    def search_batch(self, queries: Sequence[str], k: int | Sequence[int] = 10) -> list[Sequence[SearchHit]]:
        """A batch of searches, all on one searcher (a reload meanwhile does not split the batch)."""
        current = self._current
        batch = getattr(current, "search_batch", None)
        if batch is not None:
            return batch(queries, k)
        ks = [k] * len(queries) if isinstance(k, int) else list(k)
        return [current.search(q, n) for q, n in zip(queries, ks, strict=True)]

    def describe(self) -> dict[str, Any]:
        return {**self._current.describe(), "reloads": self.reloads, "failed_reloads": self.failed_reloads}

    # --------------------------------------------------------------------------- watching
    def poll(self) -> bool:
        """Look at the commit marker once; reload when it changed. Returns whether it reloaded."""
        signature, now = commit_signature(self.root), self._clock()
        if signature == self._loaded:
            return False
        if (signature == self._failed and now < self._retry_at) or now - self._reloaded_at < self._settle_s:
            return False  # backing off (a newer commit is tried at once), or reloaded moments ago
        try:
            fresh = self._open()
        except Exception:  # keep serving what we have, and try again later
            self._failures += 1
            self.failed_reloads += 1
            delay = min(self._max_retry_s, self._poll_s * 2 ** (self._failures - 1))
            self._retry_at, self._failed = now + delay, signature
            logger.exception("reloading the index at %s failed (try %d); still serving the previous one, "
                             "trying again in %.0f s", self.root, self._failures, delay)
            return False
        # One reference assignment: a search in flight finishes on the searcher it started with.
        self._current, self._loaded = fresh, signature
        self._reloaded_at, self._failures, self._retry_at, self._failed = now, 0, 0.0, None
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
