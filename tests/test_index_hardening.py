"""Index safety: hostile corpora, refusing silent mass deletion, kills at random points, file hygiene.

The hostile corpus goes through the real decoder and a tiny random model (``index build`` in a
subprocess, so a hang is a bounded failure); everything else uses the synthetic extractor.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from helpers import (
    assert_same_index,
    hostile_corpus,
    make_videos,
    run_cli,
    save_tiny_model,
    shard_consistency,
    write_tiny_video,
)
from diffusionret.index import builder, catalog
from diffusionret.index.shards import SHARD_DIR
from diffusionret.index.builder import build_index, update_index
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


# ------------------------------------------------------------------------------ hostile corpus
@pytest.mark.slow  # starts processes
def test_hostile_corpus_is_indexed_reported_and_not_retried(tmp_path: Path, tiny_model: Path) -> None:
    decodable, broken = hostile_corpus(tmp_path / "videos")
    index_dir = tmp_path / "idx"
    command = [sys.executable, "-m", "diffusionret", "index", "build", "--model", str(tiny_model), "--videos",
               str(tmp_path / "videos"), "--out", str(index_dir), "--frames", "2", "--fps", "1", "--batch-size", "4",
               "--no-progress", "--decode-timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("5 videos indexed: 5 added, 0 re-encoded, 0 removed, 0 unchanged, 4 failed")
    for path in broken:  # the build report names every bad file with its reason
        assert f"failed: {path.resolve()}: " in result.stdout

    index = VideoIndex.load(index_dir)
    assert sorted(r.path for r in index.records) == sorted(str(p.resolve()) for p in decodable)
    lying = index.record(catalog.video_id(str((tmp_path / "videos" / "lying_136_years.mkv").resolve())))
    assert lying is not None and lying.duration is not None and lying.duration < 10  # what decodes, not the header

    code, out, _ = run_cli(["index", "info", str(index_dir), "--json"])
    failed = {Path(f["path"]).name: f["error"] for f in json.loads(out)["failed_files"]}
    assert code == 0 and set(failed) == {p.name for p in broken}
    assert "empty file" in failed["zero_bytes.mp4"] and "truncated" in failed["truncated.mkv"]
    assert "not a readable video" in failed["notes.mp4"]
    code, out, _ = run_cli(["index", "info", str(index_dir)])
    assert f"failed  {(tmp_path / 'videos' / 'notes.mp4').resolve()}: not a readable video" in out

    # Unchanged bad files are not decoded again...
    code, out, _ = run_cli(["index", "update", str(index_dir), "--no-progress"])
    assert code == 0 and out.startswith("5 videos indexed: 0 added, 0 re-encoded, 0 removed, 9 unchanged, 0 failed")
    # ... unless asked to.
    code, out, _ = run_cli(["index", "update", str(index_dir), "--no-progress", "--retry-failed"])
    assert code == 0 and out.startswith("5 videos indexed: 0 added, 0 re-encoded, 0 removed, 5 unchanged, 4 failed")


# ------------------------------------------------------------------------- silent mass deletion
def _info(root: Path) -> dict:
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        return catalog.read_info(conn)


def test_update_with_other_sources_needs_prune(tmp_path: Path) -> None:
    make_videos(tmp_path / "videos", 12)
    make_videos(tmp_path / "other", 3, start=50)
    root = tmp_path / "idx"
    build_index(root, tmp_path / "videos", SyntheticExtractor(), progress=False)
    sources = _info(root)["sources"]

    with pytest.raises(builder.PruneRefusedError, match="refusing to remove 12 videos") as refused:
        update_index(root, SyntheticExtractor(), tmp_path / "other", progress=False)
    assert len(refused.value.paths) == 12 and str(refused.value.paths[0]) in str(refused.value)
    assert len(VideoIndex.load(root)) == 12 and _info(root)["sources"] == sources  # nothing changed

    with pytest.raises(builder.PruneRefusedError):  # `index build` into it with other sources: the same
        build_index(root, tmp_path / "other", SyntheticExtractor(), progress=False)
    assert len(VideoIndex.load(root)) == 12 and _info(root)["sources"] == sources

    report = update_index(root, SyntheticExtractor(), tmp_path / "other", progress=False, prune=True)
    assert (report.removed, report.total) == (12, 3)
    assert _info(root)["sources"] == [str((tmp_path / "other").resolve())]


@pytest.mark.slow  # starts processes
def test_cli_refusal_exits_non_zero_and_says_what_would_go(tmp_path: Path, tiny_model: Path) -> None:
    for i in range(6):
        write_tiny_video(tmp_path / "videos" / f"clip_{i}.mp4", frames=3)
    write_tiny_video(tmp_path / "elsewhere" / "other.mp4", frames=3)
    root = tmp_path / "idx"
    code, _, err = run_cli(["index", "build", "--model", str(tiny_model), "--videos", str(tmp_path / "videos"),
                            "--out", str(root), "--frames", "2", "--no-progress", "--decode-workers", "1"])
    assert code == 0, err
    code, out, err = run_cli(["index", "update", str(root), "--videos", str(tmp_path / "elsewhere"), "--no-progress",
                              "--decode-workers", "1"])
    assert code != 0 and out == ""
    assert "refusing to remove 6 videos" in err and "--prune" in err
    assert str((tmp_path / "videos" / "clip_0.mp4").resolve()) in err  # a few of the paths
    assert len(VideoIndex.load(root)) == 6 and _info(root)["sources"] == [str((tmp_path / "videos").resolve())]
    code, out, err = run_cli(["index", "update", str(root), "--videos", str(tmp_path / "elsewhere"), "--no-progress",
                              "--decode-workers", "1", "--prune"])
    assert code == 0 and out.startswith("1 videos indexed: 1 added, 0 re-encoded, 6 removed"), err


def test_each_source_is_checked_on_its_own(tmp_path: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "mount"
    make_videos(big, 40)
    make_videos(small, 2, start=60)
    root = tmp_path / "idx"
    build_index(root, [big, small], SyntheticExtractor(), progress=False)
    for path in small.rglob("*.mp4"):  # the disk is not mounted: an empty folder
        path.unlink()
    with pytest.raises(FileNotFoundError, match=f"no videos found in {small.resolve()}"):
        update_index(root, SyntheticExtractor(), progress=False)
    assert len(VideoIndex.load(root)) == 42
    # Only 2 of 42 (5 %), but every video of one source: still refused.
    elsewhere = tmp_path / "elsewhere"
    make_videos(elsewhere, 1, start=70)
    with pytest.raises(builder.PruneRefusedError, match="every video under the source"):
        update_index(root, SyntheticExtractor(), [big, elsewhere], progress=False)
    assert len(VideoIndex.load(root)) == 42
    report = update_index(root, SyntheticExtractor(), progress=False, prune=True)
    assert (report.removed, report.total) == (2, 40)


def test_a_few_removals_need_no_prune(tmp_path: Path) -> None:
    paths = make_videos(tmp_path / "videos", 30)
    root = tmp_path / "idx"
    build_index(root, tmp_path / "videos", SyntheticExtractor(), progress=False)
    for path in paths[:3]:
        path.unlink()
    assert update_index(root, SyntheticExtractor(), progress=False).removed == 3
    for path in paths[3:10]:
        path.unlink()
    with pytest.raises(builder.PruneRefusedError, match="7 of its 27 videos"):
        update_index(root, SyntheticExtractor(), progress=False)


# --------------------------------------------------------------------------- kills at random points
# Kill points: before and after each of these calls, and each video the extractor is asked for.
_CATALOG_WRITES = ("register_shard", "remove_paths", "move_rows", "retire_shards", "forget_shards", "write_info")
_BUILDER_WRITES = ("write_shard", "write_commit_marker")


def _instrumented_run(root: Path, videos: Path, action: str, kill_at: int | None,
                      setter: Callable[[object, str, object], None] = setattr) -> int:
    """Run ``action`` counting kill points; SIGKILL this process at point ``kill_at``. Returns the count."""
    count = [0]

    def event() -> None:
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(module: object, name: str) -> None:
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            event()
            result = real(*args, **kwargs)
            event()
            return result
        setter(module, name, wrapped)

    for name in _CATALOG_WRITES:
        wrap(catalog, name)
    for name in _BUILDER_WRITES:
        if hasattr(builder, name):  # (so the test also runs against code without a commit marker)
            wrap(builder, name)
    extractor = SyntheticExtractor(on_video=lambda path: event())
    if action == "build":
        build_index(root, videos, extractor, shard_size=3, progress=False)
    else:
        update_index(root, extractor, shard_size=3, progress=False)
    return count[0]


def _kill_run(root: Path, videos: Path, action: str, kill_at: int) -> int:
    """The run in a forked child (it has every module loaded already: no start-up cost); its exit code."""
    child = multiprocessing.get_context("fork").Process(target=_instrumented_run, args=(root, videos, action, kill_at))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
    return child.exitcode


def _kill_case(case: Path, action: str) -> tuple[Path, Path, set[str]]:
    """An index of 10 videos, then a collection with 4 new, 1 changed and (for update) 1 deleted video."""
    videos, root = case / "videos", case / "idx"
    paths = make_videos(videos, 10)
    build_index(root, videos, SyntheticExtractor(), shard_size=3, progress=False)
    before = {r.path for r in VideoIndex.load(root).records}
    paths[1].write_bytes(b"changed content")
    os.utime(paths[1], ns=(10**18, 10**18))
    if action == "update":
        paths[2].unlink()
    make_videos(videos / "new", 4, start=20)
    return root, videos, before


def _rerun(root: Path, videos: Path, action: str):
    if action == "build":
        return build_index(root, videos, SyntheticExtractor(), shard_size=3, progress=False)
    return update_index(root, SyntheticExtractor(), shard_size=3, progress=False)


@pytest.mark.slow  # starts processes
def test_sigkill_at_random_points_never_loses_a_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL at a random catalogue write, shard write or video: readable, nothing lost, the next run completes."""
    events = {}
    for action in ("build", "update"):  # how many kill points a complete run has
        root, videos, _ = _kill_case(tmp_path / f"count_{action}", action)
        events[action] = _instrumented_run(root, videos, action, None, monkeypatch.setattr)
        monkeypatch.undo()
    rng = random.Random(2024)
    for seed in range(12):
        action = ("build", "update")[seed % 2]
        case = tmp_path / f"case{seed}"
        root, videos, before = _kill_case(case, action)
        kill_at = rng.randint(1, events[action])
        assert _kill_run(root, videos, action, kill_at) == -signal.SIGKILL, (action, kill_at, events)

        after = {r.path for r in VideoIndex.load(root).records}  # always readable
        still_there = {p for p in before if Path(p).exists()}
        assert still_there <= after, f"{action} killed at {kill_at}/{events[action]}: lost {still_there - after}"

        report = _rerun(root, videos, action)
        assert report.total == len(list(videos.rglob("*.mp4")))
        build_index(case / "clean", videos, SyntheticExtractor(), shard_size=3, progress=False)
        assert_same_index(root, case / "clean")
        shard_consistency(root)
        assert not list(root.glob(".*.tmp"))


