"""``diffusionret preprocess``: re-encode videos to a low frame rate and short side (docs/reference.md §6)."""

from __future__ import annotations

import argparse
import logging

from diffusionret.commands._common import emit

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="re-encode videos to 3 fps / short side 224 (resumable, parallel)",
        description="Re-encode every video under INPUT into OUTPUT (same folder tree, H.264 .mp4, audio "
        "dropped): FPS frames per second, shorter side SHORT_SIDE pixels (portrait videos too), rotation "
        "metadata applied. Finished outputs are skipped, so an interrupted run can simply be restarted.",
    )
    parser.add_argument("input", help="folder of source videos (searched recursively)")
    parser.add_argument("output", help="output folder")
    parser.add_argument("--fps", type=float, default=3.0, help="output frame rate (default: 3, as the reference)")
    parser.add_argument("--short-side", type=int, default=224, help="output short side in pixels (default: 224)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPU count)")
    parser.add_argument("--crf", type=int, default=23, help="x264 quality, lower is better (default: 23)")
    parser.add_argument("--preset", default="veryfast", help="x264 speed preset (default: veryfast)")
    parser.add_argument("--overwrite", action="store_true", help="re-encode even when a valid output exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusionret.data.preprocess import preprocess_videos

    try:
        report = preprocess_videos(
            args.input,
            args.output,
            fps=args.fps,
            short_side=args.short_side,
            workers=args.workers,
            crf=args.crf,
            preset=args.preset,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    emit(f"{report.total} videos: {len(report.done)} encoded, {len(report.skipped)} already done, "
          f"{len(report.failed)} failed")
    if report.failed:
        emit("failures:")
        for result in sorted(report.failed, key=lambda r: r.source):
            emit(f"  {result.source}: {result.error}")
        return 1
    return 0
