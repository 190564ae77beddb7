"""Bounded load test of ``diffusionret serve``: concurrent searches over loopback, p50/p99 latency and errors.

Either point it at a running server or let it start one (``diffusionret serve`` in a subprocess on a
free loopback port, stopped afterwards)::

    python benchmarks/load_test.py --spawn INDEX_DIR [--model CKPT]          # start, load, stop
    python benchmarks/load_test.py --spawn-synthetic 1000000 --concurrency 8   # bench_search.py's synthetic index
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --token-file T

Bounded: a fixed number of requests (``--requests``), a fixed number in flight (``--concurrency``)
and a wall-clock cap (``--max-seconds``). Only loopback addresses are accepted, so it cannot be
turned against another machine. ``503`` answers (the server shedding load) are reported apart from
other errors.

The client shares the machine with the server, so its own CPU time counts against the server's.
``--client raw`` (default) sends keep-alive HTTP/1.1 requests over plain asyncio streams: about
0.3 ms of CPU per request on the 2-core benchmark VM, where ``--client httpx`` (the earlier client)
takes about 2 ms. The report gives the client's CPU time per
request (``client_cpu_ms_per_request``) either way.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

import httpx

from _common import report

DEFAULT_QUERIES = [
    "a small red circle moves to the left on a black background",
    "a large blue square rises over a white background",
    "a green ring stays still",
    "a yellow triangle falls on a gray backdrop",
    "a purple cross circles around",
    "an orange disc drifts to the right",
    "a man is cooking pasta",
    "two dogs play in the snow",
]


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load-test {host!r}: only loopback servers (127.0.0.1, ::1, localhost)")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class RawConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: GET, status and body, nothing more.

    Enough for a loopback load test of our own server (``Content-Length`` bodies; a closed
    connection is reopened once), at a fraction of a general client's CPU per request.
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.head_lines = "".join(f"{name}: {value}\r\n" for name, value in
                                  {"Host": f"{self.host}:{self.port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, params: dict[str, object]) -> tuple[int, bytes]:
        request = f"GET {path}?{urlencode(params)} HTTP/1.1\r\n{self.head_lines}\r\n".encode()
        # One retry on a fresh connection: the server may have closed an idle keep-alive one.
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(request)
                return await self._response()
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


async def run_load(url: str, queries: list[str], *, requests: int, concurrency: int, k: int, token: str | None,
                   max_seconds: float, timeout: float, client: str = "raw") -> dict:
    """Send ``requests`` searches, ``concurrency`` at a time; returns latencies and status counts."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def params(i: int) -> dict[str, object]:
        return {"q": queries[i % len(queries)], "k": k}

    if client == "raw":
        connections = [RawConnection(url, headers) for _ in range(concurrency)]

        def raw_sender(connection: RawConnection) -> Send:
            async def send(i: int) -> str:
                try:
                    status, _ = await asyncio.wait_for(connection.get("/api/search", params(i)), timeout)
                    return str(status)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    await connection.close()
                    return type(exc).__name__
            return send

        try:
            for connection in connections:  # warm-up and connect (the first call loads caches)
                await connection.get("/api/search", params(0))
            return await _drive([raw_sender(c) for c in connections], requests, max_seconds)
        finally:
            for connection in connections:
                await connection.close()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as http:
        async def send(i: int) -> str:
            try:
                return str((await http.get("/api/search", params=params(i))).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        await http.get("/api/search", params=params(0))  # warm-up (first call loads caches)
        return await _drive([send] * concurrency, requests, max_seconds)


#: ``send(i)``: run request ``i``; its HTTP status, or the name of the error that stopped it.
Send = Callable[[int], Awaitable[str]]


async def _drive(senders: list[Send], requests: int, max_seconds: float) -> dict:
    """Run ``requests`` requests, one concurrent client per sender; latencies of the ``200`` answers and status counts."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + max_seconds
    counter = iter(range(requests))

    async def worker(send: Send) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                statuses["not sent (time cap)"] = statuses.get("not sent (time cap)", 0) + 1
                continue
            start = time.perf_counter()
            key = await send(i)
            if key == "200":
                latencies.append(time.perf_counter() - start)
            statuses[key] = statuses.get(key, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(send) for send in senders))
    return {"latencies": latencies, "statuses": statuses, "elapsed": time.perf_counter() - start}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(index: str | None, model: str | None, extra: list[str],
                 synthetic: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if synthetic is not None:
        command = [sys.executable, str(Path(__file__).with_name("serve_synthetic.py")), "--videos", str(synthetic),
                   "--port", str(port), *extra]
    else:
        command = [sys.executable, "-m", "diffusionret", "--log-level", "WARNING", "serve", str(index), "--host",
                   "127.0.0.1", "--port", str(port), *(["--model", model] if model else []), *extra]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a 1M synthetic index loads in minutes on a busy machine
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("server did not become healthy in 900 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (loopback only)")
    target.add_argument("--spawn", metavar="INDEX_DIR", help="start `diffusionret serve INDEX_DIR` for the test")
    target.add_argument("--spawn-synthetic", type=int, metavar="VIDEOS",
                        help="start benchmarks/serve_synthetic.py (bench_search.py's synthetic index of VIDEOS videos)")
    parser.add_argument("--model", help="with --spawn: model checkpoint (default: the index's)")
    parser.add_argument("--serve-args", default="", help="with --spawn: extra `serve` options, e.g. '--rerank 8'")
    parser.add_argument("--requests", type=int, default=200, help="searches to send")
    parser.add_argument("--concurrency", type=int, default=8, help="searches in flight")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--queries", type=Path, help="file with one query per line (default: built-in captions)")
    parser.add_argument("--token-file", type=Path, help="bearer token file (or $DIFFUSIONRET_TOKEN)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="wall-clock cap for the whole run")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="raw: lean keep-alive asyncio client (default); httpx: the general client (see above)")
    args = parser.parse_args()
    if args.requests <= 0 or args.concurrency <= 0:
        parser.error("--requests and --concurrency must be positive")

    queries = DEFAULT_QUERIES
    if args.queries:
        queries = [q.strip() for q in args.queries.read_text().splitlines() if q.strip()] or DEFAULT_QUERIES
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("DIFFUSIONRET_TOKEN")
    process = None
    if args.spawn or args.spawn_synthetic:
        process, url = spawn_server(args.spawn, args.model, args.serve_args.split(), synthetic=args.spawn_synthetic)
    else:
        url = args.url.rstrip("/")
    require_loopback(url)
    load_before = os.getloadavg()[0]
    cpu_before = time.process_time()
    try:
        result = asyncio.run(run_load(url, queries, requests=args.requests, concurrency=args.concurrency, k=args.k,
                                      token=token, max_seconds=args.max_seconds, timeout=args.timeout,
                                      client=args.client))
        client_cpu = time.process_time() - cpu_before
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    latencies = [1000.0 * s for s in result["latencies"]]
    statuses = result["statuses"]
    ok = statuses.get("200", 0)
    shed = statuses.get("503", 0)
    errors = sum(n for key, n in statuses.items() if key not in ("200", "503"))
    values = {"requests": args.requests, "concurrency": args.concurrency, "ok": ok, "shed_503": shed,
              "errors": errors, "throughput_rps": ok / result["elapsed"] if result["elapsed"] else 0.0,
              "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0], "client": args.client,
              "client_cpu_ms_per_request": 1000.0 * client_cpu / max(1, sum(statuses.values()))}
    if latencies:
        values.update(p50_ms=percentile(latencies, 50), p90_ms=percentile(latencies, 90),
                      p99_ms=percentile(latencies, 99), max_ms=max(latencies), mean_ms=statistics.fmean(latencies))
    report("serve_load", **values, statuses=statuses)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
