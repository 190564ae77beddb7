"""``diffusionret search INDEX "a man is cooking pasta" -k 10``: query an index from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from diffusionret.commands.index import user_errors

# first_stage.DEFAULT_RESCORE, repeated so that `--help` does not import torch.
DEFAULT_RESCORE = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search", help="search an index with a text query",
        description="Rank the videos of an index for a text query: first stage on pooled embeddings (exact, "
                    "or IVF for large indexes), WTI on the top N, diffusion re-ranking of the top K.",
    )
    parser.add_argument("index", metavar="INDEX_DIR")
    parser.add_argument("query", help="text query")
    add_search_options(parser)
    parser.add_argument("-k", type=int, default=10, help="results to show")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """Model and cascade options shared by ``search`` and ``serve``."""
    parser.add_argument("--model", help="model checkpoint (default: the one recorded in the index)")
    parser.add_argument("--candidates", type=int, default=100, metavar="N",
                        help="first-stage candidates scored by the WTI head")
    parser.add_argument("--rerank", type=int, default=32, metavar="K",
                        help="WTI candidates re-ranked by the diffusion model (0: off)")
    parser.add_argument("--max-words", type=int, default=None,
                        help="query length in tokens (default: the checkpoint's training setting, else 32)")
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
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")


def open_searcher(args: argparse.Namespace) -> Any:
    from diffusionret.index.encode import checkpoint_data_settings
    from diffusionret.index.first_stage import FirstStageConfig
    from diffusionret.index.searcher import SearchConfig, Searcher
    from diffusionret.index.store import VideoIndex

    model_path = args.model or VideoIndex.read_info(args.index).model_path
    trained = checkpoint_data_settings(model_path) if model_path else {}
    config = SearchConfig(candidates=args.candidates, rerank_top_k=args.rerank,
                          max_words=args.max_words or int(trained.get("max_words", 32)),
                          first_stage=FirstStageConfig(method=args.first_stage, nprobe=args.nprobe,
                                                       rescore=args.rescore))
    return Searcher.open(args.index, model_path, device=args.device, config=config)


def format_table(hits: Sequence[Any]) -> str:
    """Rank, score, duration, path as aligned columns."""
    rows = [("rank", "score", "duration", "path")]
    for hit in hits:
        duration = "" if hit.duration is None else f"{hit.duration:.1f}s"
        rows.append((str(hit.rank), f"{hit.score:.4f}", duration, hit.path))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    return "\n".join(lines) + "\n"


@user_errors
def run(args: argparse.Namespace) -> int:
    if not args.query.strip():
        sys.stderr.write("error: the query is empty\n")
        return 2
    if args.k <= 0:
        sys.stderr.write("error: -k must be positive\n")
        return 2
    searcher = open_searcher(args)
    hits = searcher.search(args.query, args.k)
    if args.json:
        sys.stdout.write(json.dumps({"query": args.query, "results": [h.to_dict() for h in hits]}, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(hits))
    return 0
