"""``serve`` follows ``index update``: :class:`ReloadingBackend` swaps in the new contents once they settle."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffusionret.index.builder import build_index, update_index
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor, SyntheticSearcher
from diffusionret.serve.app import create_app
from diffusionret.serve.reload import ReloadingBackend, catalog_signature
from helpers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_videos(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / f"{name}.mp4").write_bytes(name.encode() * (8 + i))


def build(tmp_path: Path) -> tuple[Path, Path]:
    videos, root = tmp_path / "videos", tmp_path / "idx"
    write_videos(videos, ["red_circle", "blue_square", "green_ring"])
    build_index(root, videos, SyntheticExtractor(), progress=False)
    return videos, root


def opener(root: Path, calls: list[int] | None = None):
    def open_searcher() -> SyntheticSearcher:
        if calls is not None:
            calls.append(1)
        return SyntheticSearcher(VideoIndex.load(root))
    return open_searcher


def names(backend: ReloadingBackend) -> set[str]:
    return {Path(r.path).stem for r in backend.index.records}


def test_reloads_after_an_update_once_the_catalogue_has_settled(tmp_path: Path) -> None:
    videos, root = build(tmp_path)
    clock, calls = Clock(), []
    backend = ReloadingBackend(root, opener(root, calls), poll_s=1.0, settle_s=2.0, start=False, clock=clock)
    assert len(calls) == 1 and names(backend) == {"red_circle", "blue_square", "green_ring"}
    assert not backend.poll()  # nothing changed

    write_videos(videos, ["yellow_cross", "purple_star"])
    (videos / "green_ring.mp4").unlink()
    before = catalog_signature(root)
    update_index(root, SyntheticExtractor(), progress=False)
    assert catalog_signature(root) != before

    clock.now = 1.0
    assert not backend.poll()  # changed, but not yet settled: still the old contents
    assert names(backend) == {"red_circle", "blue_square", "green_ring"}
    clock.now = 2.5
    assert not backend.poll()  # 1.5 s since the change was first seen
    clock.now = 3.1
    assert backend.poll()
    assert names(backend) == {"red_circle", "blue_square", "yellow_cross", "purple_star"}
    assert backend.reloads == 1 and len(calls) == 2
    hits = backend.search("a purple star", k=4)
    assert {Path(h.path).stem for h in hits} == names(backend)
    clock.now = 10.0
    assert not backend.poll() and len(calls) == 2  # no change since: no reload


def test_a_failed_reload_keeps_serving_the_previous_index(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    videos, root = build(tmp_path)
    clock = Clock()
    broken = {"on": False}

    def open_searcher() -> SyntheticSearcher:
        if broken["on"]:
            raise RuntimeError("model file gone")
        return SyntheticSearcher(VideoIndex.load(root))

    backend = ReloadingBackend(root, open_searcher, poll_s=1.0, settle_s=0.0, start=False, clock=clock)
    write_videos(videos, ["yellow_cross"])
    update_index(root, SyntheticExtractor(), progress=False)
    broken["on"] = True
    clock.now = 1.0
    assert not backend.poll()
    assert "reloading the index" in caplog.text and "still serving the previous one" in caplog.text
    assert len(backend.index) == 3 and backend.search("red", k=1)
    assert backend.reloads == 0


def test_the_server_follows_the_index_and_stops_its_watcher(tmp_path: Path) -> None:
    videos, root = build(tmp_path)
    backend = ReloadingBackend(root, opener(root), poll_s=0.02, settle_s=0.05)
    with TestClient(create_app(backend), base_url="http://127.0.0.1") as client:
        assert client.get("/healthz").json()["videos"] == 3
        write_videos(videos, ["yellow_cross"])
        update_index(root, SyntheticExtractor(), progress=False)
        wait_for(lambda: client.get("/healthz").json()["videos"] == 4, "the server to pick up the update", interval=0.02)
        body = client.get("/api/search", params={"q": "a yellow cross", "k": 4}).json()
        assert "yellow_cross.mp4" in {r["name"] for r in body["results"]}
        assert client.get("/api/info").json()["reloads"] >= 1
    assert backend._thread is not None and not backend._thread.is_alive()  # the app's shutdown stopped it


def test_bad_intervals_are_refused(tmp_path: Path) -> None:
    _, root = build(tmp_path)
    with pytest.raises(ValueError, match="poll_s"):
        ReloadingBackend(root, opener(root), poll_s=0, start=False)