# ------------------------------------------------------------------------------ file hygiene (Low)
def test_index_path_with_uri_characters(tmp_path: Path) -> None:
    make_videos(tmp_path / "videos", 3)
    root = tmp_path / "odd ?name#1 %41"
    build_index(root, tmp_path / "videos", SyntheticExtractor(), progress=False)
    assert len(VideoIndex.load(root)) == 3
    assert VideoIndex.read_info(root).sources == [str((tmp_path / "videos").resolve())]
    assert not (tmp_path / "odd ").exists()  # nothing opened at the truncated name


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    from diffusionret.config_utils import atomic_write_text

    make_videos(tmp_path / "videos", 3)
    old = os.umask(0o022)
    try:
        build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(), progress=False)
        atomic_write_text(tmp_path / "note.txt", "hello")
    finally:
        os.umask(old)
    for path in [*(tmp_path / "idx" / SHARD_DIR).iterdir(), tmp_path / "note.txt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_atomic_writes_fsync_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusionret.config_utils import atomic_write_bytes

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_bytes(tmp_path / "sub" / "model.faiss", b"data")
    assert str(tmp_path / "sub") in synced  # the rename is durable, not only the bytes


def test_stale_temp_files_are_cleaned_by_the_next_run(tmp_path: Path) -> None:
    make_videos(tmp_path / "videos", 3)
    root = tmp_path / "idx"
    build_index(root, tmp_path / "videos", SyntheticExtractor(), progress=False)
    stale = [root / ".pq-abc.faiss.x1y2.tmp", root / ".plan.json.k3.tmp", root / SHARD_DIR / ".s.safetensors.q.tmp"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    update_index(root, SyntheticExtractor(), progress=False)
    assert not any(p.exists() for p in stale)


def test_video_ids_with_a_trailing_newline_are_refused() -> None:
    from types import SimpleNamespace

    from diffusionret.serve import app as serve_app

    found = SimpleNamespace(id="0123456789abcdef")
    backend = SimpleNamespace(index=SimpleNamespace(record=lambda video_id: found))
    assert serve_app._lookup(backend, "0123456789abcdef") is found
    for bad in ("0123456789abcdef\n", "0123456789ABCDEF", "0123456789abcde", "../etc/passwd"):
        with pytest.raises(serve_app.ApiError):
            serve_app._lookup(backend, bad)
