"""``diffusionret search INDEX "a man is cooking pasta" -k 10``: query an index from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from diffusionret.commands._common import add_search_options, open_searcher, user_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search", help="search an index with a text query",
        description="Rank the videos of an index for a text query: first stage on pooled embeddings (exact, "
                    "or an ANN file, PQ or IVF, for large indexes), WTI on the top N, diffusion re-ranking of the "
                    "top K.",
    )
    parser.add_argument("index", metavar="INDEX_DIR")
    parser.add_argument("query", help="text query")
    add_search_options(parser)
    parser.add_argument("-k", type=int, default=10, help="results to show")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of hits (rank, score, path, video_id, start, end, ...) instead of a table")
    parser.set_defaults(func=run)


def mmss(seconds: float | None) -> str:
    """``75.4`` -> ``"01:15"``; ``None`` -> ``"?"``."""
    if seconds is None:
        return "?"
    whole = int(seconds)
    return f"{whole // 60:02d}:{whole % 60:02d}"


def format_table(hits: Sequence[Any]) -> str:
    """Rank, score, moment (``mm:ss-mm:ss``), path as aligned columns."""
    rows = [("rank", "score", "moment", "path")]
    for hit in hits:
        start = getattr(hit, "start", None)
        moment = "" if start is None else f"{mmss(start)}-{mmss(hit.end)}"
        rows.append((str(hit.rank), f"{hit.score:.4f}", moment, hit.path))
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
        # A bare list, one object per hit (the API wraps the same objects in an envelope with the query).
        sys.stdout.write(json.dumps([h.to_dict() for h in hits], indent=2) + "\n")
    else:
        sys.stdout.write(format_table(hits))
    return 0
