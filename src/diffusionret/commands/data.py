"""``diffusionret data check CONFIG``: counts, missing/undecodable videos and durations of a dataset."""

from __future__ import annotations

import argparse
import json
import logging

from diffusionret.commands._common import emit

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect datasets", description="Dataset tools.")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check",
        help="report counts, missing/undecodable videos and durations",
        description="Read every split of the dataset described by CONFIG (a run config with a 'data:' "
        "section, or a bare data config) and probe each video, before anyone spends GPU hours. "
        "Exit status 1 when videos are missing or undecodable or annotations cannot be read.",
    )
    check.add_argument("config", help="YAML file")
    check.add_argument("overrides", nargs="*", help="key=value overrides of the data config (e.g. video_path=/data/v)")
    check.add_argument("--split", action="append", dest="splits", metavar="SPLIT",
                       help="split to check: train, val, test or a reader split name (repeatable; default: all)")
    check.add_argument("--deep", action="store_true",
                       help="decode the frames training would use (slower; catches truncated files)")
    check.add_argument("--workers", type=int, default=4, help="threads probing videos (default: 4)")
    check.add_argument("--json", dest="json_path", help="also write the report as JSON to this file")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(func=run_check)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_check(args: argparse.Namespace) -> int:
    from diffusionret.config_utils import ConfigError, atomic_write_text
    from diffusionret.data.check import check_data, format_report
    from diffusionret.data.config import load_data_config

    try:
        cfg = load_data_config(args.config, args.overrides)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    report = check_data(cfg, args.splits, workers=args.workers, deep=args.deep, progress=not args.no_progress)
    emit(format_report(report))
    if args.json_path:
        atomic_write_text(args.json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1
