"""``diffusionret serve INDEX``: the search API and web page (FastAPI + uvicorn).

Listens on 127.0.0.1 unless ``--host`` says otherwise. The access token comes from
``--token-file`` or ``$DIFFUSIONRET_TOKEN`` (``--token`` works too, but is visible to other users in
the process list); it must be at least 16 characters long.

Only requests whose ``Host`` header names this server are answered: ``localhost``, ``127.0.0.1``,
``[::1]``, the ``--host`` address when it is a specific one, and every ``--allowed-host`` (the names
clients use to reach it, e.g. ``--allowed-host search.lan``; ``--allowed-host '*'`` turns the check
off, for a reverse proxy that does it). This stops DNS-rebinding pages from reading the API.

Threads: each search thread runs torch (and FAISS) with ``--threads`` intra-op threads, 1 by
default. Most of a query is small ops (the text tower on a dozen tokens, 50 DDIM steps on 32
candidates) whose OpenMP threads synchronise after every op; when other work competes for the
cores, a second thread that is descheduled stalls every op, and such code measured 5-15x slower
with 2 threads than with 1 (BENCHMARKS.md). So parallelism comes from ``--workers`` search threads
(default: the usable cores divided by ``--threads``, at most 4), each on its own core(s).

Batching: the searches queued when the last batch ends (up to ``--batch-max-size``; with
``--batch-max-wait-ms`` the first also waits that long for others; after a batch, ``--batch-regroup-ms``
waits briefly for the clients it answered, so that they join the queued ones) run as one batch: the text
tower reads its weights once for all of them, and the first stage and the re-ranking run once per
batch. Each query gets the result it gets alone. A batch is split across the workers, balanced by
query length, and answered when its last part ends (``--no-batch-split``: one batch per worker). At
1M videos and 8 concurrent clients on two cores this ran at 2.7-2.9x the unbatched server's
throughput with a p99 of 213-233 ms (BENCHMARKS.md); a lone query does not wait.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
from pathlib import Path
from typing import TypeVar

from diffusionret.commands._common import add_search_options, open_searcher, user_errors

logger = logging.getLogger(__name__)

TOKEN_ENV = "DIFFUSIONRET_TOKEN"
DEFAULT_THREADS = 1
#: Most search threads ``--workers`` defaults to (see :func:`default_workers`).
MAX_DEFAULT_WORKERS = 4


T = TypeVar("T")


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
    parser.add_argument("--workers", type=int,
                        help="search threads: a batch of searches is split across them (default: the cores this "
                             f"process may use divided by --threads, at most {MAX_DEFAULT_WORKERS}; here "
                             f"{default_workers(DEFAULT_THREADS)} with --threads {DEFAULT_THREADS})")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests for this Host name or address (repeatable; '*': any host)")
    parser.add_argument("--show-paths", action="store_true",
                        help="answer absolute file and model paths (default: relative to the index's sources)")
    parser.add_argument("--docs", action="store_true",
                        help="serve the interactive /docs page (loads Swagger UI from a CDN; /openapi.json is always on)")
    parser.add_argument("--search-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="answer 504 to a search running longer (default: 30; its thread keeps its slot "
                             "and /healthz says 'degraded' until it ends)")
    parser.add_argument("--batch-max-size", type=int, default=16, metavar="N",
                        help="run searches that arrive together as one batch of at most N queries (one text-tower "
                             "pass, one first stage, one re-ranking call; same results); 1: no batching (default: 16)")
    parser.add_argument("--batch-max-wait-ms", type=float, default=0.0, metavar="MS",
                        help="longest time the first search of a batch waits for others (default: 0: a batch is "
                             "what is queued when a worker is free; e.g. 5 for bursts reaching an idle server)")
    parser.add_argument("--batch-regroup-ms", type=float, default=20.0, metavar="MS",
                        help="after a batch, wait up to this long (and at most a quarter of the batch's time) for "
                             "the clients it answered to send their next searches, so that they join the queued "
                             "ones in one batch; a lone client is never delayed (default: 20; 0: off)")
    parser.add_argument("--batch-split", action=argparse.BooleanOptionalAction, default=True,
                        help="with several --workers, run one batch at a time split across them, so that its "
                             "clients are answered together (default); --no-batch-split: one batch per worker")
    parser.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="close connections that send no complete request headers this long (default: 10)")
    parser.add_argument("--keep-alive", type=int, default=5, metavar="SECONDS",
                        help="close idle keep-alive connections after this long (default: 5)")
    parser.add_argument("--max-connections", type=int, default=100,
                        help="connections served at once; more get 503 (default: 100)")
    parser.add_argument("--forwarded-allow-ips", default="127.0.0.1", metavar="ADDRESSES",
                        help="comma-separated addresses of reverse proxies whose X-Forwarded-For names the client "
                             "(failed-login limits then count per real client, not per proxy); '*' trusts any "
                             "sender, '' none (default: 127.0.0.1, a proxy on this machine)")
    parser.add_argument("--reload-interval", type=float, default=5.0, metavar="SECONDS",
                        help="look for changes of the index on disk (`index update`) this often and serve the "
                             "new contents once they have been stable that long (default: 5; 0: never reload)")
    parser.set_defaults(func=run)


def default_workers(threads: int) -> int:
    """As many search threads as fill the cores this process may run on, at most :data:`MAX_DEFAULT_WORKERS`.

    Each search thread runs torch with ``threads`` intra-op threads (``--threads``; 0: torch's
    default of one per core), so ``cores // threads`` of them fill the cores without
    oversubscribing them. Beyond a few, a batch (at most ``--batch-max-size`` queries) would be cut
    into parts too small for the text tower to batch well.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT_WORKERS, cores // (threads or cores)))


