"""The search API and web page: ``create_app(backend, config) -> FastAPI``.

Routes:
    ``GET /``                    the web page (search box, result grid, inline playback)
    ``GET /api/search?q=&k=``     ranked results as JSON
    ``GET /api/videos/{id}``     one video's metadata
    ``GET /api/info``            what is being served (size of the index, cascade settings)
    ``GET /media/{id}``          the video file, with HTTP Range support (seeking in the player)
    ``GET /thumbs/{id}``         the JPEG thumbnail
    ``GET /healthz``             liveness (never needs the token); 503 "degraded" while a search is stuck
    ``GET /openapi.json``        the API schema (``/docs``, the interactive page, only with ``docs=True``:
                                 it loads Swagger UI from a CDN)

Safety:
    * Only requests whose ``Host`` header names this server are answered (loopback names by default,
      see :class:`~diffusionret.serve.security.HostAllowlist`): a DNS-rebinding page gets ``400``.
    * Files are looked up by id in the loaded index; no part of a request path or query is ever
      joined to a filesystem path (static assets are served from the package by Starlette, which
      refuses paths escaping its folder).
    * With a token, ``/api/*``, ``/media`` and ``/thumbs`` need ``Authorization: Bearer <token>``.
      Browsers cannot add that header to ``<img>``/``<video>`` requests, so the URLs in API answers
      carry an expiring HMAC signature (``?exp=&sig=``, keyed by a random key, not the token).
      Tokens shorter than 16 characters are refused; failed authentications are rate limited per
      client address (``429``).
    * ``/media`` opens the recorded path without following symlinks and serves it only while its
      size and mtime match the catalogue (see :mod:`diffusionret.serve.media`).
    * Paths in answers are relative to the index's sources unless ``show_paths``.
    * Every HTML response carries a strict Content-Security-Policy (the opt-in ``/docs`` page one
      that allows its CDN).
    * Searches run in a worker thread (off the event loop) behind a bounded gate: at most
      ``max_pending`` searches wait or run; more are refused at once with ``503`` and
      ``Retry-After``, so a burst neither crashes the server nor grows memory without bound. A
      search that takes longer than ``search_timeout_s`` is answered ``504``; its thread keeps its
      slot until it ends, and ``/healthz`` reports ``degraded`` meanwhile.
    * Searches that arrive together run as one batch (``batch_max_size``, ``batch_max_wait_ms``;
      :mod:`diffusionret.serve.batcher`) through the backend's ``search_batch``, on one index
      snapshot. A request that times out while still queued leaves the queue and frees its slot at
      once; one whose batch is running is stuck as above. On shutdown, queued requests get ``503``.
    * Every error is a JSON object ``{"error": <code>, "detail": <message>}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import mimetypes
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence, TypeVar
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffusionret.index.catalog import VideoRecord
from diffusionret.index.searcher import SearchHit
from diffusionret.serve.batcher import BatchConfig, BatcherClosed, SearchBatcher, loop_search_batch
from diffusionret.serve.errors import ApiError
from diffusionret.serve.media import DescriptorResponse, check_range, if_range_matches, open_indexed, validators
from diffusionret.serve.paths import public_path, source_roots
from diffusionret.serve.security import (
    LOOPBACK_HOSTS,
    FailureLimiter,
    HostAllowlist,
    UrlSigner,
    check_token,
)

logger = logging.getLogger(__name__)

__all__ = ["ApiError", "InferenceGate", "SearchBackend", "ServeConfig", "UrlSigner", "check_range", "create_app"]

T = TypeVar("T")

# The web page loads only its own script and style, and media from this origin.
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# /docs (opt-in) is FastAPI's Swagger UI page: an inline script that loads the UI from jsDelivr.
DOCS_CSP = ("default-src 'none'; script-src 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
            "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")

# Ids are 16 lower-case hex digits (see diffusionret.index.catalog.video_id); anything else is
# rejected before a lookup.
_VIDEO_ID = re.compile(r"[0-9a-f]{16}")  # used with fullmatch: "$" would accept a trailing newline


class SearchBackend(Protocol):
    """What the app needs: a search function, the index (metadata, thumbnails) and a description.

    :class:`diffusionret.index.searcher.Searcher` implements it.
    """

    @property
    def index(self) -> Any: ...

    def search(self, query: str, k: int = 10) -> Sequence[SearchHit]: ...

    # Optional: ``search_batch(queries, ks) -> one hit list per query`` (batched serving uses it
    # when present, else it calls ``search`` once per query).

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ServeConfig:
    """Limits and access control of the HTTP service.

    Attributes:
        token: bearer token required for everything but ``/``, ``/healthz`` and the docs; ``None``
            leaves the service open (it listens on loopback by default). At least 16 characters.
        allowed_hosts: ``Host`` header values answered (names or addresses, any port); ``"*"``
            answers every host (only behind a proxy that checks it).
        max_query_chars: longest accepted query (CLIP reads at most ~75 tokens anyway).
        max_k: largest ``k`` a client may ask for.
        max_pending: searches allowed to wait or run at once; more get ``503``.
        workers: searches run at once, each on its own thread (``diffusionret serve`` pins torch to
            ``--threads`` intra-op threads per search, 1 by default, so 1 worker uses one core).
        url_ttl_s: lifetime of signed media/thumbnail URLs.
        auth_failures_per_minute, auth_failure_burst: failed authentications a client address may
            make at once (burst), then per minute; more get ``429``.
        search_timeout_s: a search running longer is answered ``504`` (``None``: no limit).
        batch_max_size, batch_max_wait_ms: searches that arrive together run as one batch of at
            most this many queries; the first waits at most this long for others
            (:mod:`diffusionret.serve.batcher`). ``batch_max_size`` 1: no batching, each search
            runs alone on a worker thread.
        batch_regroup_ms: after a batch, the longest wait for the clients it answered to send their
            next searches, so that they join the queued ones in one batch (0: off; never delays
            a lone client; :mod:`diffusionret.serve.batcher`).
        batch_split: with several workers, run one batch at a time split across them (default) instead
            of one batch per worker (:mod:`diffusionret.serve.batcher`).
        show_paths: answer absolute file and model paths (default: relative to the index's sources).
        docs: serve the interactive ``/docs`` page (it loads scripts from a CDN).
    """

    token: str | None = None
    max_query_chars: int = 500
    max_k: int = 100
    max_pending: int = 16
    workers: int = 1
    url_ttl_s: int = 6 * 3600
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    auth_failures_per_minute: int = 10
    auth_failure_burst: int = 20
    search_timeout_s: float | None = 30.0
    show_paths: bool = False
    docs: bool = False
    batch_max_size: int = 16
    batch_max_wait_ms: float = 0.0
    batch_regroup_ms: float = 20.0
    batch_split: bool = True

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ValueError("token must be non-empty when given")
        check_token(self.token)
        for name in ("max_query_chars", "max_k", "max_pending", "workers", "url_ttl_s",
                     "auth_failures_per_minute", "auth_failure_burst"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_max_size < 1 or self.batch_max_wait_ms < 0 or self.batch_regroup_ms < 0:
            raise ValueError(f"batch_max_size must be >= 1, batch_max_wait_ms and batch_regroup_ms >= 0, got "
                             f"{self.batch_max_size}, {self.batch_max_wait_ms} and {self.batch_regroup_ms}")
        if self.search_timeout_s is not None and self.search_timeout_s <= 0:
            raise ValueError(f"search_timeout_s must be positive or None, got {self.search_timeout_s}")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: no request could be answered (use '*' to allow any)")


class InferenceGate:
    """Runs blocking calls on worker threads, refusing work beyond ``max_pending`` in flight.

    A call counts as in flight until its thread returns, not until its request is answered: a
    search that timed out (``timeout_s``) still holds a thread, so it keeps its slot and is counted
    in :attr:`stuck` until it ends. With a :class:`~diffusionret.serve.batcher.SearchBatcher`,
    searches go through it instead; a request that times out while still queued is taken out of
    the queue and frees its slot at once. The counters are only touched from the event loop thread
    (the futures' done callbacks run there too), so they need no lock.
    """

    def __init__(self, workers: int, max_pending: int, timeout_s: float | None = None,
                 batcher: SearchBatcher | None = None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffusionret-search")
        self._max_pending = max_pending
        self._timeout_s = timeout_s
        self.batcher = batcher
        self.pending = 0
        self.stuck = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self._admit()
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        return await self._finish(future, cancel=lambda: False)  # an executor thread cannot be stopped

    async def search(self, backend: SearchBackend, query: str, k: int) -> Sequence[SearchHit]:
        """``backend.search(query, k)``, batched with other requests when the gate has a batcher."""
        if self.batcher is None:
            return await self.run(backend.search, query, k)
        self._admit()
        try:
            queued = self.batcher.submit(query, k)
        except BatcherClosed as exc:
            self.pending -= 1
            raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "1"}) from None
        batcher = self.batcher
        return await self._finish(asyncio.wrap_future(queued), cancel=lambda: batcher.withdraw(queued))

    def _admit(self) -> None:
        if self.pending >= self._max_pending:
            raise ApiError(503, "busy", "too many searches in progress; retry shortly", {"Retry-After": "1"})
        self.pending += 1

    async def _finish(self, future: asyncio.Future, cancel: Callable[[], bool]) -> Any:
        abandoned = False

        def finished(_: asyncio.Future) -> None:
            self.pending -= 1
            if abandoned:
                self.stuck -= 1

        future.add_done_callback(finished)
        try:
            # shield: a timeout or a client that goes away must not cancel the future, whose done
            # callback releases the slot when the work really ends.
            return await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
        except asyncio.TimeoutError:
            if cancel():  # still queued: it will never run, and its done callback frees the slot
                logger.warning("a search waited longer than %.1f s in the queue; answered 504", self._timeout_s)
            else:
                abandoned = True
                self.stuck += 1
                logger.warning("a search ran longer than %.1f s; answered 504, its thread is still busy",
                               self._timeout_s)
            raise ApiError(504, "search_timeout", f"the search took longer than {self._timeout_s:g} s",
                           {"Retry-After": "5"}) from None
        except BatcherClosed as exc:
            raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "1"}) from None

    def shutdown(self) -> None:
        if self.batcher is not None:
            # Queued requests fail with 503; a running batch gets a bounded time to finish.
            self.batcher.close(timeout_s=0 if self.stuck else 10.0)
        # A stuck search would block a waiting shutdown forever.
        self._executor.shutdown(wait=self.stuck == 0, cancel_futures=True)


def static_dir() -> Path:
    """Folder of the packaged web page (``diffusionret/serve/static``)."""
    return Path(str(importlib.resources.files("diffusionret.serve").joinpath("static")))


def create_app(backend: SearchBackend, config: ServeConfig | None = None, *,
               clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """Build the FastAPI application serving ``backend``.

    Args:
        backend: the searcher (owns the model and the index).
        config: limits and access control.
        clock: monotonic time for the failed-authentication limit (tests inject a fake one).

    Returns:
        The app; run it with ``uvicorn.run(app, host=..., port=...)``.
    """
    config = config or ServeConfig()
    signer = UrlSigner(config.token, config.url_ttl_s)
    limiter = FailureLimiter(config.auth_failures_per_minute, config.auth_failure_burst, clock=clock)

    # Threads start on first use (executor and batcher), so creating the gate here costs nothing; the lifespan
    # stops them.
    batcher = None
    if config.batch_max_size > 1:
        # Through the backend at each call: a reloading backend runs every batch (every part of a
        # split batch) on one snapshot.
        search_batch = getattr(backend, "search_batch", None) or loop_search_batch(backend.search)
        batcher = SearchBatcher(search_batch, BatchConfig(config.batch_max_size, config.batch_max_wait_ms / 1000.0,
                                                           config.batch_regroup_ms / 1000.0, config.batch_split),
                                workers=config.workers, start="on_submit")
    gate = InferenceGate(config.workers, config.max_pending, config.search_timeout_s, batcher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            gate.shutdown()
            close = getattr(backend, "close", None)  # e.g. the index watcher of a ReloadingBackend
            if close is not None:
                close()

    app = FastAPI(
        title="diffusionret search",
        version=_version(),
        description="Text-to-video search over a diffusionret index (first stage, WTI, diffusion re-ranking).",
        lifespan=lifespan,
        docs_url="/docs" if config.docs else None,
        redoc_url=None,
    )
    app.state.backend = backend
    app.state.gate = gate
    app.state.config = config
    app.state.signer = signer
    app.state.auth_limiter = limiter
    _install_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(HostCheck, allowlist=HostAllowlist(config.allowed_hosts))  # last added: runs first
    auth = _make_auth(config, signer, limiter)
    _add_page_routes(app)
    _add_api_routes(app, backend, config, signer, auth)
    _add_file_routes(app, backend, auth)
    return app


def _version() -> str:
    from diffusionret.version import __version__

    return __version__


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")


# Both are plain ASGI middleware rather than ``@app.middleware("http")`` ones: Starlette's
# BaseHTTPMiddleware runs each response through an extra task and memory stream, event-loop work
# on every request that competed with the search threads (BENCHMARKS.md, search under concurrency).


class SecurityHeaders:
    """Adds ``nosniff``, ``no-referrer`` and, to every HTML answer, a Content-Security-Policy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if headers.get("content-type", "").startswith("text/html"):
                    # Every HTML answer (/, /static/index.html, /docs), not only the page route.
                    csp = DOCS_CSP if scope["path"] == "/docs" else PAGE_CSP
                    headers.setdefault("Content-Security-Policy", csp)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HostCheck:
    """Answers ``400`` to a request whose ``Host`` header is not in the allowlist (DNS rebinding)."""

    def __init__(self, app: ASGIApp, allowlist: HostAllowlist) -> None:
        self.app, self.allowlist = app, allowlist

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowlist.allows(Headers(scope=scope).get("host")):
            response = _error(400, "invalid_host", "this server does not answer for that Host header "
                                                   "(see `diffusionret serve --allowed-host`)")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _make_auth(config: ServeConfig, signer: UrlSigner,
               limiter: FailureLimiter) -> Callable[[Request], Awaitable[None]]:
    # async although it never awaits: FastAPI runs a plain ``def`` dependency on a worker thread,
    # a thread hop per request that competed with the search threads for the cores and the GIL.
    # Running on the event loop also keeps the failure limiter single-threaded.
    async def auth(request: Request) -> None:
        if config.token is None:
            return
        client = _client(request)
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        kind = request.url.path.split("/")[1]
        exp, sig = request.query_params.get("exp"), request.query_params.get("sig")
        signed = kind in ("media", "thumbs") and (exp is not None or sig is not None)
        presented = bool(header) or signed
        if presented and (wait := limiter.retry_after(client)):
            raise ApiError(429, "too_many_failures", "too many failed authentications; retry later",
                           {"Retry-After": str(wait)})
        if scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), config.token.encode()):
            return
        if signed and signer.valid(kind, request.path_params.get("video_id", ""), exp, sig):
            return
        if presented:  # a missing credential is not a guess (the page asks for the token after a 401)
            limiter.failed(client)
        raise ApiError(401, "unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})

    return auth


def _add_page_routes(app: FastAPI) -> None:
    static = static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["service"], summary="Liveness check (no token needed)")
    def healthz() -> JSONResponse:
        videos = len(app.state.backend.index)
        stuck = app.state.gate.stuck
        if stuck:
            return JSONResponse({"status": "degraded", "videos": videos, "stuck_searches": stuck}, status_code=503)
        return JSONResponse({"status": "ok", "videos": videos})


