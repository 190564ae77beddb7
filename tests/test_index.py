"""The on-disk index without a model: storage, search, resume after a kill, update, model identity.

Features come from :class:`diffusionret.testing.index.SyntheticExtractor` (a pure function of a
file's name and bytes), so every expectation can be recomputed independently.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from diffusionret.index import catalog
from diffusionret.index.builder import IndexLockedError, build_index, sync_index, update_index
from diffusionret.index.discover import discover_videos
from diffusionret.index.features import pool_frames
from diffusionret.index.identity import ModelMismatchError, model_fingerprint
from diffusionret.index.shards import SHARD_DIR
from diffusionret.index.store import VideoIndex, exact_topk
from diffusionret.testing.index import BROKEN_MARKER, SyntheticExtractor
from helpers import assert_same_index, make_videos, run_two_ranks, shard_consistency, wait_for



class CountingExtractor(SyntheticExtractor):
    """Records which files it was asked to encode."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def features(self, path: Path):
        self.seen.append(str(path))
        return super().features(path)


# --------------------------------------------------------------------------------------- search
def test_search_equals_brute_force(tmp_path: Path) -> None:
    paths = make_videos(tmp_path / "videos", 37)
    extractor = SyntheticExtractor(frames=5, dim=24)
    report = build_index(tmp_path / "idx", tmp_path / "videos", extractor, shard_size=6, progress=False)
    assert (report.added, report.total, report.shards_written) == (37, 37, 7)
    index = VideoIndex.load(tmp_path / "idx")
    assert [r.path for r in index.records] == sorted(str(p.resolve()) for p in paths)

    # The stored features are the extractor's (in fp16) and the pooled vectors follow from them.
    for row, record in enumerate(index.records):
        expected = extractor.features(Path(record.path))
        assert torch.equal(index.frames[row], expected.frames.half())
        assert torch.equal(index.frame_mask[row], expected.frame_mask)
        assert record.num_frames == int(expected.frame_mask.sum())
        assert index.thumbnail(record.id) == expected.thumbnail
    brute_pooled = pool_frames(index.frames, index.frame_mask)
    torch.testing.assert_close(index.pooled, brute_pooled)

    queries = torch.nn.functional.normalize(torch.randn(6, 24, generator=torch.Generator().manual_seed(1)), dim=-1)
    for k in (1, 5, 37, 100):
        scores, rows = index.search(queries, k)
        brute = queries @ brute_pooled.T
        expected_scores, expected_rows = brute.topk(min(k, 37), dim=1)
        assert torch.equal(rows, expected_rows)
        torch.testing.assert_close(scores, expected_scores)
        # Chunked scoring (used for large indexes) gives the same answer.
        chunk_scores, chunk_rows = exact_topk(queries, index.pooled, min(k, 37), chunk=4)
        assert torch.equal(chunk_rows, expected_rows)
        torch.testing.assert_close(chunk_scores, expected_scores)


def test_search_rejects_bad_queries(tmp_path: Path) -> None:
    make_videos(tmp_path / "videos", 3)
    build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(), progress=False)
    index = VideoIndex.load(tmp_path / "idx")
    with pytest.raises(ValueError, match="queries must be"):
        index.search(torch.randn(2, 7), 1)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(torch.randn(1, 16), 0)


