"""The search API and web page: ``create_app(backend, config) -> FastAPI``.

Routes:
    ``GET /``                    the web page (search box, result grid, inline playback)
    ``GET /api/search?q=&k=``     ranked results as JSON
    ``GET /api/videos/{id}``     one video's metadata
    ``GET /api/info``            what is being served (size of the index, cascade settings)
    ``GET /media/{id}``          the video file, with HTTP Range support (seeking in the player)
    ``GET /thumbs/{id}``         the JPEG thumbnail
    ``GET /healthz``             liveness (never needs the token)
    ``GET /docs``, ``/openapi.json``  interactive API documentation

Safety:
    * Files are looked up by id in the loaded index; no part of a request path or query is ever
      joined to a filesystem path (static assets are served from the package by Starlette, which
      refuses paths escaping its folder).
    * With a token, ``/api/*``, ``/media`` and ``/thumbs`` need ``Authorization: Bearer <token>``.
      Browsers cannot add that header to ``<img>``/``<video>`` requests, so the URLs in API answers
      carry an expiring HMAC signature (``?exp=&sig=``) instead of the token itself.
    * Searches run in a worker thread (off the event loop) behind a bounded gate: at most
      ``max_pending`` searches wait or run; more are refused at once with ``503`` and
      ``Retry-After``, so a burst neither crashes the server nor grows memory without bound.
    * Every error is a JSON object ``{"error": <code>, "detail": <message>}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.resources
import logging
import mimetypes
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol, Sequence, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffusionret.index.catalog import VideoRecord
from diffusionret.index.searcher import SearchHit

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Ids are 16 lower-case hex digits (see diffusionret.index.catalog.video_id); anything else is
# rejected before a lookup.
_VIDEO_ID = re.compile(r"^[0-9a-f]{16}$")


class SearchBackend(Protocol):
    """What the app needs: a search function, the index (metadata, thumbnails) and a description.

    :class:`diffusionret.index.searcher.Searcher` implements it.
    """

    @property
    def index(self) -> Any: ...

    def search(self, query: str, k: int = 10) -> Sequence[SearchHit]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ServeConfig:
    """Limits and access control of the HTTP service.

    Attributes:
        token: bearer token required for everything but ``/``, ``/healthz`` and the docs; ``None``
            leaves the service open (it listens on loopback by default).
        max_query_chars: longest accepted query (CLIP reads at most ~75 tokens anyway).
        max_k: largest ``k`` a client may ask for.
        max_pending: searches allowed to wait or run at once; more get ``503``.
        workers: searches run at once, each on its own thread (``diffusionret serve`` pins torch to
            ``--threads`` intra-op threads per search, 1 by default, so 1 worker uses one core).
        url_ttl_s: lifetime of signed media/thumbnail URLs.
    """

    token: str | None = None
    max_query_chars: int = 500
    max_k: int = 100
    max_pending: int = 16
    workers: int = 1
    url_ttl_s: int = 6 * 3600

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ValueError("token must be non-empty when given")
        for name in ("max_query_chars", "max_k", "max_pending", "workers", "url_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ApiError(Exception):
    """An error answered as ``{"error": code, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


class InferenceGate:
    """Runs blocking calls on worker threads, refusing work beyond ``max_pending`` in flight.

    The counter is only touched from the event loop thread, so it needs no lock.
    """

    def __init__(self, workers: int, max_pending: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffusionret-search")
        self._max_pending = max_pending
        self.pending = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pending >= self._max_pending:
            raise ApiError(503, "busy", "too many searches in progress; retry shortly", {"Retry-After": "1"})
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class UrlSigner:
    """Expiring HMAC signatures for media and thumbnail URLs (keyed by the bearer token)."""

    def __init__(self, token: str | None, ttl_s: int) -> None:
        self._key = token.encode() if token else None
        self._ttl_s = ttl_s

    def _mac(self, kind: str, video_id: str, expires: int) -> str:
        assert self._key is not None
        return hmac.new(self._key, f"{kind}:{video_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, kind: str, video_id: str) -> str:
        base = f"/{kind}/{video_id}"
        if self._key is None:
            return base
        # Round the expiry so that repeated searches give identical URLs (browser caching works).
        expires = (int(time.time()) // 600 + 1) * 600 + self._ttl_s
        return f"{base}?exp={expires}&sig={self._mac(kind, video_id, expires)}"

    def valid(self, kind: str, video_id: str, expires: str | None, signature: str | None) -> bool:
        if self._key is None or not expires or not signature or not expires.isdigit():
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(self._mac(kind, video_id, int(expires)), signature)


def static_dir() -> Path:
    """Folder of the packaged web page (``diffusionret/serve/static``)."""
    return Path(str(importlib.resources.files("diffusionret.serve").joinpath("static")))


def create_app(backend: SearchBackend, config: ServeConfig | None = None) -> FastAPI:
    """Build the FastAPI application serving ``backend``.

    Args:
        backend: the searcher (owns the model and the index).
        config: limits and access control.

    Returns:
        The app; run it with ``uvicorn.run(app, host=..., port=...)``.
    """
    config = config or ServeConfig()
    signer = UrlSigner(config.token, config.url_ttl_s)

    # Threads start on first use, so creating the gate here costs nothing; the lifespan stops them.
    gate = InferenceGate(config.workers, config.max_pending)

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
    )
    app.state.backend = backend
    app.state.gate = gate
    app.state.config = config
    app.state.signer = signer
    _install_error_handlers(app)
    _install_security_headers(app)
    auth = _make_auth(config, signer)
    _add_page_routes(app)
    _add_api_routes(app, backend, config, signer, auth)
    _add_file_routes(app, backend, auth)
    return app


def _version() -> str:
    import diffusionret

    return diffusionret.__version__


def _install_error_handlers(app: FastAPI) -> None:
    def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return error(422, "invalid_request", "; ".join(parts) or "invalid request")


def _install_security_headers(app: FastAPI) -> None:
    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response


def _make_auth(config: ServeConfig, signer: UrlSigner) -> Callable[[Request], None]:
    def auth(request: Request) -> None:
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), config.token.encode()):
            return
        kind = request.url.path.split("/")[1]
        video_id = request.path_params.get("video_id", "")
        if kind in ("media", "thumbs") and signer.valid(kind, video_id, request.query_params.get("exp"),
                                                        request.query_params.get("sig")):
            return
        raise ApiError(401, "unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})

    return auth


def _add_page_routes(app: FastAPI) -> None:
    static = static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        # The page loads only its own script and style, and media from this origin.
        csp = ("default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self'; "
               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
        return FileResponse(static / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["service"], summary="Liveness check (no token needed)")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "videos": len(app.state.backend.index)}


def _lookup(backend: SearchBackend, video_id: str) -> VideoRecord:
    record = backend.index.record(video_id) if _VIDEO_ID.match(video_id) else None
    if record is None:
        raise ApiError(404, "not_found", "no video with this id in the index")
    return record


def _hit_json(hit: SearchHit, signer: UrlSigner) -> dict[str, Any]:
    return {**hit.to_dict(), "thumb_url": signer.url("thumbs", hit.id), "media_url": signer.url("media", hit.id)}


def _add_api_routes(app: FastAPI, backend: SearchBackend, config: ServeConfig, signer: UrlSigner,
                    auth: Callable[[Request], None]) -> None:
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
        start = time.perf_counter()
        hits = await request.app.state.gate.run(backend.search, query, k)
        took_ms = (time.perf_counter() - start) * 1000.0
        return {"query": query, "k": k, "took_ms": round(took_ms, 2),
                "results": [_hit_json(hit, signer) for hit in hits]}

    @app.get("/api/videos/{video_id}", tags=["videos"], dependencies=[Depends(auth)], summary="Video metadata")
    def video(video_id: str) -> dict[str, Any]:
        record = _lookup(backend, video_id)
        return {**record.to_dict(), "thumb_url": signer.url("thumbs", record.id),
                "media_url": signer.url("media", record.id)}

    @app.get("/api/info", tags=["service"], dependencies=[Depends(auth)], summary="What is being served")
    def info() -> dict[str, Any]:
        return {**backend.describe(), "max_k": config.max_k, "max_query_chars": config.max_query_chars}


def check_range(header: str | None, size: int) -> None:
    """Reject a Range header that Starlette's ``FileResponse`` would refuse, but as a JSON error.

    Same rules as ``FileResponse`` (which then serves the ranges): byte units only, every part
    ``a-b``, ``a-`` or ``-n`` with ``a <= b``; any part starting past the end makes the request
    unsatisfiable (416 with ``Content-Range: bytes */size``).

    Raises:
        ApiError: 400 for a malformed header, 416 for an unsatisfiable one.
    """
    if header is None:
        return
    units, sep, spec = header.partition("=")
    if not sep or units.strip().lower() != "bytes":
        raise ApiError(400, "invalid_range", "only 'bytes=' ranges are supported")
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise ApiError(400, "invalid_range", "empty Range header")
    unsatisfiable = False
    for part in parts:
        first, dash, last = (x.strip() for x in part.partition("-"))
        if not dash or not (first or last) or not all(x.isdigit() for x in (first, last) if x):
            raise ApiError(400, "invalid_range", f"malformed range {part!r}")
        if first:
            start = int(first)
            if last and int(last) < start:
                raise ApiError(400, "invalid_range", f"range {part!r} ends before it starts")
            unsatisfiable |= start >= size
        else:
            unsatisfiable |= int(last) == 0 or size == 0
    if unsatisfiable:
        raise ApiError(416, "range_not_satisfiable", f"the file has {size} bytes",
                       {"Content-Range": f"bytes */{size}"})


def _add_file_routes(app: FastAPI, backend: SearchBackend, auth: Callable[[Request], None]) -> None:
    @app.get("/media/{video_id}", tags=["videos"], dependencies=[Depends(auth)],
             summary="Stream a video (supports Range requests)", response_class=FileResponse)
    @app.head("/media/{video_id}", dependencies=[Depends(auth)], include_in_schema=False)
    def media(video_id: str, request: Request) -> FileResponse:
        record = _lookup(backend, video_id)
        path = Path(record.path)  # from the index, never from the request
        if not path.is_file():
            raise ApiError(404, "not_found", "the video file is no longer available")
        if "if-range" not in request.headers:
            check_range(request.headers.get("range"), path.stat().st_size)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, content_disposition_type="inline", filename=path.name,
                            headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/thumbs/{video_id}", tags=["videos"], dependencies=[Depends(auth)], summary="JPEG thumbnail",
             response_class=Response)
    def thumbnail(video_id: str) -> Response:
        record = _lookup(backend, video_id)
        data = backend.index.thumbnail(record.id)
        if not data:
            raise ApiError(404, "not_found", "this video has no thumbnail")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