def _lookup(backend: SearchBackend, video_id: str) -> VideoRecord:
    record = backend.index.record(video_id) if _VIDEO_ID.fullmatch(video_id) else None
    if record is None:
        raise ApiError(404, "not_found", "no video with this id in the index")
    return record


def _add_api_routes(app: FastAPI, backend: SearchBackend, config: ServeConfig, signer: UrlSigner,
                    auth: Callable[[Request], Awaitable[None]]) -> None:
    def record_json(record: VideoRecord, index: Any) -> dict[str, Any]:
        body = {**record.to_dict(), "thumb_url": signer.url("thumbs", record.id),
                "media_url": signer.url("media", record.id)}
        if not config.show_paths:
            info = getattr(index, "info", None)
            roots = source_roots(getattr(info, "sources", []), getattr(info, "video_root", None))
            body["path"] = public_path(record.path, roots)
        return body

    @app.get("/api/search", tags=["search"], dependencies=[Depends(auth)], summary="Search videos by text")
    async def search(request: Request, q: str | None = None, k: int = 10) -> dict[str, Any]:
        """Rank the indexed videos for the text query ``q``; returns the top ``k``."""
        query = (q or "").strip()
        if not query:
            raise ApiError(422, "invalid_request", "q: the query is empty")
        if len(query) > config.max_query_chars:
            raise ApiError(422, "invalid_request", f"q: the query is longer than {config.max_query_chars} characters")
        if not 1 <= k <= config.max_k:
            raise ApiError(422, "invalid_request", f"k: must be between 1 and {config.max_k}")
        index = backend.index  # before the search: a reload meanwhile does not mix two indexes' sources
        start = time.perf_counter()
        hits = await request.app.state.gate.search(backend, query, k)
        took_ms = (time.perf_counter() - start) * 1000.0
        results = [{**hit.to_dict(), **record_json(hit.record, index)} for hit in hits]
        return {"query": query, "k": k, "took_ms": round(took_ms, 2), "results": results}

    @app.get("/api/videos/{video_id}", tags=["videos"], dependencies=[Depends(auth)], summary="Video metadata")
    def video(video_id: str) -> dict[str, Any]:
        index = backend.index
        return record_json(_lookup(backend, video_id), index)

    @app.get("/api/info", tags=["service"], dependencies=[Depends(auth)], summary="What is being served")
    def info(request: Request) -> dict[str, Any]:
        described = backend.describe()
        if not config.show_paths and described.get("model_path"):
            described["model_path"] = Path(described["model_path"]).name
        batcher = request.app.state.gate.batcher
        batching = {"max_size": 1}
        if batcher is not None:
            batching = {"max_size": batcher.config.max_batch, "max_wait_ms": batcher.config.max_wait_s * 1000.0,
                        "regroup_ms": batcher.config.regroup_s * 1000.0, "batches": batcher.batches,
                        "queries": batcher.batched_queries, "workers": batcher.workers,
                        "split": batcher.config.split}
        return {**described, "max_k": config.max_k, "max_query_chars": config.max_query_chars, "batching": batching}


