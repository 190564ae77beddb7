"""The HTTP API: every endpoint, Range requests, auth, path traversal, bad input and load shedding.

The backend is a real :class:`VideoIndex` built by the synthetic extractor, searched by
:class:`SyntheticSearcher` (first stage only), so the web layer is tested without a model. Raw-path
and concurrency tests talk to a real uvicorn server over loopback.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from diffusionret.index.builder import build_index
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor, SyntheticSearcher
from diffusionret.serve.app import ServeConfig, UrlSigner, check_range, create_app
from helpers import assert_json_error, running_server, wait_for

TOKEN = "correct-horse-battery-staple"
# TestClient's default Host (testserver) is not a loopback name: the Host allowlist would refuse it.
BASE_URL = "http://127.0.0.1"
NAMES = ["red_circle_left", "blue_square_up", "green_ring_down", "yellow_cross_right", "purple_triangle_still"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    videos = root / "videos"
    videos.mkdir()
    for i, name in enumerate(NAMES):
        (videos / f"{name}.mp4").write_bytes(bytes(range(256)) * (4 + i))
    (root / "secret.txt").write_text("root:x:0:0:top secret\n")
    build_index(root / "idx", videos, SyntheticExtractor(), progress=False)
    index = VideoIndex.load(root / "idx")
    return {"root": root, "videos": videos, "index": index, "by_name": {Path(r.path).stem: r for r in index.records}}


@pytest.fixture()
def client(corpus: dict) -> Iterator[TestClient]:
    with TestClient(create_app(SyntheticSearcher(corpus["index"])), base_url=BASE_URL) as c:
        yield c


@pytest.fixture()
def auth_client(corpus: dict) -> Iterator[TestClient]:
    with TestClient(create_app(SyntheticSearcher(corpus["index"]), ServeConfig(token=TOKEN)), base_url=BASE_URL) as c:
        yield c


# ------------------------------------------------------------------------------------ endpoints
def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "videos": len(NAMES)}


def test_search_returns_ranked_json(client: TestClient, corpus: dict) -> None:
    body = client.get("/api/search", params={"q": "a blue square moving up", "k": 3}).json()
    assert body["query"] == "a blue square moving up" and body["k"] == 3 and body["took_ms"] >= 0
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["name"] == "blue_square_up.mp4"
    assert results[0]["id"] == corpus["by_name"]["blue_square_up"].id
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["media_url"] == f"/media/{results[0]['id']}"
    assert results[0]["thumb_url"] == f"/thumbs/{results[0]['id']}"
    assert {"path", "duration", "size", "stage_scores"} <= set(results[0])
    # The moment fields of the search JSON (the synthetic searcher's hits are whole videos: no span).
    assert {"rank", "score", "path", "video_id", "start", "end"} <= set(results[0])
    assert results[0]["video_id"] == results[0]["id"]
    all_results = client.get("/api/search", params={"q": "anything", "k": 100}).json()["results"]
    assert len(all_results) == len(NAMES)


def test_video_metadata(client: TestClient, corpus: dict) -> None:
    record = corpus["by_name"]["green_ring_down"]
    body = client.get(f"/api/videos/{record.id}").json()
    assert body["path"] == "videos/green_ring_down.mp4" and body["size"] == record.size and body["name"] == "green_ring_down.mp4"
    assert body["media_url"] == f"/media/{record.id}"
    assert_json_error(client.get("/api/videos/0123456789abcdef"), 404)
    assert_json_error(client.get("/api/videos/not-an-id"), 404)


def test_info_and_openapi_docs(client: TestClient, corpus: dict) -> None:
    info = client.get("/api/info").json()
    assert info["videos"] == len(NAMES) and info["max_k"] == 100
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/search", "/api/videos/{video_id}", "/api/info", "/media/{video_id}", "/thumbs/{video_id}",
                 "/healthz"):
        assert path in paths
    assert_json_error(client.get("/docs"), 404)  # off by default: it loads scripts from a CDN
    with TestClient(create_app(SyntheticSearcher(corpus["index"]), ServeConfig(docs=True)), base_url=BASE_URL) as c:
        docs = c.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert "cdn.jsdelivr.net" in docs.headers["content-security-policy"]


def test_web_page_and_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search-form"' in page.text and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/api/search" in script.text and ".innerHTML" not in script.text
    assert client.get("/static/style.css").status_code == 200


def test_thumbnail(client: TestClient, corpus: dict) -> None:
    record = corpus["by_name"]["red_circle_left"]
    response = client.get(f"/thumbs/{record.id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == corpus["index"].thumbnail(record.id) and response.content[:2] == b"\xff\xd8"
    assert_json_error(client.get("/thumbs/ffffffffffffffff"), 404)


# ------------------------------------------------------------------------------------- streaming
def test_media_full_and_head(client: TestClient, corpus: dict) -> None:
    record = corpus["by_name"]["yellow_cross_right"]
    data = Path(record.path).read_bytes()
    response = client.get(f"/media/{record.id}")
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"] == "video/mp4" and response.headers["accept-ranges"] == "bytes"
    head = client.head(f"/media/{record.id}")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(data)
    assert_json_error(client.get("/media/0000000000000000"), 404)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("bytes=10-19", (10, 20)), ("bytes=1000-", (1000, None)), ("bytes=-7", (-7, None)), ("bytes=0-0", (0, 1)),
     ("bytes=5-999999", (5, None))],
)
def test_media_single_range(client: TestClient, corpus: dict, header: str, expected: tuple) -> None:
    record = corpus["by_name"]["purple_triangle_still"]
    data = Path(record.path).read_bytes()
    response = client.get(f"/media/{record.id}", headers={"Range": header})
    part = data[expected[0]:expected[1]]
    assert response.status_code == 206 and response.content == part
    start = expected[0] % len(data)
    assert response.headers["content-range"] == f"bytes {start}-{start + len(part) - 1}/{len(data)}"
    assert int(response.headers["content-length"]) == len(part)


def test_media_multiple_ranges(client: TestClient, corpus: dict) -> None:
    record = corpus["by_name"]["red_circle_left"]
    data = Path(record.path).read_bytes()
    response = client.get(f"/media/{record.id}", headers={"Range": "bytes=0-3, 100-109"})
    assert response.status_code == 206 and response.headers["content-type"].startswith("multipart/byteranges")
    assert data[0:4] in response.content and data[100:110] in response.content
    assert f"bytes 100-109/{len(data)}".encode() in response.content


@pytest.mark.parametrize(("header", "status"), [
    ("bytes=999999-", 416), ("bytes=-0", 416), ("items=0-5", 400), ("bytes=abc", 400), ("bytes=9-2", 400),
    ("bytes=", 400), ("bytes=1-2,x", 400),
])
def test_media_bad_ranges(client: TestClient, corpus: dict, header: str, status: int) -> None:
    record = corpus["by_name"]["red_circle_left"]
    response = client.get(f"/media/{record.id}", headers={"Range": header})
    assert_json_error(response, status)
    if status == 416:
        assert response.headers["content-range"] == f"bytes */{record.size}"


def test_check_range_agrees_with_file_response_rules() -> None:
    check_range(None, 10)
    check_range("bytes=0-9", 10)
    check_range("bytes=-20", 10)  # a suffix longer than the file means the whole file
    for header in ("bytes=10-", "bytes=-0"):
        with pytest.raises(Exception, match="10 bytes"):
            check_range(header, 10)


def test_media_of_deleted_file(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "gone.mp4").write_bytes(b"soon deleted")
    build_index(tmp_path / "idx", tmp_path / "v", SyntheticExtractor(), progress=False)
    index = VideoIndex.load(tmp_path / "idx")
    (tmp_path / "v" / "gone.mp4").unlink()
    with TestClient(create_app(SyntheticSearcher(index)), base_url=BASE_URL) as c:
        assert_json_error(c.get(f"/media/{index.records[0].id}"), 404)


# ------------------------------------------------------------------------------------------ auth
def test_auth_required_with_token(auth_client: TestClient, corpus: dict) -> None:
    record = corpus["by_name"]["blue_square_up"]
    for url in ("/api/search?q=blue", f"/api/videos/{record.id}", "/api/info", f"/media/{record.id}",
                f"/thumbs/{record.id}"):
        response = auth_client.get(url)
        assert_json_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert_json_error(auth_client.get(url, headers={"Authorization": "Bearer wrong"}), 401)
        assert_json_error(auth_client.get(url, headers={"Authorization": f"Basic {TOKEN}"}), 401)
        assert auth_client.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # The page, its assets, the health check and the docs stay public (they reveal no data).
    for url in ("/", "/static/app.js", "/healthz", "/openapi.json"):
        assert auth_client.get(url).status_code == 200


def test_signed_media_urls(auth_client: TestClient, corpus: dict) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    hit = auth_client.get("/api/search", params={"q": "green ring", "k": 1}, headers=headers).json()["results"][0]
    assert "sig=" in hit["media_url"] and TOKEN not in hit["media_url"]
    # <img>/<video> cannot send headers: the signed URLs work on their own ...
    assert auth_client.get(hit["media_url"]).status_code == 200
    assert auth_client.get(hit["thumb_url"]).status_code == 200
    # ... but only for that file, that route and unmodified.
    other = corpus["by_name"]["red_circle_left"].id
    query = hit["media_url"].split("?", 1)[1]
    assert_json_error(auth_client.get(f"/media/{other}?{query}"), 401)
    assert_json_error(auth_client.get(f"/thumbs/{hit['id']}?{query}"), 401)
    tampered = hit["media_url"][:-1] + ("0" if hit["media_url"][-1] != "0" else "1")
    assert_json_error(auth_client.get(tampered), 401)
    signer = UrlSigner(TOKEN, ttl_s=60)
    expired = int(time.time()) - 5
    assert not signer.valid("media", hit["id"], str(expired), signer._mac("media", hit["id"], expired))
    stale_sig = signer._mac("media", hit["id"], expired)
    assert_json_error(auth_client.get(f"/media/{hit['id']}?exp={expired}&sig={stale_sig}"), 401)
    # A signature never works on the API.
    assert_json_error(auth_client.get(f"/api/videos/{hit['id']}?{query}"), 401)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("params", [
    {}, {"q": ""}, {"q": "   "}, {"q": "x" * 501}, {"q": "x" * 20000}, {"q": "cat", "k": 0}, {"q": "cat", "k": -3},
    {"q": "cat", "k": 101}, {"q": "cat", "k": "ten"}, {"q": "cat", "k": "1e9"},
])
def test_search_bad_input(client: TestClient, params: dict) -> None:
    body = assert_json_error(client.get("/api/search", params=params), 422)
    assert body["error"] == "invalid_request"


def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    assert_json_error(client.get("/nope"), 404)
    assert_json_error(client.post("/api/search?q=x"), 405)


# ------------------------------------------------------------------------------- real server tests
def raw_get(port: int, target: str, headers: str = "") -> tuple[int, bytes]:
    """Send ``target`` byte for byte (no client-side normalisation of ``..`` or escapes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


TRAVERSALS = [
    "/media/../secret.txt", "/media/../../../../etc/passwd", "/media/..%2F..%2F..%2Fetc%2Fpasswd",
    "/media/%2e%2e%2f%2e%2e%2fsecret.txt", "/media/%252e%252e%252fsecret.txt", "/media//etc/passwd",
    "/media/%2Fetc%2Fpasswd", "/media/..\\..\\secret.txt", "/thumbs/..%2f..%2fsecret.txt",
    "/thumbs/%2e%2e/%2e%2e/etc/passwd", "/api/videos/..%2F..%2Fetc%2Fpasswd", "/static/../secret.txt",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/media/{path}", "/static/..%2f..%2fapp.py",
    "/media/..%00/secret.txt", "/media/%c0%ae%c0%ae/secret.txt",
]


def test_path_traversal_is_impossible(corpus: dict) -> None:
    app = create_app(SyntheticSearcher(corpus["index"]))
    secret_abs = str(corpus["root"] / "secret.txt")
    with running_server(app) as port:
        for target in [*TRAVERSALS, f"/media/{secret_abs}", f"/media/{secret_abs.replace('/', '%2F')}",
                       f"/thumbs/{secret_abs}", f"/static/{secret_abs}"]:
            status, body = raw_get(port, target.replace("{path}", secret_abs))
            assert 400 <= status < 500, (target, status)
            assert body.startswith(b'{"error":'), (target, body[:80])
            assert b"root:" not in body and b"secret" not in body and b"SQLite" not in body, target
        # A huge query through the real HTTP stack is still a JSON 4xx, not a transport error.
        status, body = raw_get(port, "/api/search?q=" + "x" * 100_000)
        assert status == 422 and body.startswith(b'{"error":')
        # Sanity: the same raw client does fetch a real, indexed file.
        record = corpus["by_name"]["blue_square_up"]
        status, body = raw_get(port, f"/media/{record.id}")
        assert status == 200 and body == Path(record.path).read_bytes()


class BlockingSearcher(SyntheticSearcher):
    """A search that holds its worker thread until the test releases it, so that "a search is
    running" is a state the test controls rather than a race against a sleep."""

    def __init__(self, index: VideoIndex) -> None:
        super().__init__(index)
        self.entered = threading.Semaphore(0)  # one release per search that started
        self.release = threading.Event()

    def search(self, query: str, k: int = 10):
        self.entered.release()
        if not self.release.wait(timeout=120):  # never hang the suite if the test fails first
            raise TimeoutError("the test never released the search")
        return super().search(query, k)


def test_search_runs_off_the_event_loop(corpus: dict) -> None:
    """While a search runs, the server still answers other requests."""
    backend = BlockingSearcher(corpus["index"])
    app = create_app(backend)
    with running_server(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http, \
            ThreadPoolExecutor(1) as pool:
        try:
            slow = pool.submit(http.get, "/api/search", params={"q": "red"})
            assert backend.entered.acquire(timeout=120), "the search never started"
            # The search is still blocked: had it run on the event loop, this request could not be answered.
            assert http.get("/healthz").status_code == 200
            assert not slow.done()
        finally:
            backend.release.set()
        assert slow.result().status_code == 200


def test_burst_is_shed_with_503_not_crash(corpus: dict) -> None:
    """More concurrent searches than the gate allows: the excess get 503 + Retry-After, the rest succeed."""
    backend = BlockingSearcher(corpus["index"])
    app = create_app(backend, ServeConfig(max_pending=3))
    with running_server(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http, \
            ThreadPoolExecutor(12) as pool:
        try:
            admitted = [pool.submit(http.get, "/api/search", params={"q": f"ring {i}"}) for i in range(3)]
            wait_for(lambda: app.state.gate.pending == 3, "three searches to be admitted")
            # The gate is full while those three are held: a burst of nine more is refused at once.
            burst = [pool.submit(http.get, "/api/search", params={"q": f"ring {i}"}) for i in range(3, 12)]
            refused = [future.result() for future in burst]
            assert not any(future.done() for future in admitted)
        finally:
            backend.release.set()
        assert [future.result().status_code for future in admitted] == [200] * 3
        for response in refused:
            assert response.status_code == 503
            assert response.json()["error"] == "busy" and response.headers["retry-after"] == "1"
        wait_for(lambda: app.state.gate.pending == 0, "the gate to drain")  # memory does not grow with the burst
        # The server is healthy afterwards and serves searches again.
        assert http.get("/api/search", params={"q": "red"}).status_code == 200


# ----------------------------------------------------------------------------------------- config
def test_serve_config_validation() -> None:
    with pytest.raises(ValueError):
        ServeConfig(token="")
    with pytest.raises(ValueError):
        ServeConfig(max_pending=0)


def test_serve_command_defaults_to_loopback_and_reads_the_token(tmp_path: Path, monkeypatch) -> None:
    from diffusionret.cli import build_parser
    from diffusionret.commands.serve import (MAX_DEFAULT_WORKERS, TOKEN_ENV, _is_loopback, default_workers,
                                             resolve_token)

    args = build_parser().parse_args(["serve", "some-index"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.token is None
    # One torch thread per search (stable tail latency); search threads fill the usable cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert args.threads == 1 and args.workers is None  # resolved when the server starts
    assert default_workers(1) == max(1, min(MAX_DEFAULT_WORKERS, cores))
    assert default_workers(0) == 1  # torch's own threads already span every core
    assert default_workers(2) == max(1, min(MAX_DEFAULT_WORKERS, cores // 2))
    assert args.first_stage == "auto" and args.nprobe == 32
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(args) is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert resolve_token(args) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    args = build_parser().parse_args(["serve", "some-index", "--token-file", str(token_file)])
    assert resolve_token(args) == "from-file"
    token_file.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        resolve_token(args)
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.4") and not _is_loopback("example.org")
