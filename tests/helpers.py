"""Small helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """``cli.main`` installs its own root log handler; put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def require_faiss():
    """FAISS, which the ``test`` extra installs: the tests that need it fail, never skip, where it is missing."""
    import faiss

    return faiss
