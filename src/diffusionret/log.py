"""Logging set-up used by the CLI only; library modules just call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int | str = logging.INFO, rank: int | None = None) -> None:
    """Configure the root logger once: one stream handler, rank-0 only output under torchrun.

    Args:
        level: logging level for rank 0 (other ranks log warnings and above).
        rank: process rank; read from ``$RANK`` when ``None`` (the launcher sets it).
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and os.environ.get("WORLD_SIZE") != "1" else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(logging.WARNING, level))