def resolve_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{args.token_file} is empty")
        return token
    return args.token or os.environ.get(TOKEN_ENV) or None


def allowed_hosts(host: str, extra: list[str]) -> tuple[str, ...]:
    """Host header values to answer: loopback names, ``host`` unless it is a wildcard address, and ``extra``."""
    from diffusionret.serve.security import LOOPBACK_HOSTS

    hosts = list(LOOPBACK_HOSTS)
    if host not in ("", "0.0.0.0", "::"):
        hosts.append(host)
    return tuple(dict.fromkeys([*hosts, *extra]))


def settle_heap(loaded: T) -> T:
    """Exempt everything alive now (the just loaded index and model) from the cyclic garbage collector.

    An index's catalogue is about one Python object per video: at 1M videos a full collection
    walked ~1.4M objects in ~0.4 s, a stall of every search in flight whenever the collector's
    oldest generation came due. ``gc.freeze`` moves them to the permanent generation, which
    collections skip; they are still freed by reference counting when a reload drops the old
    index (a reference cycle among them would stay, and the catalogue records hold none).
    Collecting first keeps today's garbage out of it. Returns ``loaded``.
    """
    gc.collect()
    gc.freeze()
    return loaded


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
    from diffusionret.serve.security import MIN_TOKEN_CHARS, check_token
    from diffusionret.serve.server import ServerLimits, uvicorn_config

    if args.workers is None:
        args.workers = default_workers(args.threads)
    if args.threads < 0 or args.workers <= 0 or args.reload_interval < 0:
        logger.error("--threads and --reload-interval must be >= 0 and --workers positive")
        return 2
    try:
        limits = ServerLimits(header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive,
                              max_connections=args.max_connections)
        if args.search_timeout <= 0:
            raise ValueError("--search-timeout must be positive")
        if args.batch_max_size < 1 or args.batch_max_wait_ms < 0 or args.batch_regroup_ms < 0:
            raise ValueError("--batch-max-size must be >= 1, --batch-max-wait-ms and --batch-regroup-ms >= 0")
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    token = resolve_token(args)
    try:
        check_token(token)
    except ValueError as exc:
        logger.error("refusing to start: %s; a short token can be guessed (choose one of %d+ random characters)",
                     exc, MIN_TOKEN_CHARS)
        return 2
    hosts = allowed_hosts(args.host, args.allowed_host)
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:
        logger.warning("listening on all interfaces, but answering only requests for %s: add the names clients "
                       "use with --allowed-host", ", ".join(hosts))
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _is_loopback(args.host) and token is None:
        logger.warning("listening on %s without a token: anyone who can reach this port can search and "
                       "download the indexed videos (set $%s or --token-file)", args.host, TOKEN_ENV)
    if args.reload_interval > 0:
        from diffusionret.serve.reload import ReloadingBackend

        searcher = ReloadingBackend(args.index, lambda: settle_heap(open_searcher(args)), poll_s=args.reload_interval,
                                    settle_s=args.reload_interval)
    else:
        searcher = settle_heap(open_searcher(args))
    app = create_app(searcher, ServeConfig(token=token, max_pending=args.max_pending, max_k=args.max_k,
                                           workers=args.workers, allowed_hosts=hosts, show_paths=args.show_paths,
                                           docs=args.docs, search_timeout_s=args.search_timeout,
                                           batch_max_size=args.batch_max_size,
                                           batch_max_wait_ms=args.batch_max_wait_ms,
                                           batch_regroup_ms=args.batch_regroup_ms, batch_split=args.batch_split))
    logger.info("serving %d videos on http://%s:%d/ (%d torch threads per search, %d workers)", len(searcher.index),
                args.host, args.port, torch.get_num_threads(), args.workers)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, limits, log_level="warning", access_log=False,
                                  forwarded_allow_ips=args.forwarded_allow_ips)).run()
    return 0
