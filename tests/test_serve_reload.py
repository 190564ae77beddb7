"""``serve`` follows ``index update``: :class:`ReloadingBackend` swaps in the new contents once an update has finished."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffusionret.index.builder import build_index, update_index
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor, SyntheticSearcher
from diffusionret.serve.app import create_app
from diffusionret.serve.reload import ReloadingBackend
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


def test_reloads_after_an_update_has_finished(tmp_path: Path) -> None:
    from diffusionret.serve.reload import commit_signature

    videos, root = build(tmp_path)
    clock, calls = Clock(), []
    backend = ReloadingBackend(root, opener(root, calls), poll_s=1.0, settle_s=2.0, start=False, clock=clock)
    assert len(calls) == 1 and names(backend) == {"red_circle", "blue_square", "green_ring"}
    assert not backend.poll()  # nothing changed

    write_videos(videos, ["yellow_cross", "purple_star"])
    (videos / "green_ring.mp4").unlink()
    before = commit_signature(root)
    update_index(root, SyntheticExtractor(), progress=False)
    assert commit_signature(root) != before

    clock.now = 1.0
    assert not backend.poll()  # within settle_s of the last (initial) load
    assert names(backend) == {"red_circle", "blue_square", "green_ring"}
    clock.now = 2.5
    assert backend.poll()
    assert names(backend) == {"red_circle", "blue_square", "yellow_cross", "purple_star"}
    assert backend.reloads == 1 and len(calls) == 2
    hits = backend.search("a purple star", k=4)
    assert {Path(h.path).stem for h in hits} == names(backend)
    clock.now = 10.0
    assert not backend.poll() and len(calls) == 2  # no change since: no reload
    update_index(root, SyntheticExtractor(), progress=False)  # nothing new: no new commit, no reload
    clock.now = 20.0
    assert not backend.poll() and len(calls) == 2


def test_no_reload_in_the_middle_of_an_update(tmp_path: Path) -> None:
    """A long update commits shard by shard; the server reloads once, when it has finished."""
    videos, root = build(tmp_path)
    clock, calls = Clock(), []
    backend = ReloadingBackend(root, opener(root, calls), poll_s=1.0, settle_s=0.0, start=False, clock=clock)
    write_videos(videos / "more", [f"video_{i}" for i in range(8)])
    seen_mid_update = []

    def poll_while_encoding(path: Path) -> None:
        clock.now += 100.0  # as if each shard took long
        seen_mid_update.append(backend.poll())

    update_index(root, SyntheticExtractor(on_video=poll_while_encoding), shard_size=2, progress=False)
    assert len(seen_mid_update) == 8 and not any(seen_mid_update) and backend.reloads == 0
    assert backend.poll() and len(backend.index) == 11 and len(calls) == 2


def test_reading_the_index_never_triggers_a_reload(tmp_path: Path) -> None:
    """Read-only SQLite opens create -wal/-shm files; they are not a change of the index."""
    _, root = build(tmp_path)
    clock, calls = Clock(), []
    backend = ReloadingBackend(root, opener(root, calls), poll_s=1.0, settle_s=0.0, start=False, clock=clock)
    for name in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        (root / name).unlink(missing_ok=True)
    for step in range(1, 4):
        index = VideoIndex.load(root)
        index.thumbnail(index.records[0].id)
        VideoIndex.read_info(root)
        clock.now = float(step)
        assert not backend.poll()
    assert backend.reloads == 0 and len(calls) == 1


def test_the_ann_file_is_committed_with_the_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload never happens between the last catalogue write and the ANN file (it would serve exact search)."""
    from helpers import require_faiss
    from diffusionret.index import builder
    from diffusionret.index.ann_build import AnnBuildConfig
    from diffusionret.index.first_stage import ann_path

    require_faiss()
    videos, root = build(tmp_path)
    ann = AnnBuildConfig(mode="on", kind="ivf", nlist=1)
    update_index(root, SyntheticExtractor(), progress=False, ann=ann)
    clock = Clock()
    backend = ReloadingBackend(root, opener(root), poll_s=1.0, settle_s=0.0, start=False, clock=clock)
    real_refresh = builder.refresh_ann
    polled = []

    def poll_then_refresh(*args, **kwargs):
        clock.now += 10.0
        polled.append(backend.poll())  # the catalogue is final here, the ANN file not yet written
        return real_refresh(*args, **kwargs)

    monkeypatch.setattr(builder, "refresh_ann", poll_then_refresh)
    write_videos(videos, ["yellow_cross"])
    update_index(root, SyntheticExtractor(), progress=False, ann=ann)
    assert polled == [False]
    clock.now += 10.0
    assert backend.poll() and len(backend.index) == 4
    assert ann_path(root, "ivf", backend.index.content_fingerprint).is_file()


def test_a_failed_reload_keeps_serving_and_is_retried_with_backoff(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    videos, root = build(tmp_path)
    clock = Clock()
    failures = {"left": 0}
    opened = []

    def open_searcher() -> SyntheticSearcher:
        opened.append(clock.now)
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("corrupted shard")
        return SyntheticSearcher(VideoIndex.load(root))

    backend = ReloadingBackend(root, open_searcher, poll_s=1.0, settle_s=0.0, start=False, clock=clock,
                               max_retry_s=4.0)
    write_videos(videos, ["yellow_cross"])
    update_index(root, SyntheticExtractor(), progress=False)
    failures["left"] = 4
    clock.now = 1.0
    assert not backend.poll()
    assert "reloading the index" in caplog.text and "still serving the previous one" in caplog.text
    assert len(backend.index) == 3 and backend.search("red", k=1)
    for now in (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 8.0, 11.0, 12.0, 15.0):
        clock.now = now
        backend.poll()
    # Tries at 1, then after 1, 2, 4 and 4 (the cap) seconds: the fifth succeeds.
    assert opened[1:] == [1.0, 2.0, 4.0, 8.0, 12.0]
    assert backend.reloads == 1 and backend.failed_reloads == 4 and len(backend.index) == 4


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
