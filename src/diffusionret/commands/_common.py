"""What the commands share: output, config loading, the process group, error reporting, search options.

Commands import helpers from here, never from each other. Heavy imports (torch, the library) stay
inside the functions so that ``diffusionret --help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from diffusionret.config import RunConfig
    from diffusionret.distributed import DistContext

logger = logging.getLogger(__name__)

# first_stage.DEFAULT_RESCORE, repeated so that `--help` does not import torch.
DEFAULT_RESCORE = 20


# ---------------------------------------------------------------------------------------- output
def emit(text: str = "") -> None:
    """Write one line of a command's result to stdout (what a user pipes or reads; diagnostics go to logging)."""
    sys.stdout.write(text + "\n")


# ---------------------------------------------------------------------------------------- errors
def user_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report the errors a user can fix (wrong model, missing index, locked index) without a traceback."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from diffusionret.index.builder import IndexLockedError, OtherRankFailedError, PruneRefusedError, SegmentsError
        from diffusionret.index.first_stage import AnnUnavailableError
        from diffusionret.index.identity import ModelMismatchError
        from diffusionret.models.checkpoint import CheckpointError

        try:
            return func(args)
        except (ModelMismatchError, IndexLockedError, FileNotFoundError, CheckpointError, AnnUnavailableError,
                PruneRefusedError, SegmentsError, OtherRankFailedError) as exc:
            logger.error("%s", exc)
            return 2

    return wrapper


# ---------------------------------------------------------------------- run configs (train, eval, extract)
def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--config``, overrides, ``--split``, ``--ema``: what ``eval`` and ``extract`` take."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint, model file or run folder")
    parser.add_argument("--config", required=True, help="run config YAML (its data/eval/diffusion sections are used)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.top_k=16")
    parser.add_argument("--split", help="train / val / test or a reader split name (default: eval.split)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights of a trainer checkpoint")


def load_config(args: argparse.Namespace) -> "RunConfig | None":
    """``args.config`` with ``args.overrides`` applied; ``None`` (after logging why) when it is invalid."""
    from diffusionret.config import load_run_config
    from diffusionret.config_utils import ConfigError

    try:
        return load_run_config(args.config, args.overrides)
    except ConfigError as exc:
        logger.error("%s", exc)
        return None


def start_distributed(cfg: "RunConfig") -> "DistContext":
    """The process group of this run (a single process outside ``torchrun``) on ``train.device``."""
    from diffusionret.distributed import init_distributed

    return init_distributed(device=None if cfg.train.device == "auto" else cfg.train.device)


# ------------------------------------------------------------------------------ search and serve
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a float above 0 (NaN refused)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """Model and cascade options shared by ``search`` and ``serve``."""
    parser.add_argument("--model", help="model checkpoint (default: the one recorded in the index)")
    parser.add_argument("--candidates", type=int, default=100, metavar="N",
                        help="first-stage candidates scored by the WTI head")
    parser.add_argument("--rerank", type=int, default=32, metavar="K",
                        help="WTI candidates re-ranked by the diffusion model (0: off)")
    parser.add_argument("--max-words", type=int, default=None,
                        help="query length in tokens (default: the checkpoint's input setting, else the "
                             "reference's 32)")
    parser.add_argument("--first-stage", choices=("auto", "exact", "ivf", "pq"), default="auto",
                        help="first-stage search: auto = for indexes of 100k+ videos with FAISS installed, the "
                             "index's up-to-date PQ file, else its IVF file, else exact; exact = always exact (fp16 "
                             "embeddings from 100k videos); ivf / pq = that ANN index (built in memory if the index "
                             "has no up-to-date file; `index update --ann on` writes one) (default: auto)")
    parser.add_argument("--nprobe", type=_positive_int, default=32,
                        help="IVF clusters scanned per query: higher = better recall, slower (default: 32)")
    parser.add_argument("--rescore", type=_positive_int, default=DEFAULT_RESCORE, metavar="FACTOR",
                        help="PQ: re-score FACTOR x N shortlisted videos exactly: higher = better recall, slower "
                             f"(default: {DEFAULT_RESCORE})")
    parser.add_argument("--per-video", type=_positive_int, default=1, metavar="N",
                        help="most moments one video contributes to the results (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")


def open_searcher(args: argparse.Namespace) -> Any:
    """The :class:`~diffusionret.index.searcher.Searcher` that :func:`add_search_options` describes."""
    from diffusionret.index.first_stage import FirstStageConfig
    from diffusionret.index.searcher import SearchConfig, Searcher
    from diffusionret.index.store import VideoIndex

    model_path = args.model or VideoIndex.read_info(args.index).model_path
    # max_words None: the checkpoint's input setting (Searcher.open reads it)
    config = SearchConfig(candidates=args.candidates, rerank_top_k=args.rerank, max_words=args.max_words,
                          per_video=getattr(args, "per_video", 1),
                          first_stage=FirstStageConfig(method=args.first_stage, nprobe=args.nprobe,
                                                       rescore=args.rescore))
    return Searcher.open(args.index, model_path, device=args.device, config=config)
