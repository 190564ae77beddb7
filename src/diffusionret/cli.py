"""The ``diffusionret`` command line: a thin dispatcher over ``diffusionret.commands.*``.

Each command module exposes ``register(subparsers)``, which adds its sub-parser and sets
``func(args) -> int`` as the handler. The CLI only parses arguments, configures logging and calls
library functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# Explicit list (no import-time scanning): the order is the order of ``--help``.
_COMMANDS = (
    "demo",
    "train",
    "eval",
    "extract",
    "convert",
    "preprocess",
    "data",
    "index",
    "search",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionret",
        description="Generative text-video retrieval (DiffusionRet): train, evaluate, re-rank and search videos.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"diffusionret.commands.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not part of this build
            if exc.name == f"diffusionret.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from diffusionret.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logging.getLogger("diffusionret").error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
