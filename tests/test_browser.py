"""The web page in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

The page is served by uvicorn over loopback from an index of real mp4 clips (the demo renderer),
with synthetic features, so the browser sees real thumbnails and real video streaming. A screenshot
of the result grid is saved to ``$DIFFUSIONRET_ARTIFACTS`` (default ``tests/artifacts/``).

Requires ``apt-get install chromium`` and ``pip install playwright`` (``playwright install`` is not
needed: the system browser is used).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffusionret.demo.corpus import CorpusConfig, write_corpus
from diffusionret.index.builder import build_index
from diffusionret.index.store import VideoIndex
from diffusionret.serve.app import ServeConfig, create_app
from diffusionret.testing.index import SyntheticExtractor, SyntheticSearcher
from helpers import running_server

pytestmark = pytest.mark.slow  # a real browser against a real server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DIFFUSIONRET_ARTIFACTS", Path(__file__).parent / "artifacts"))
THUMBS_LOADED = "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Eight rendered demo clips, renamed after what they show (the synthetic features read names)."""
    root = tmp_path_factory.mktemp("browser")
    corpus = write_corpus(root / "demo", CorpusConfig(num_train=1, num_test=8, frame_size=64),
                          np.random.default_rng(3))
    videos = root / "videos"
    videos.mkdir()
    names = []
    for spec in corpus.test:
        name = f"{spec.colour}_{spec.shape}_{spec.motion}_on_{spec.background}"
        shutil.copy(corpus.video_dir / f"{spec.video_id}.mp4", videos / f"{name}.mp4")
        names.append(name)
    build_index(root / "idx", videos, SyntheticExtractor(decode_media=True), progress=False)
    return root / "idx", names



def _wait_until(page, expression: str, timeout: float = 60.0) -> None:
    """Poll a JS expression with ``page.evaluate``: the page's CSP forbids the ``eval`` that
    Playwright's string predicates in ``wait_for_function`` rely on."""
    import time

    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {expression}")
        page.wait_for_timeout(100)

def test_search_page_in_headless_chromium(clips: tuple[Path, list[str]]) -> None:
    from playwright.sync_api import sync_playwright

    index_dir, names = clips
    target = names[0]
    query = " ".join(target.split("_")[:3])  # colour, shape, motion
    app = create_app(SyntheticSearcher(VideoIndex.load(index_dir)))
    with running_server(app) as port, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#query", query)
            page.press("#query", "Enter")
            page.wait_for_selector(".card")
            cards = page.locator(".card")
            assert cards.count() == len(names)  # k=12 > 8 videos: all of them, ranked
            assert cards.first.locator(".name").inner_text() == f"{target}.mp4"
            assert cards.first.locator(".rank").inner_text() == "#1"
            assert "score" in cards.first.locator(".score").inner_text()
            assert "result" in page.locator("#status").inner_text()
            assert not page.locator("#token-form").is_visible()  # only shown after a 401
            assert cards.first.locator(".duration").inner_text() == "0:02"
            _wait_until(page, THUMBS_LOADED)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "browser_search.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")
            assert shot.stat().st_size > 10_000

            # Inline playback: the thumbnail becomes a <video> streamed from /media with Range requests.
            cards.first.locator(".play").click()
            page.wait_for_selector(".card video")
            _wait_until(page, "document.querySelector('.card video').readyState >= 1 || "
                              "document.querySelector('.card video').error !== null")
            state = page.evaluate("(() => { const v = document.querySelector('.card video');"
                                  " return {ready: v.readyState, error: v.error && v.error.code,"
                                  " duration: v.duration, src: v.currentSrc}; })()")
            assert state["error"] is None and state["ready"] >= 1, state
            assert state["duration"] == pytest.approx(2.0, abs=0.2)
            assert "/media/" in state["src"]
            assert page.url.endswith(f"?q={query.replace(' ', '+')}&k=12")
            assert errors == []
        finally:
            browser.close()


def test_page_asks_for_the_token(clips: tuple[Path, list[str]]) -> None:
    from playwright.sync_api import sync_playwright

    index_dir, names = clips
    app = create_app(SyntheticSearcher(VideoIndex.load(index_dir)), ServeConfig(token="let-me-in-with-a-long-token"))
    with running_server(app) as port, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/?q=red&k=24")  # the query in the URL runs at once
            page.wait_for_selector("#token-form:not([hidden])")
            assert "token" in page.locator("#status").inner_text()
            page.fill("#token", "let-me-in-with-a-long-token")
            page.click("#token-form button")
            page.wait_for_selector(".card")
            assert page.locator(".card").count() == len(names)
            # Thumbnails load through signed URLs (an <img> cannot send the bearer token).
            _wait_until(page, THUMBS_LOADED)
        finally:
            browser.close()


class _MomentSearcher(SyntheticSearcher):
    """Synthetic hits shifted to the moment [1.0, 1.75] s of each 2 s clip (as a segment hit would be)."""

    def search(self, query: str, k: int = 10) -> list:
        import dataclasses

        return [dataclasses.replace(hit, start=1.0, end=1.75) for hit in super().search(query, k)]


def test_player_starts_at_the_moment(clips: tuple[Path, list[str]]) -> None:
    from playwright.sync_api import sync_playwright

    index_dir, names = clips
    app = create_app(_MomentSearcher(VideoIndex.load(index_dir)))
    with running_server(app) as port, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/?q=red&k=3")
            page.wait_for_selector(".card")
            first = page.locator(".card").first
            assert first.locator(".moment").inner_text() == "0:01–0:02"
            first.locator(".play").click()
            page.wait_for_selector(".card video")
            _wait_until(page, "document.querySelector('.card video').readyState >= 1 || "
                              "document.querySelector('.card video').error !== null")
            state = page.evaluate("(() => { const v = document.querySelector('.card video');"
                                  " return {error: v.error && v.error.code, t: v.currentTime, src: v.currentSrc}; })()")
            assert state["error"] is None, state
            assert state["src"].endswith("#t=1.000,1.750"), state
            assert 0.95 <= state["t"] <= 2.0, f"the player starts at the moment, not at 0: {state}"
            assert errors == []
        finally:
            browser.close()
