"""``diffusionret serve INDEX``: the search API and web page (FastAPI + uvicorn).

Listens on 127.0.0.1 unless ``--host`` says otherwise. The access token comes from
``--token-file`` or ``$DIFFUSIONRET_TOKEN`` (``--token`` works too, but is visible to other users in
the process list).

Threads: each search runs torch (and FAISS) with ``--threads`` intra-op threads, 1 by default. Most
of a query is small ops (the text tower on a dozen tokens, 50 DDIM steps on 32 candidates) whose
OpenMP threads synchronise after every op; when other work competes for the cores, a second
thread that is descheduled stalls every op, and such code measured 5-15x slower with 2 threads
than with 1 (BENCHMARKS.md). One thread per search gives stable tail latency; ``--workers`` runs
that many searches at once (e.g. ``--workers 2`` on two cores).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from diffusionret.commands._common import add_search_options, open_searcher, user_errors

logger = logging.getLogger(__name__)

TOKEN_ENV = "DIFFUSIONRET_TOKEN"
DEFAULT_THREADS = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve an index over HTTP (API + web page)",
                                   description="Serve search over an index: JSON API, video streaming, web page.")
    parser.add_argument("index", metavar="INDEX_DIR")
    add_search_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-file", help=f"file holding the bearer token (or set ${TOKEN_ENV})")
    parser.add_argument("--token", help="bearer token (prefer --token-file: arguments are visible in `ps`)")
    parser.add_argument("--max-pending", type=int, default=16, help="searches allowed in flight; more get 503")
    parser.add_argument("--max-k", type=int, default=100, help="largest k a client may request")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch intra-op threads per search (default: 1, the stable choice for tail latency; "
                             "0 keeps torch's default of one per core)")
    parser.add_argument("--workers", type=int, default=1,
                        help="searches run at once, each on its own thread (default: 1)")
    parser.add_argument("--reload-interval", type=float, default=5.0, metavar="SECONDS",
                        help="look for changes of the index on disk (`index update`) this often and serve the "
                             "new contents once they have been stable that long (default: 5; 0: never reload)")
    parser.set_defaults(func=run)


def resolve_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{args.token_file} is empty")
        return token
    return args.token or os.environ.get(TOKEN_ENV) or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@user_errors
def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from diffusionret.serve.app import ServeConfig, create_app

    if args.threads < 0 or args.workers <= 0 or args.reload_interval < 0:
        logger.error("--threads and --reload-interval must be >= 0 and --workers positive")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    token = resolve_token(args)
    if not _is_loopback(args.host) and token is None:
        logger.warning("listening on %s without a token: anyone who can reach this port can search and "
                       "download the indexed videos (set $%s or --token-file)", args.host, TOKEN_ENV)
    if args.reload_interval > 0:
        from diffusionret.serve.reload import ReloadingBackend

        searcher = ReloadingBackend(args.index, lambda: open_searcher(args), poll_s=args.reload_interval,
                                    settle_s=args.reload_interval)
    else:
        searcher = open_searcher(args)
    app = create_app(searcher, ServeConfig(token=token, max_pending=args.max_pending, max_k=args.max_k,
                                           workers=args.workers))
    logger.info("serving %d videos on http://%s:%d/ (%d torch threads per search, %d workers)", len(searcher.index),
                args.host, args.port, torch.get_num_threads(), args.workers)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
