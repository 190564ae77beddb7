"""The commands' answer on standard output (tables, summaries), kept apart from their log on stderr."""

from __future__ import annotations

import sys


def emit(text: str = "") -> None:
    """Write one line of a command's result to stdout (what a user pipes or reads; diagnostics go to logging)."""
    sys.stdout.write(text + "\n")
