"""``diffusionret eval --checkpoint CKPT --config FILE [key=value ...]``: retrieval metrics of a checkpoint.

Encodes every caption and every unique video of the split (batched, with progress bars), computes
the WTI matrix in bounded-memory chunks, re-ranks the top-K candidates with the diffusion denoisers
(unless ``--no-rerank`` or the model has none), prints the metrics table for both directions and
writes it as JSON. Re-ranking noise is seeded (``eval.seed``), so two runs give the same numbers.
``--features FILE`` caches the encoded split and re-uses it on the next run (see ``diffusionret
extract``). Runs under ``torchrun`` too (sharded encoding and re-ranking).

CKPT: a trainer checkpoint (``checkpoints/last.pt``), a run folder or ``model.safetensors``, or an
official DiffusionRet ``best.pth``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffusionret.commands._common import add_checkpoint_arguments, emit, load_config, start_distributed

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint (metrics table + JSON)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--no-rerank", action="store_true", help="WTI ranking only (no diffusion re-ranking)")
    parser.add_argument("--features", metavar="FILE",
                        help="feature cache: re-used when it exists and matches, written otherwise")
    parser.add_argument("--allow-missing", action="store_true",
                        help="report metrics although some videos of the split could not be read")
    parser.add_argument("--output", metavar="JSON", help="metrics file (default: <output_dir>/eval_<split>.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusionret.data.errors import MissingVideosError, VideoDecodeError
    from diffusionret.evaluation.evaluate import evaluate, results_table
    from diffusionret.distributed import destroy_distributed

    cfg = load_config(args)
    if cfg is None:
        return 2
    split = args.split or cfg.eval.split
    output = Path(args.output) if args.output else Path(cfg.output_dir) / f"eval_{split}.json"
    ctx = start_distributed(cfg)
    try:
        results = evaluate(cfg, args.checkpoint, split=split, dist=ctx, features=args.features,
                           rerank=False if args.no_rerank else None,
                           allow_missing=True if args.allow_missing else None, use_ema=args.ema, output=output)
    except MissingVideosError as exc:
        logger.error("%s", exc)
        return 1
    except VideoDecodeError as exc:
        logger.error("%s (set data.on_error=skip to leave unreadable videos out, then --allow-missing to report "
                     "metrics without them)", exc)
        return 1
    finally:
        destroy_distributed(ctx)
    if ctx.is_main:
        missing = results.get("num_missing_videos", 0)
        emit(f"{results['split']}: {results['num_captions']} captions, {results['num_videos']} videos"
              + (f" ({missing} missing)" if missing else ""))
        emit(results_table(results))
        emit(f"metrics: {output}")
    return 0
