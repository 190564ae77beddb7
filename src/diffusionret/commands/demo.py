"""``diffusionret demo``: the whole method offline on a CPU in a few minutes.

Writes a synthetic corpus of mp4 clips (coloured shapes moving on plain backgrounds, captioned in
varied words), trains a tiny model from scratch (stage 1, then stage 2: the training split encoded
once by the frozen encoders, the denoisers trained on those cached features) through the same code as
``diffusionret train``, evaluates the held-out test split with and without diffusion re-ranking,
saves ``metrics.json`` and plots, and answers an example text query over the test videos.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from diffusionret.commands._common import emit

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo on synthetic videos (CPU, a few minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("diffusionret-demo"),
                        help="output folder (default: ./diffusionret-demo); must not hold a previous run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and the run (default: 0)")
    parser.add_argument("--num-videos", type=int, default=None,
                        help="clips in the corpus, a quarter of them held out for testing "
                             "(default: 1000 = 750 train + 250 test; --quick: 200)")
    parser.add_argument("--quick", action="store_true", help="a small corpus and short training (tests, ~1 min)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads to use (default: 2): with two or more, one process decodes videos "
                             "while the others train")
    parser.add_argument("--query", default=None,
                        help="the example text query (default: a fresh description of a random test clip)")
    parser.add_argument("--stage2-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="train stage 2 from cached features: encode the training split once, then as many "
                             "denoiser steps as fit into the time of the online stage 2 (default); "
                             "--no-stage2-cache encodes every step, the reference's way")
    parser.add_argument("--stage2-epochs", type=int, default=None,
                        help="stage-2 epochs (default: 55 from the cache, 3 with --no-stage2-cache; "
                             "--quick: 20 and 2)")
    parser.add_argument("--stage2-negatives", choices=("batch", "dataset"), default="batch",
                        help="hard negatives from the batch (default) or the whole training split "
                             "(needs the cache: not with --no-stage2-cache)")
    parser.set_defaults(func=run)


def _demo_config(args: argparse.Namespace) -> Any:
    import dataclasses

    from diffusionret.demo.pipeline import DemoConfig

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    # One decoding worker beside the training threads: on a small machine, torch threads that share
    # their cores with a decoder spin-wait on each other, which costs far more than it gains.
    changes: dict[str, Any] = {"seed": args.seed, "query": args.query, "num_workers": 1 if args.threads >= 2 else 0}
    cache = cfg.stage2_cache if args.stage2_cache is None else args.stage2_cache
    changes["stage2_cache"] = cache
    changes["stage2_negatives"] = args.stage2_negatives
    if args.stage2_epochs is not None:
        changes["stage2_cached_epochs" if cache else "stage2_epochs"] = args.stage2_epochs
    if args.num_videos is not None:
        if args.num_videos < 8:
            raise ValueError(f"--num-videos must be at least 8, got {args.num_videos}")
        num_test = max(2, args.num_videos // 4)
        changes["corpus"] = dataclasses.replace(cfg.corpus, num_train=args.num_videos - num_test, num_test=num_test)
    return dataclasses.replace(cfg, **changes)


def _print_report(result: Any) -> None:
    from diffusionret.evaluation.metrics import format_table

    test = result.metrics["test"]
    n = test["num_test_videos"]
    emit()
    emit(f"Test split: {n} videos, {test['num_test_captions']} captions (chance R@1 = {test['chance_R1']:.2f}%)")
    emit()
    emit("Without re-ranking (WTI similarity, stage 1):")
    emit(format_table(test["wti"]))
    if "rerank" in test:
        emit()
        emit("With diffusion re-ranking (stage 2):")
        emit(format_table(test["rerank"]))
        emit()
        for direction, name in (("t2v", "text->video"), ("v2t", "video->text")):
            delta = test["rerank_effect"][f"{direction}/R1"]
            verdict = "helps" if delta > 0 else "hurts" if delta < 0 else "does not change"
            emit(f"Re-ranking {verdict} {name} R@1 here: {test['wti'][direction]['R1']:.1f} -> "
                  f"{test['rerank'][direction]['R1']:.1f} ({delta:+.1f} points)")
    answer = result.answer
    emit()
    emit(f"Example query: {answer.query!r}")
    if answer.target is not None:
        found = "found at rank" if answer.target_rank == 1 else "ranked"
        emit(f"  written for {answer.target}.mp4; {found} {answer.target_rank} "
              f"(rank {answer.target_wti_rank} before re-ranking)")
    for hit in answer.hits:
        mark = "  <- target" if answer.target is not None and Path(hit.video_id).stem == answer.target else ""
        emit(f"  {hit.rank}. {Path(hit.video_id).name:<16} score {hit.score:7.3f}   (WTI {hit.wti_score:6.3f}, "
              f"WTI rank {hit.wti_rank}){mark}")
    moment = result.moment
    if moment is not None:
        from diffusionret.demo.moment_query import mmss

        emit()
        emit(f"Long-video query: {moment.query!r}")
        emit(f"  in {moment.video.name} ({mmss(moment.duration)} long, indexed as {moment.windows} overlapping windows): found the moment "
             f"{mmss(moment.start)}-{mmss(moment.end)}; the described clip is at "
             f"{mmss(moment.truth_start)}-{mmss(moment.truth_end)} (IoU {moment.iou:.2f})")
    timings = result.metrics["timings_s"]
    emit()
    emit("Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    emit(f"Wrote {result.out_dir / 'metrics.json'} and {', '.join(str(p) for p in result.plots)}")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffusionret.demo.pipeline import run_demo

    if args.threads < 1:
        logger.error("--threads must be >= 1, got %d", args.threads)
        return 2
    try:
        cfg = _demo_config(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    torch.set_num_threads(max(1, args.threads - cfg.num_workers))
    try:
        result = run_demo(args.out, cfg)
    except FileExistsError as exc:
        logger.error("%s", exc)
        return 1
    _print_report(result)
    return 0