def test_record_lookup_and_metadata(tmp_path: Path) -> None:
    (path,) = make_videos(tmp_path / "videos", 1)
    build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(), progress=False)
    index = VideoIndex.load(tmp_path / "idx")
    record = index.records[0]
    stat = path.stat()
    assert (record.path, record.size, record.mtime_ns) == (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    assert record.id == catalog.video_id(record.path) and len(record.id) == 16
    assert index.record(record.id) == record and index.row(record.id) == 0
    assert index.record("0" * 16) is None and index.thumbnail("0" * 16) is None
    assert record.to_dict()["name"] == path.name


# ------------------------------------------------------------------------------- kill / resume
# Builds with shards of 3 and, when about to encode its 11th video (the 2nd of shard 4), says so
# through a marker file and blocks: the test's SIGKILL then lands inside a shard, whatever the load.
_BUILD_SCRIPT = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from diffusionret.index.builder import build_index
    from diffusionret.testing.index import SyntheticExtractor
    seen = []
    def on_video(path):
        seen.append(path)
        if len(seen) == 11:
            Path(sys.argv[3]).write_text(str(path))
            threading.Event().wait()
    build_index(sys.argv[1], sys.argv[2], SyntheticExtractor(on_video=on_video), shard_size=3, progress=False)
""")


def test_build_killed_then_resumed_equals_uninterrupted_build(tmp_path: Path) -> None:
    make_videos(tmp_path / "videos", 40)
    killed = tmp_path / "killed"
    marker = tmp_path / "inside-shard-4"
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(killed), str(tmp_path / "videos"), str(marker)])
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, "the build to reach its 4th shard")
    finally:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build ended before it could be killed"

    partial = VideoIndex.load(killed)  # a killed build leaves a consistent, searchable index
    assert len(partial) == 9  # the 3 finished shards; the 10th video, encoded, was never written
    done = {r.path for r in partial.records}

    resume = CountingExtractor()
    report = build_index(killed, tmp_path / "videos", resume, shard_size=3, progress=False)
    assert report.total == 40
    assert not done & set(resume.seen), "resume re-encoded videos the killed build had finished"
    assert len(resume.seen) == len(set(resume.seen))

    build_index(tmp_path / "clean", tmp_path / "videos", SyntheticExtractor(), shard_size=3, progress=False)
    assert_same_index(killed, tmp_path / "clean")
    shard_consistency(killed)


def test_crash_between_shard_write_and_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard written but never registered is registered on resume, not encoded again."""
    make_videos(tmp_path / "videos", 12)
    real_register = catalog.register_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill after the rename, before the commit
        return real_register(*args, **kwargs)

    monkeypatch.setattr(catalog, "register_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(), shard_size=4, progress=False)
    monkeypatch.setattr(catalog, "register_shard", real_register)
    assert len(VideoIndex.load(tmp_path / "idx")) == 4  # only the first shard is visible
    (tmp_path / "idx" / SHARD_DIR / ".leftover.safetensors.abc.tmp").write_bytes(b"partial write")

    resume = CountingExtractor()
    build_index(tmp_path / "idx", tmp_path / "videos", resume, shard_size=4, progress=False)
    assert len(resume.seen) == 4  # the orphan shard's 4 videos were adopted, only the last 4 encoded
    build_index(tmp_path / "clean", tmp_path / "videos", SyntheticExtractor(), shard_size=4, progress=False)
    assert_same_index(tmp_path / "idx", tmp_path / "clean")
    shard_consistency(tmp_path / "idx")


def test_crash_during_extraction_resumes(tmp_path: Path) -> None:
    paths = make_videos(tmp_path / "videos", 10)
    target = sorted(str(p.resolve()) for p in paths)[6]

    def explode(path: Path) -> None:
        if str(path) == target:
            raise RuntimeError("decoder crashed the process")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(on_video=explode), shard_size=3,
                    progress=False)
    assert len(VideoIndex.load(tmp_path / "idx")) == 6
    resume = CountingExtractor()
    build_index(tmp_path / "idx", tmp_path / "videos", resume, shard_size=3, progress=False)
    assert len(resume.seen) == 4
    build_index(tmp_path / "clean", tmp_path / "videos", SyntheticExtractor(), shard_size=3, progress=False)
    assert_same_index(tmp_path / "idx", tmp_path / "clean")


def test_concurrent_writer_is_refused(tmp_path: Path) -> None:
    make_videos(tmp_path / "videos", 2)
    build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(), progress=False)
    with open(tmp_path / "idx" / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(IndexLockedError):
            update_index(tmp_path / "idx", SyntheticExtractor(), progress=False)


# --------------------------------------------------------------------------------------- update
def test_update_adds_changed_and_removed_files(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    paths = make_videos(videos, 14)
    build_index(tmp_path / "idx", videos, SyntheticExtractor(), shard_size=4, progress=False)
    before = VideoIndex.load(tmp_path / "idx")
    changed, removed = paths[3], [paths[5], paths[8], paths[9]]
    old_frames = before.frames[before.row(catalog.video_id(str(changed.resolve())))].clone()
    changed.write_bytes(b"new content of a changed file")
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    for path in removed:
        path.unlink()
    added = make_videos(videos / "new", 3, start=100)

    counting = CountingExtractor()
    report = update_index(tmp_path / "idx", counting, shard_size=4, progress=False)
    assert (report.added, report.replaced, report.removed, report.unchanged) == (3, 1, 3, 10)
    assert sorted(counting.seen) == sorted(str(p.resolve()) for p in [changed, *added])
    after = VideoIndex.load(tmp_path / "idx")
    assert len(after) == 14 - 3 + 3
    assert not {str(p.resolve()) for p in removed} & {r.path for r in after.records}
    assert not torch.equal(after.frames[after.row(catalog.video_id(str(changed.resolve())))], old_frames)

    # The updated index is the index a fresh build over the new collection gives, without dead rows.
    build_index(tmp_path / "fresh", videos, SyntheticExtractor(), shard_size=4, progress=False)
    assert_same_index(tmp_path / "idx", tmp_path / "fresh")
    shard_consistency(tmp_path / "idx")

    # A second update with nothing changed encodes nothing.
    idle = CountingExtractor()
    report = update_index(tmp_path / "idx", idle, progress=False)
    assert idle.seen == [] and report.unchanged == 14 and report.added == report.removed == 0


def test_undecodable_files_are_recorded_not_retried(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    make_videos(videos, 3)
    broken = videos / "broken_clip.mp4"
    broken.write_bytes(BROKEN_MARKER + b" not a video")
    report = build_index(tmp_path / "idx", videos, SyntheticExtractor(), progress=False)
    assert (report.added, report.failed, report.total) == (3, 1, 3)
    idle = CountingExtractor()
    update_index(tmp_path / "idx", idle, progress=False)
    assert idle.seen == []  # an unchanged broken file is not decoded again
    broken.write_bytes(b"repaired")
    os.utime(broken, ns=(time.time_ns(), time.time_ns() + 10**9))
    fixed = CountingExtractor()
    report = update_index(tmp_path / "idx", fixed, progress=False)
    assert fixed.seen == [str(broken.resolve())] and report.total == 4


def test_a_failure_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """No rank is left waiting for a failed one: each raises (its own error, or OtherRankFailedError)."""
    from diffusionret.index.builder import OtherRankFailedError

    make_videos(tmp_path / "videos", 6)
    videos = discover_videos(tmp_path / "videos")
    # Planning fails on rank 0 (no index to update): rank 1 must not wait for its plan.
    errors = run_two_ranks(lambda rank, agree: sync_index(tmp_path / "missing", videos, SyntheticExtractor(),
                                                            create=False, rank=rank, world_size=2, agree=agree,
                                                            progress=False), expect_errors=True)
    assert isinstance(errors[0], FileNotFoundError) and isinstance(errors[1], OtherRankFailedError)

    class BrokenExtractor(SyntheticExtractor):
        def extract(self, paths):  # type: ignore[no-untyped-def]  # a broken encoder: fewer results than videos
            return iter([])

    # Encoding fails on rank 1: rank 0 must not wait for its shards, and commits nothing.
    errors = run_two_ranks(lambda rank, agree: sync_index(tmp_path / "half", videos,
                                                            BrokenExtractor() if rank else SyntheticExtractor(),
                                                            rank=rank, world_size=2, agree=agree, progress=False),
                           expect_errors=True)
    assert isinstance(errors[1], RuntimeError) and "results for" in str(errors[1])
    assert isinstance(errors[0], OtherRankFailedError)
    assert catalog.read_commit_marker(tmp_path / "half") is None
    # The same build on one healthy process resumes and completes.
    assert build_index(tmp_path / "half", tmp_path / "videos", SyntheticExtractor(), progress=False).total == 6


def test_multi_rank_build_merges_shards(tmp_path: Path) -> None:
    """Two ranks (threads with a real agreement) build the same index as one process."""
    make_videos(tmp_path / "videos", 21)
    videos = discover_videos(tmp_path / "videos")
    reports = run_two_ranks(lambda rank, agree: sync_index(tmp_path / "ranks", videos, SyntheticExtractor(),
                                                             shard_size=8, rank=rank, world_size=2,
                                                             agree=agree, progress=False))
    assert reports[1].added == 10  # each rank counts its own work; rank 0 reports the whole job
    assert reports[0].added == reports[0].total == 21
    assert reports[0].shards_written == reports[1].shards_written == 2  # 11 + 10 videos: 8 + 3 and 8 + 2
    build_index(tmp_path / "single", tmp_path / "videos", SyntheticExtractor(), shard_size=8, progress=False)
    assert_same_index(tmp_path / "ranks", tmp_path / "single")
    shard_consistency(tmp_path / "ranks")
    with contextlib.closing(catalog.connect(tmp_path / "ranks", readonly=True)) as conn:
        # The two ranks' small tail shards (3 and 2 videos) were merged by compaction.
        assert sorted(catalog.live_rows(conn).values()) == [5, 8, 8]


# --------------------------------------------------------------------------------- model identity
def test_model_mismatch_is_refused(tmp_path: Path) -> None:
    make_videos(tmp_path / "videos", 4)
    build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(seed=0), progress=False)
    other = SyntheticExtractor(seed=1)
    with pytest.raises(ModelMismatchError):
        update_index(tmp_path / "idx", other, progress=False)
    with pytest.raises(ModelMismatchError):
        build_index(tmp_path / "idx", tmp_path / "videos", other, progress=False)
    with pytest.raises(ModelMismatchError):
        VideoIndex.load(tmp_path / "idx", model_id=other.identity.model_id)
    assert len(VideoIndex.load(tmp_path / "idx", model_id=SyntheticExtractor(seed=0).identity.model_id)) == 4

    from diffusionret.index.searcher import Searcher

    stranger = torch.nn.Linear(3, 3)
    with pytest.raises(ModelMismatchError, match="refusing"):
        Searcher(stranger, VideoIndex.load(tmp_path / "idx"))


def test_model_fingerprint_covers_weights_and_config() -> None:
    a = torch.nn.Linear(4, 4)
    b = torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


def test_update_without_index_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        update_index(tmp_path / "nothing", SyntheticExtractor(), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError):
        VideoIndex.load(tmp_path / "nothing")



def test_empty_sources_never_empty_the_index(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos found"):
        build_index(tmp_path / "idx", tmp_path / "empty", SyntheticExtractor(), progress=False)
    videos = tmp_path / "videos"
    make_videos(videos, 3)
    build_index(tmp_path / "idx", videos, SyntheticExtractor(), progress=False)
    for path in videos.rglob("*.mp4"):  # e.g. the disk holding the collection is not mounted
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no videos found"):
        update_index(tmp_path / "idx", SyntheticExtractor(), progress=False)
    assert len(VideoIndex.load(tmp_path / "idx")) == 3


def test_list_source_with_video_root_is_recorded_for_update(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    paths = make_videos(videos, 4)
    listing = tmp_path / "annotations" / "test.csv"
    listing.parent.mkdir()
    listing.write_text("video,caption\n" + "".join(f"{p.relative_to(videos)},a caption\n" for p in paths[:3]))
    build_index(tmp_path / "idx", listing, SyntheticExtractor(), video_root=videos, progress=False)
    assert len(VideoIndex.load(tmp_path / "idx")) == 3
    listing.write_text(listing.read_text() + f"{paths[3].relative_to(videos)},another\n")
    report = update_index(tmp_path / "idx", SyntheticExtractor(), progress=False)  # recorded list + root
    assert (report.added, report.total) == (1, 4)
