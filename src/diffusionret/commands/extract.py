"""``diffusionret extract --checkpoint CKPT --config FILE --output FEATURES``: encode a split and cache it.

Writes one ``.safetensors`` file with the word/sentence features of every caption and the frame
features of every unique video, plus their provenance (model fingerprint, data settings). ``diffusionret
eval --features FEATURES`` re-uses it instead of decoding and encoding again.
"""

from __future__ import annotations

import argparse
import logging

from diffusionret.commands._common import add_checkpoint_arguments, emit, load_config, start_distributed

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("extract", help="encode a split and cache its features", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--output", required=True, metavar="FILE", help="features file (.safetensors)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusionret.evaluation.evaluate import extract_features
    from diffusionret.distributed import destroy_distributed

    cfg = load_config(args)
    if cfg is None:
        return 2
    ctx = start_distributed(cfg)
    try:
        feats = extract_features(cfg, args.checkpoint, split=args.split, output=args.output, dist=ctx,
                                 use_ema=args.ema)
    finally:
        destroy_distributed(ctx)
    if ctx.is_main:
        missing = len(feats.missing_video_ids)
        emit(f"{feats.num_captions} captions, {feats.num_videos} videos"
              + (f" ({missing} missing)" if missing else "") + f" -> {args.output}")
    return 0
