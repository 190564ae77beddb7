"""Hardening of the HTTP service (issue 12): each test is a crafted input or a swap that the service refuses.

DNS rebinding (Host allowlist), crafted signed-URL parameters and Range headers, swapped or changed
media files, the URL-signing key, token strength, failed-login limits, the tokenizer's cache, CSP,
paths in answers, If-Range, search timeouts and slow clients.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import sqlite3
import threading
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusionret.index.builder import build_index
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor, SyntheticSearcher
from diffusionret.serve.app import ApiError, ServeConfig, UrlSigner, check_range, create_app
from helpers import assert_json_error, running_server, wait_for

TOKEN = "correct-horse-battery-staple"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
LOCAL = "http://127.0.0.1"
NAMES = ["red_circle", "blue_square", "green_ring"]


@pytest.fixture()
def corpus(tmp_path: Path) -> dict:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, name in enumerate(NAMES):
        (videos / f"{name}.mp4").write_bytes(bytes(range(256)) * (4 + i))
    (tmp_path / "secret.txt").write_bytes(b"S" * (256 * 4))  # the size of red_circle.mp4
    build_index(tmp_path / "idx", videos, SyntheticExtractor(), progress=False)
    index = VideoIndex.load(tmp_path / "idx")
    return {"root": tmp_path, "videos": videos, "index": index, "by_name": {Path(r.path).stem: r for r in index.records}}


def client_for(corpus: dict, config: ServeConfig | None = None, base_url: str = LOCAL, **kwargs: Any) -> TestClient:
    # raise_server_exceptions=False: a crash must show as the 500 a real client gets, not as a test error.
    return TestClient(create_app(SyntheticSearcher(corpus["index"]), config, **kwargs), base_url=base_url,
                      raise_server_exceptions=False)


# ------------------------------------------------------------------------------- 2: DNS rebinding
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil",
                                  "192.168.1.4:8000", "", "[::2]:8000"])
def test_a_foreign_host_header_is_refused(corpus: dict, host: str) -> None:
    record = corpus["by_name"]["red_circle"]
    with client_for(corpus) as client:
        for url in ("/", "/healthz", "/api/search?q=red", f"/api/videos/{record.id}", f"/media/{record.id}",
                    "/static/app.js", "/openapi.json"):
            response = client.get(url, headers={"Host": host})
            assert_json_error(response, 400)
            assert str(corpus["root"]) not in response.text


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:8000", "[::1]",
                                  "[::1]:8000", "LOCALHOST:1"])
def test_loopback_host_headers_are_answered(corpus: dict, host: str) -> None:
    with client_for(corpus) as client:
        assert client.get("/api/search", params={"q": "red"}, headers={"Host": host}).status_code == 200


def test_allowed_hosts_can_be_added_or_the_check_turned_off(corpus: dict) -> None:
    with client_for(corpus, ServeConfig(allowed_hosts=("localhost", "search.lan", "fe80::1"))) as client:
        assert client.get("/healthz", headers={"Host": "search.lan:8000"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "[fe80::1]:8000"}).status_code == 200
        assert_json_error(client.get("/healthz", headers={"Host": "127.0.0.1"}), 400)
    with client_for(corpus, ServeConfig(allowed_hosts=("*",))) as client:
        assert client.get("/healthz", headers={"Host": "anything.example"}).status_code == 200


def test_serve_command_builds_the_allowlist() -> None:
    from diffusionret.cli import build_parser
    from diffusionret.commands.serve import allowed_hosts

    args = build_parser().parse_args(["serve", "idx", "--allowed-host", "search.lan", "--allowed-host", "10.0.0.2"])
    assert args.allowed_host == ["search.lan", "10.0.0.2"]
    assert allowed_hosts("127.0.0.1", []) == ("localhost", "127.0.0.1", "[::1]")
    assert allowed_hosts("0.0.0.0", []) == ("localhost", "127.0.0.1", "[::1]")  # a wildcard is no name
    assert allowed_hosts("192.168.1.4", args.allowed_host) == (
        "localhost", "127.0.0.1", "[::1]", "192.168.1.4", "search.lan", "10.0.0.2")


# ----------------------------------------------------------------- 4: crafted parameters, no 500
CRAFTED_SIGNED = [
    {"exp": "²", "sig": "0" * 64}, {"exp": "9" * 5000, "sig": "0" * 64}, {"exp": "٣٣٣٣٣٣٣٣٣٣", "sig": "0" * 64},
    {"exp": "4102444800", "sig": "é" * 64}, {"exp": "4102444800", "sig": "\uff10" * 64},
    {"exp": "4102444800", "sig": "x"}, {"exp": "-1", "sig": "0" * 64}, {"exp": "", "sig": ""}, {"sig": "0" * 64},
]


@pytest.mark.parametrize("params", CRAFTED_SIGNED)
def test_crafted_signed_url_parameters_are_a_clean_401(corpus: dict, params: dict,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    record = corpus["by_name"]["red_circle"]
    with caplog.at_level(logging.DEBUG), client_for(corpus, ServeConfig(token=TOKEN)) as client:
        for kind in ("media", "thumbs"):
            assert_json_error(client.get(f"/{kind}/{record.id}", params=params), 401)
    assert "Traceback" not in caplog.text and "Exception" not in caplog.text


# Header bytes reach the app decoded as latin-1, so b"\xb2" is the "²" that `str.isdigit` accepts. Sent
# over a raw socket: httpx and the TestClient would re-encode the header as UTF-8.
CRAFTED_RANGES = {"superscript-start": b"bytes=\xb2-", "superscript-end": b"bytes=0-\xb2",
                  "superscript-suffix": b"bytes=-\xb2", "5000-digit-start": b"bytes=" + b"9" * 5000 + b"-",
                  "5000-digit-suffix": b"bytes=-" + b"9" * 5000, "100-parts": b"bytes=" + b"0-1," * 100}


def test_crafted_range_headers_are_a_clean_400(corpus: dict, caplog: pytest.LogCaptureFixture) -> None:
    record = corpus["by_name"]["red_circle"]
    app = create_app(SyntheticSearcher(corpus["index"]))
    with caplog.at_level(logging.INFO), running_server(app, lambda port: uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None)) as port:
        for name, header in CRAFTED_RANGES.items():
            for if_range in (b"", b'If-Range: "nope"\r\n'):
                status, body = raw_request(port, f"/media/{record.id}".encode(), b"Range: " + header + b"\r\n" + if_range)
                assert status == 400 and body.startswith(b'{"error":"invalid_range"'), (name, if_range, status, body)
    assert "Traceback" not in caplog.text and "Exception" not in caplog.text


def raw_request(port: int, target: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(st.text(max_size=60), st.from_regex(r"bytes=[0-9²٣\-, ]{0,30}", fullmatch=True)),
       size=st.integers(min_value=0, max_value=10_000))
def test_check_range_is_total(header: str, size: int) -> None:
    """Any header: a list of in-bounds ranges, or a 400/416 ApiError; never another exception."""
    try:
        ranges = check_range(header, size)
    except ApiError as exc:
        assert exc.status in (400, 416)
        return
    assert ranges is not None and ranges
    for start, stop in ranges:
        assert 0 <= start < stop <= size


@settings(max_examples=300, deadline=None)
@given(expires=st.one_of(st.none(), st.text(max_size=30), st.integers(min_value=-10, max_value=10**13).map(str)),
       signature=st.one_of(st.none(), st.text(max_size=70), st.text("0123456789abcdef", min_size=64, max_size=64)))
def test_url_signature_check_is_total(expires: str | None, signature: str | None) -> None:
    assert UrlSigner(TOKEN, ttl_s=60).valid("media", "0123456789abcdef", expires, signature) is False


# ---------------------------------------------------------------------- 5: swapped media files
def _swap_for_symlink(record_path: Path, target: Path, record: Any) -> None:
    os.utime(target, ns=(record.mtime_ns, record.mtime_ns))  # a swap that keeps size and mtime
    record_path.unlink()
    record_path.symlink_to(target)


def test_media_does_not_follow_a_symlink_swapped_in(corpus: dict) -> None:
    record = corpus["by_name"]["red_circle"]
    secret = corpus["root"] / "secret.txt"
    assert secret.stat().st_size == record.size
    _swap_for_symlink(Path(record.path), secret, record)
    with client_for(corpus) as client:
        response = client.get(f"/media/{record.id}")
        assert_json_error(response, 404)
        assert b"SSSS" not in response.content
        assert_json_error(client.get(f"/media/{record.id}", headers={"Range": "bytes=0-9"}), 404)


def test_media_does_not_follow_a_symlinked_folder(corpus: dict) -> None:
    record = corpus["by_name"]["blue_square"]
    videos, moved = corpus["videos"], corpus["root"] / "elsewhere"
    videos.rename(moved)
    videos.symlink_to(moved, target_is_directory=True)  # the same bytes, reached through a symlink now
    with client_for(corpus) as client:
        assert_json_error(client.get(f"/media/{record.id}"), 404)


def test_media_refuses_a_file_that_changed_since_it_was_indexed(corpus: dict) -> None:
    record = corpus["by_name"]["green_ring"]
    path = Path(record.path)
    path.write_bytes(b"other bytes entirely")
    with client_for(corpus) as client:
        body = assert_json_error(client.get(f"/media/{record.id}"), 409)
        assert "index update" in body["detail"]
        # Same size, other mtime: changed too.
        path.write_bytes(bytes(range(256)) * 6)
        os.utime(path, ns=(record.mtime_ns + 10**9, record.mtime_ns + 10**9))
        assert_json_error(client.get(f"/media/{record.id}"), 409)
        # Put back as indexed: served again.
        os.utime(path, ns=(record.mtime_ns, record.mtime_ns))
        response = client.get(f"/media/{record.id}")
        assert response.status_code == 200 and response.content == bytes(range(256)) * 6


def test_media_refuses_a_fifo_without_hanging(corpus: dict) -> None:
    record = corpus["by_name"]["red_circle"]
    path = Path(record.path)
    path.unlink()
    os.mkfifo(path)
    with client_for(corpus) as client:
        assert_json_error(client.get(f"/media/{record.id}"), 404)


def test_load_ignores_rows_pointing_at_unregistered_shards(corpus: dict) -> None:
    """A catalogue row naming a shard file that no shard entry registered (or a path) is not read."""
    root = corpus["root"] / "idx"
    registered = sorted((root / "shards").iterdir())[0]
    (root / "shards" / "planted.safetensors").write_bytes(registered.read_bytes())
    victim = corpus["by_name"]["blue_square"]
    with sqlite3.connect(root / "catalog.sqlite") as conn:
        conn.execute("UPDATE videos SET shard = ? WHERE id = ?", ("planted.safetensors", victim.id))
        conn.execute("UPDATE videos SET shard = ? WHERE id = ?",
                     (f"../shards/{registered.name}", corpus["by_name"]["red_circle"].id))
    conn.close()
    index = VideoIndex.load(root)
    assert {Path(r.path).stem for r in index.records} == {"green_ring"}


# ------------------------------------------------- 6: signing key, token strength, failed logins
def test_signed_urls_are_not_keyed_by_the_token(corpus: dict) -> None:
    with client_for(corpus, ServeConfig(token=TOKEN)) as client:
        hit = client.get("/api/search", params={"q": "red", "k": 1}, headers=BEARER).json()["results"][0]
        query = dict(part.split("=", 1) for part in hit["media_url"].split("?", 1)[1].split("&"))
        with_token = hmac.new(TOKEN.encode(), f"media:{hit['id']}:{query['exp']}".encode(), hashlib.sha256).hexdigest()
        assert query["sig"] != with_token  # a leaked URL gives no offline oracle for the token
        assert client.get(hit["media_url"]).status_code == 200


@pytest.mark.parametrize("token", ["x", "hunter2", "fifteen-chars!!"])
def test_short_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        ServeConfig(token=token)


def test_serve_command_refuses_a_short_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from diffusionret.cli import build_parser

    token_file = tmp_path / "token"
    token_file.write_text("hunter2\n")
    args = build_parser().parse_args(["serve", str(tmp_path / "no-index"), "--token-file", str(token_file)])
    with caplog.at_level(logging.ERROR):
        assert args.func(args) == 2
    assert "at least 16 characters" in caplog.text


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_authentications_are_rate_limited(corpus: dict) -> None:
    clock = FakeClock()
    config = ServeConfig(token=TOKEN, auth_failures_per_minute=6, auth_failure_burst=5)
    record = corpus["by_name"]["red_circle"]
    with client_for(corpus, config, clock=clock) as client:
        for _ in range(10):  # no credential at all: not a guess, never limited
            assert_json_error(client.get("/api/info"), 401)
        for i in range(5):
            assert_json_error(client.get("/api/info", headers={"Authorization": f"Bearer guess-{i}"}), 401)
        # Out of attempts: refused before the token is even compared, the right one included.
        for headers in ({"Authorization": "Bearer guess-5"}, BEARER):
            response = client.get("/api/info", headers=headers)
            assert_json_error(response, 429)
            assert int(response.headers["retry-after"]) >= 1
        assert_json_error(client.get(f"/media/{record.id}", params={"exp": "4102444800", "sig": "0" * 64}), 429)
        clock.now += 10  # one attempt back every 10 s
        assert client.get("/api/info", headers=BEARER).status_code == 200
        assert_json_error(client.get("/api/info", headers={"Authorization": "Bearer guess-6"}), 401)
        assert_json_error(client.get("/api/info", headers={"Authorization": "Bearer guess-7"}), 429)
        clock.now += 60
        assert client.get("/api/info", headers=BEARER).status_code == 200


def test_the_failure_limiter_remembers_a_bounded_number_of_clients() -> None:
    from diffusionret.serve.security import FailureLimiter

    limiter = FailureLimiter(per_minute=1, burst=1, clock=FakeClock(), max_clients=100)
    for i in range(10_000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    assert limiter.retry_after("10.0.39.15") > 0 and limiter.retry_after("10.0.0.0") == 0  # the oldest forgotten


# ------------------------------------------------------------------------- 7: tokenizer memory
def test_the_bpe_cache_stays_bounded_under_unique_words() -> None:
    from diffusionret.tokenizer import _clip_bpe, encode, tokenize

    def cached_words() -> int:
        bpe = _clip_bpe()
        return len(bpe.cache) + (len(bpe.bpe) if hasattr(bpe.bpe, "__len__") else 0)

    def word(i: int) -> str:  # letters only: digits are BPE words of their own
        return "zq" + "".join(chr(ord("a") + i // 26**j % 26) for j in range(4))

    def unique_queries(start: int, count: int) -> Iterator[str]:
        for i in range(start, start + count):
            yield f"a {word(i)} video"  # one word never seen before per query

    encode("load the tokenizer before tracing")  # loading open_clip under tracemalloc takes a minute
    tracemalloc.start()  # before the cache fills: the evicted entries' memory must be seen being freed
    try:
        for query in unique_queries(0, 6_000):
            encode(query)  # what `tokenize` (and so every search) runs per text
        bound = cached_words()
        assert bound <= 5_000
        before = tracemalloc.get_traced_memory()[0]
        for query in unique_queries(6_000, 6_000):
            encode(query)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cached_words() <= bound
    assert grown < 256 * 1024, grown  # 6,000 more cached words would be ~1 MB
    # An evicted word still tokenises as open_clip's own tokenizer does.
    from open_clip.tokenizer import SimpleTokenizer

    expected = SimpleTokenizer().encode(f"a {word(5)} video")
    assert tokenize(f"a {word(5)} video")[0][0, 1:1 + len(expected)].tolist() == expected


# --------------------------------------------------------------------------------- Low items
def test_every_html_response_has_a_strict_csp_and_docs_are_off(corpus: dict) -> None:
    with client_for(corpus) as client:
        for url in ("/", "/static/index.html"):
            response = client.get(url)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in response.headers["content-security-policy"]
            assert "script-src 'self';" in response.headers["content-security-policy"]
        assert_json_error(client.get("/docs"), 404)
        assert_json_error(client.get("/redoc"), 404)
        assert client.get("/openapi.json").status_code == 200
        for response in (client.get("/api/search", params={"q": "red"}), client.get("/"), client.get("/docs")):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
        assert "content-security-policy" not in client.get("/api/search", params={"q": "red"}).headers


class DescribedSearcher(SyntheticSearcher):
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_path": "/home/ana/private/models/stage2.pt"}


def test_answers_carry_paths_relative_to_the_sources(corpus: dict) -> None:
    root = str(corpus["root"])
    for show, expected in ((False, "videos/red_circle.mp4"), (True, str(corpus["videos"] / "red_circle.mp4"))):
        app = create_app(DescribedSearcher(corpus["index"]), ServeConfig(show_paths=show))
        with TestClient(app, base_url=LOCAL) as client:
            results = client.get("/api/search", params={"q": "red", "k": 3}).json()["results"]
            video = client.get(f"/api/videos/{corpus['by_name']['red_circle'].id}").json()
            info = client.get("/api/info").json()
        assert video["path"] == expected
        if not show:
            assert all(root not in r["path"] and r["path"].startswith("videos/") for r in results)
            assert info["model_path"] == "stage2.pt"
        else:
            assert info["model_path"] == "/home/ana/private/models/stage2.pt"


def test_if_range_is_validated_and_honoured(corpus: dict) -> None:
    record = corpus["by_name"]["red_circle"]
    data = Path(record.path).read_bytes()
    with client_for(corpus) as client:
        head = client.head(f"/media/{record.id}")
        etag, modified = head.headers["etag"], head.headers["last-modified"]
        for validator in (etag, modified):  # matches: the range is served
            response = client.get(f"/media/{record.id}", headers={"Range": "bytes=0-9", "If-Range": validator})
            assert response.status_code == 206 and response.content == data[:10]
        for stale in ('"0-0"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT", "garbage"):  # no match: whole file
            response = client.get(f"/media/{record.id}", headers={"Range": "bytes=0-9", "If-Range": stale})
            assert response.status_code == 200 and response.content == data
        for bad, status in (("bytes=9-2", 400), ("bytes=999999-", 416), ("items=0-1", 400)):
            assert_json_error(client.get(f"/media/{record.id}", headers={"Range": bad, "If-Range": etag}), status)


class BlockingSearcher(SyntheticSearcher):
    """A search that hangs until the test releases it."""

    def __init__(self, index: VideoIndex) -> None:
        super().__init__(index)
        self.release = threading.Event()

    def search(self, query: str, k: int = 10):
        if query == "hang":
            self.release.wait(timeout=60)
        return super().search(query, k)


def test_a_hung_search_times_out_and_healthz_says_degraded(corpus: dict) -> None:
    backend = BlockingSearcher(corpus["index"])
    app = create_app(backend, ServeConfig(search_timeout_s=0.2, workers=1))
    with TestClient(app, base_url=LOCAL) as client:
        try:
            assert client.get("/healthz").json()["status"] == "ok"
            body = assert_json_error(client.get("/api/search", params={"q": "hang"}), 504)
            assert body["error"] == "search_timeout"
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
            assert health.json()["stuck_searches"] == 1
            assert app.state.gate.pending == 1  # the stuck thread keeps its slot
        finally:
            backend.release.set()
        wait_for(lambda: client.get("/healthz").status_code == 200, "healthz to recover")
        assert app.state.gate.pending == 0 and app.state.gate.stuck == 0
        assert client.get("/api/search", params={"q": "red"}).status_code == 200


def test_a_slow_client_is_disconnected_before_it_sends_its_headers(corpus: dict) -> None:
    from diffusionret.serve.server import ServerLimits, uvicorn_config

    app = create_app(SyntheticSearcher(corpus["index"]))
    limits = ServerLimits(header_timeout_s=0.5)
    with running_server(app, lambda port: uvicorn_config(app, "127.0.0.1", port, limits, log_config=None)) as port:
        # A well-behaved client is served, and its keep-alive connection may then not dawdle either.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert _trickle_until_closed(sock, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert _trickle_until_closed(sock, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        # A request head that keeps growing is refused once it passes the limit (memory per connection).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40_000)
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")


def _trickle_until_closed(sock: socket.socket, start: bytes, max_bytes: int = 400) -> bool:
    """Send ``start`` then one header byte every 50 ms (each resets uvicorn's idle timer); True once the server closes."""
    sock.settimeout(0.05)
    try:
        sock.sendall(start)
        for _ in range(max_bytes):
            try:
                if sock.recv(65536) == b"":
                    return True
            except socket.timeout:
                pass
            sock.sendall(b"a")
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def test_serve_command_wires_the_limits_into_app_and_server(corpus: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusionret.commands.serve as serve_command
    from diffusionret.cli import build_parser

    started: dict[str, Any] = {}
    monkeypatch.setattr(serve_command, "open_searcher", lambda args: SyntheticSearcher(corpus["index"]))
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: started.setdefault("config", server.config))
    monkeypatch.delenv(serve_command.TOKEN_ENV, raising=False)
    args = build_parser().parse_args([
        "serve", str(corpus["root"] / "idx"), "--reload-interval", "0", "--host", "192.168.1.4", "--allowed-host",
        "search.lan", "--show-paths", "--search-timeout", "7", "--header-timeout", "3", "--max-connections", "9",
        "--forwarded-allow-ips", "10.0.0.7"])
    assert args.func(args) == 0
    config = started["config"]
    assert (config.host, config.limit_concurrency, config.timeout_keep_alive) == ("192.168.1.4", 9, 5)
    assert config.forwarded_allow_ips == "10.0.0.7" and config.proxy_headers
    app = config.app
    assert app.state.config.allowed_hosts == ("localhost", "127.0.0.1", "[::1]", "192.168.1.4", "search.lan")
    assert app.state.config.show_paths and app.state.config.search_timeout_s == 7.0 and not app.state.config.docs
    assert app.state.config.workers == serve_command.default_workers(1)  # --workers unset: fill the cores
    with TestClient(app, base_url="http://search.lan:8000") as client:
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("trusted", ["127.0.0.1", ""])
def test_failed_logins_count_per_forwarded_client_behind_a_trusted_proxy(corpus: dict, trusted: str) -> None:
    """A reverse proxy on a trusted address: each client behind it has its own failure budget;
    from an untrusted sender X-Forwarded-For is ignored (one budget for the sender, not a way around it)."""
    import httpx

    from diffusionret.serve.server import uvicorn_config

    app = create_app(SyntheticSearcher(corpus["index"]),
                     ServeConfig(token=TOKEN, auth_failures_per_minute=1, auth_failure_burst=2))
    def make(port: int) -> uvicorn.Config:
        return uvicorn_config(app, "127.0.0.1", port, log_level="warning", forwarded_allow_ips=trusted)

    with running_server(app, make) as port:
        def guess(client_ip: str) -> int:
            headers = {"Authorization": "Bearer wrong-guess", "X-Forwarded-For": client_ip}
            return httpx.get(f"http://127.0.0.1:{port}/api/info", headers=headers, timeout=30).status_code

        assert [guess("203.0.113.5") for _ in range(3)] == [401, 401, 429]
        assert guess("203.0.113.6") == (401 if trusted else 429)


def test_a_dropped_download_releases_its_file(tmp_path: Path) -> None:
    """A player that seeks drops its connection mid-file: the server stops reading and closes the file."""
    videos = tmp_path / "videos"
    videos.mkdir()
    big = videos / "long.mp4"
    big.write_bytes(os.urandom(1 << 16) * 256)  # 16 MB: far more than the socket buffers hold
    build_index(tmp_path / "idx", videos, SyntheticExtractor(), progress=False)
    index = VideoIndex.load(tmp_path / "idx")

    def open_copies() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(big) for fd in os.listdir("/proc/self/fd"))

    with running_server(create_app(SyntheticSearcher(index))) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET /media/{index.records[0].id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            wait_for(lambda: open_copies() == 1, "the server to open the file")
        wait_for(lambda: open_copies() == 0, "the server to close the file of a dropped download")