def _add_file_routes(app: FastAPI, backend: SearchBackend, auth: Callable[[Request], Awaitable[None]]) -> None:
    @app.get("/media/{video_id}", tags=["videos"], dependencies=[Depends(auth)],
             summary="Stream a video (supports Range requests)", response_class=Response)
    @app.head("/media/{video_id}", dependencies=[Depends(auth)], include_in_schema=False)
    def media(video_id: str, request: Request) -> Response:
        record = _lookup(backend, video_id)
        fd, st = open_indexed(record)  # the path is from the index, never from the request
        try:
            # Validated even when If-Range says to ignore it: a malformed header is an error either way.
            ranges = check_range(request.headers.get("range"), st.st_size)
            etag, last_modified = validators(st)
            if_range = request.headers.get("if-range")
            if ranges is not None and if_range is not None and not if_range_matches(if_range, etag, last_modified):
                ranges = None  # RFC 7233 3.2: the client's copy is stale, send the whole file
        except BaseException:
            os.close(fd)
            raise
        name = Path(record.path).name
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return DescriptorResponse(fd, st.st_size, media_type, ranges, {
            "cache-control": "private, max-age=3600", "etag": etag, "last-modified": last_modified,
            "content-disposition": _inline_disposition(name)})

    @app.get("/thumbs/{video_id}", tags=["videos"], dependencies=[Depends(auth)], summary="JPEG thumbnail",
             response_class=Response)
    def thumbnail(video_id: str) -> Response:
        record = _lookup(backend, video_id)
        data = backend.index.thumbnail(record.id)
        if not data:
            raise ApiError(404, "not_found", "this video has no thumbnail")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def _inline_disposition(name: str) -> str:
    quoted = quote(name)
    if quoted != name:
        return f"inline; filename*=utf-8''{quoted}"
    return f'inline; filename="{name}"'
