"""``index build/update --segments``: the recorded segmentation, its checks, and whole mode equal to before."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from helpers import (assert_same_index, make_videos, run_cli, run_two_ranks, save_tiny_model,
                     segment_spans, shard_consistency, write_tiny_video)
from diffusionret.index import catalog
from diffusionret.index.builder import SegmentsError, build_index, check_segments, update_index
from diffusionret.index.features import ExtractionFailure, SegmentedFeatures
from diffusionret.index.segments import SegmentConfig, plan_segments
from diffusionret.index.shards import SHARD_DIR
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor

MODEL_SETTINGS = {"extractor": "diffusionret", "max_frames": 12, "fps": 1.0, "sampling": "uniform", "image_size": 32}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


class SegmentingExtractor(SyntheticExtractor):
    """The synthetic extractor, cutting videos into segments: a file of ``n`` bytes lasts ``n / 1000`` s;
    segment ``k`` has the whole-video features scaled by ``1 + k`` (so rows are told apart)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[str] = []

    @property
    def settings(self) -> dict:
        return {**super().settings, "max_frames": self.frames, "fps": 1.0}  # a clip spans `frames` s

    def extract_segments(self, paths, config):
        for path in paths:
            self.seen.append(str(path))
            base = self.features(path)
            if isinstance(base, ExtractionFailure):
                yield base
                continue
            spans = plan_segments(base.duration, config)
            frames = torch.stack([base.frames * (1 + k) for k in range(len(spans))])
            mask = base.frame_mask.expand(len(spans), -1).clone()
            yield SegmentedFeatures([(x.start, x.end) for x in spans], frames, mask, base.duration,
                                    [base.thumbnail] * len(spans), base.width, base.height)


def _write(path: Path, seconds: float, tag: bytes = b"v") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((tag * int(seconds * 1000))[: int(seconds * 1000)])
    return path


def _rows(root: Path) -> list[tuple]:
    index = VideoIndex.load(root)
    return [(r.path, r.start, r.end, index.frames[i].clone(), index.frame_mask[i].clone())
            for i, r in enumerate(index.records)]


def _assert_same_rows(a: Path, b: Path) -> None:
    """The two indexes hold the same rows: path, span and features, in order."""
    for x, y in zip(_rows(a), _rows(b), strict=True):
        assert x[:3] == y[:3] and torch.equal(x[3], y[3]) and torch.equal(x[4], y[4])


def _info(root: Path) -> dict:
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        return catalog.read_info(conn)


def _shard_tensors(root: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(p) for p in sorted((root / SHARD_DIR).iterdir())]


def test_whole_mode_builds_the_index_of_a_build_without_segments(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    make_videos(videos, 7)
    build_index(tmp_path / "before", videos, SyntheticExtractor(), shard_size=3, progress=False)
    build_index(tmp_path / "whole", videos, SyntheticExtractor(), shard_size=3, progress=False,
                segments=SegmentConfig(mode="whole"))
    assert_same_index(tmp_path / "before", tmp_path / "whole")
    for a, b in zip(_shard_tensors(tmp_path / "before"), _shard_tensors(tmp_path / "whole"), strict=True):
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _info(tmp_path / "whole")["segments"] == {"mode": "whole"}
    assert VideoIndex.read_info(tmp_path / "whole").segments == {"mode": "whole"}


def test_an_index_without_a_recorded_segmentation_is_whole(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    paths = make_videos(videos, 4)
    root = tmp_path / "idx"
    build_index(root, videos, SyntheticExtractor(), progress=False)
    with contextlib.closing(catalog.connect(root)) as conn, conn:  # as built before segments existed
        conn.execute("DELETE FROM info WHERE key = 'segments'")
    assert VideoIndex.read_info(root).segments == {"mode": "whole"}
    paths[0].write_bytes(b"changed")
    report = update_index(root, SyntheticExtractor(), progress=False, segments=SegmentConfig(mode="whole"))
    assert report.replaced == 1 and len(VideoIndex.load(root)) == 4


def test_fixed_windows_are_catalogued_loaded_and_compacted(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    long = _write(videos / "long.mp4", 10.0)
    _write(videos / "short.mp4", 3.0)
    root = tmp_path / "idx"
    fixed = SegmentConfig(mode="fixed", window=4.0, stride=2.0)
    report = build_index(root, videos, SegmentingExtractor(), shard_size=4, progress=False, segments=fixed)
    assert report.added == 2 and report.total == 2
    assert segment_spans(root) == {"long.mp4": [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0), (6.0, 10.0)],
                               "short.mp4": [(0.0, 3.0)]}
    assert _info(root)["segments"] == fixed.resolved(4.0).to_dict()
    index = VideoIndex.load(root)
    assert len(index) == 5 and [(Path(r.path).name, r.start, r.end) for r in index.records] == [
        ("long.mp4", 0.0, 4.0), ("long.mp4", 2.0, 6.0), ("long.mp4", 4.0, 8.0), ("long.mp4", 6.0, 10.0),
        ("short.mp4", 0.0, 3.0)]
    # Each row holds its own segment's features (segment k was scaled by 1 + k).
    first = index.frames[0].float()
    for k in range(4):
        assert torch.allclose(index.frames[k].float(), first * (1 + k), rtol=2e-3, atol=2e-3)
    assert index.row(catalog.video_id(str(long.resolve()))) == 0
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        assert (catalog.count_videos(conn), catalog.count_segments(conn)) == (2, 5)
    shard_consistency(root)  # 5 rows in 2 shards (4 + 1), each fully live

    # A changed file is re-segmented (only it is encoded); the other keeps its rows; dead rows are compacted.
    _write(long, 6.0, b"w")
    counting = SegmentingExtractor()
    report = update_index(root, counting, shard_size=4, progress=False)
    assert counting.seen == [str(long.resolve())] and (report.replaced, report.unchanged) == (1, 1)
    assert segment_spans(root) == {"long.mp4": [(0.0, 4.0), (2.0, 6.0)], "short.mp4": [(0.0, 3.0)]}
    shard_consistency(root)
    fresh = tmp_path / "fresh"
    build_index(fresh, videos, SegmentingExtractor(), shard_size=4, progress=False, segments=fixed)
    for a, b in zip(_rows(root), _rows(fresh), strict=True):
        assert a[:3] == b[:3] and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])

    # A removed file takes its segments along.
    long.unlink()
    update_index(root, SegmentingExtractor(), shard_size=4, progress=False)
    assert segment_spans(root) == {"short.mp4": [(0.0, 3.0)]} and len(VideoIndex.load(root)) == 1
    shard_consistency(root)


def test_update_refuses_another_segmentation_and_changes_nothing(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    _write(videos / "a.mp4", 9.0)
    root = tmp_path / "idx"
    build_index(root, videos, SegmentingExtractor(), progress=False)
    before = (root / catalog.COMMIT_NAME).read_bytes()
    _write(videos / "b.mp4", 2.0)
    with pytest.raises(SegmentsError, match="built with segments whole"):
        update_index(root, SegmentingExtractor(), progress=False, segments=SegmentConfig(mode="fixed", window=4.0))
    assert len(VideoIndex.load(root)) == 1 and (root / catalog.COMMIT_NAME).read_bytes() == before
    # An extractor that only encodes whole videos cannot build segments.
    with pytest.raises(SegmentsError, match="encodes whole videos only"):
        build_index(tmp_path / "other", videos, SyntheticExtractor(), progress=False,
                    segments=SegmentConfig(mode="fixed", window=4.0))


def test_segment_config_resolves_against_the_models_clip_span() -> None:
    assert check_segments(None, MODEL_SETTINGS) is None
    assert check_segments(SegmentConfig(mode="whole", window=3.0), MODEL_SETTINGS) == {"mode": "whole"}
    # 12 frames at 1 fps: a 12 s window, a 6 s stride.
    resolved = check_segments(SegmentConfig(mode="fixed"), MODEL_SETTINGS)
    assert resolved is not None and (resolved["mode"], resolved["window"], resolved["stride"]) == ("fixed", 12.0, 6.0)
    resolved = check_segments(SegmentConfig(mode="auto", window=4.0, stride=1.0), MODEL_SETTINGS)
    assert resolved is not None and (resolved["window"], resolved["stride"]) == (4.0, 1.0)
    with pytest.raises(SegmentsError, match="needs --window"):
        check_segments(SegmentConfig(mode="fixed"), {"extractor": "synthetic", "num_frames": 4})


def test_cli_fixed_segments_reach_search_json(tmp_path: Path, tiny_model: Path) -> None:
    # --frames 2 at the tiny model's fps (1): a 2 s window, 1 s stride by default.
    write_tiny_video(tmp_path / "videos" / "long.mp4", frames=60, fps=10)  # 6 s: three windows
    write_tiny_video(tmp_path / "videos" / "clip.mp4", frames=15, fps=10)  # 1.5 s: one segment
    root = tmp_path / "idx"
    base = ["--no-progress", "--decode-workers", "1"]
    code, _, err = run_cli(["index", "build", "--model", str(tiny_model), "--videos", str(tmp_path / "videos"),
                            "--out", str(root), "--frames", "2", "--segments", "fixed", "--window", "2",
                            "--stride", "3", *base])
    assert code == 2 and "stride 3.0 s exceeds the window 2.0 s" in err
    assert not (root / catalog.CATALOG_NAME).exists()  # refused before anything was written
    code, out, err = run_cli(["index", "build", "--model", str(tiny_model), "--videos", str(tmp_path / "videos"),
                              "--out", str(root), "--frames", "2", "--segments", "fixed", *base])
    assert code == 0 and out.startswith("2 videos indexed: 2 added"), err
    assert _info(root)["segments"]["window"] == pytest.approx(2.0)
    spans = segment_spans(root)
    assert spans["long.mp4"] == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0), (4.0, 6.0)]
    assert spans["clip.mp4"] == [(0.0, 1.5)]
    code, out, err = run_cli(["index", "info", str(root), "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert (data["videos"], data["segments"], data["segmentation"]["mode"]) == (2, 6, "fixed")
    code, out, err = run_cli(["search", str(root), "grey frames", "-k", "10", "--json"])
    assert code == 0, err
    hits = json.loads(out)
    assert isinstance(hits, list) and hits, out
    for hit in hits:
        allowed = spans[Path(hit["path"]).name]
        # A moment is one segment or the union of touching segments of its video.
        assert any(abs(hit["start"] - a) < 1e-6 for a, _ in allowed), hit
        assert any(abs(hit["end"] - b) < 1e-6 for _, b in allowed), hit
    assert any(Path(h["path"]).name == "long.mp4" and h["end"] - h["start"] < 6.0 for h in hits), hits
    # The API answers the same moments with the same fields.
    from fastapi.testclient import TestClient

    from diffusionret.index.searcher import Searcher
    from diffusionret.serve.app import ServeConfig, create_app

    with TestClient(create_app(Searcher.open(root), ServeConfig(show_paths=True)), base_url="http://127.0.0.1") as client:
        api = client.get("/api/search", params={"q": "grey frames", "k": 10}).json()["results"]
    assert [{k: h[k] for k in ("rank", "path", "video_id", "start", "end")} for h in api] == \
        [{k: h[k] for k in ("rank", "path", "video_id", "start", "end")} for h in hits]
    assert [h["score"] for h in api] == pytest.approx([h["score"] for h in hits])

    code, _, err = run_cli(["index", "update", str(root), "--window", "3", *base])
    assert code == 2 and "--window and --stride need --segments" in err
    code, _, err = run_cli(["index", "update", str(root), "--segments", "whole", *base])
    assert code == 2 and "built with segments fixed" in err
    code, out, err = run_cli(["index", "update", str(root), *base])
    assert code == 0 and out.startswith("2 videos indexed: 0 added, 0 re-encoded, 0 removed, 2 unchanged"), err


def test_an_index_written_before_segments_loads_whole_and_migrates(tmp_path: Path) -> None:
    import shutil

    from diffusionret.index.store import index_fingerprint

    root = tmp_path / "legacy"
    shutil.copytree(Path(__file__).parent / "data" / "refactor_golden" / "legacy_index", root)
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        assert not catalog.has_segments_table(conn)
        videos = catalog.count_videos(conn)
        assert catalog.count_segments(conn) == videos > 0
        before = index_fingerprint(conn)[0]
    index = VideoIndex.load(root)
    assert len(index) == videos and all(r.start is None for r in index.records)
    assert index.info.segments == {"mode": "whole"}
    # A writer adds the (empty) table; the rows, and so the fingerprint naming ANN files, stay the same.
    with contextlib.closing(catalog.connect(root)) as conn:
        assert catalog.has_segments_table(conn) and catalog.count_segments(conn) == videos
        assert index_fingerprint(conn)[0] == before
        assert catalog.live_rows(conn) == catalog.shard_sizes(conn)  # every row live
    code, out, err = run_cli(["index", "info", str(root), "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["videos"] == data["segments"] == videos and data["segmentation"] == {"mode": "whole"}


def test_compaction_keeps_each_videos_segments_in_one_shard(tmp_path: Path) -> None:
    from diffusionret.index.builder import _chunk_rows

    whole = [catalog.VideoRecord(f"{i:016x}", f"/v{i}", 1, 1, 1.0, 1, 1, 1, "s", i) for i in range(7)]
    assert [len(c) for c in _chunk_rows(whole, 3)] == [3, 3, 1]  # as before segments: plain chunks
    videos = tmp_path / "videos"
    for i, seconds in enumerate([9.0, 3.0, 7.0, 11.0, 5.0]):
        _write(videos / f"v{i}.mp4", seconds)
    root = tmp_path / "idx"
    fixed = SegmentConfig(mode="fixed", window=4.0, stride=2.0)
    build_index(root, videos, SegmentingExtractor(), shard_size=2, progress=False, segments=fixed)
    _write(videos / "v1.mp4", 8.0, b"x")
    (videos / "v4.mp4").unlink()
    update_index(root, SegmentingExtractor(), shard_size=2, progress=False)
    shard_consistency(root)
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        shards = {vid: {shard for (shard,) in conn.execute("SELECT shard FROM segments WHERE video_id = ?", (vid,))}
                  for (vid,) in conn.execute("SELECT id FROM videos")}
        heads = {r.id: (r.shard, r.row) for r in catalog.list_records(conn)}
        firsts = {}
        for r in catalog.list_rows(conn):
            firsts.setdefault(r.id, (r.shard, r.row))
    assert len(shards) == 4 and all(len(s) == 1 for s in shards.values())
    assert heads == firsts  # each video entry names its first segment's row
    fresh = tmp_path / "fresh"
    build_index(fresh, videos, SegmentingExtractor(), shard_size=2, progress=False, segments=fixed)
    for a, b in zip(_rows(root), _rows(fresh), strict=True):
        assert a[:3] == b[:3] and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_multi_rank_build_cuts_every_ranks_videos_as_recorded(tmp_path: Path) -> None:
    """Rank 1 cuts its videos as rank 0's plan says (it never reads the catalogue)."""

    from diffusionret.index.builder import sync_index
    from diffusionret.index.discover import discover_videos

    for i in range(5):
        _write(tmp_path / "videos" / f"v{i}.mp4", 5.0 + i)
    videos = discover_videos(tmp_path / "videos")
    fixed = SegmentConfig(mode="fixed", window=4.0, stride=2.0)
    run_two_ranks(lambda rank, agree: sync_index(tmp_path / "ranks", videos, SegmentingExtractor(), shard_size=2,
                                                  rank=rank, world_size=2, agree=agree, progress=False,
                                                  segments=fixed))
    build_index(tmp_path / "single", tmp_path / "videos", SegmentingExtractor(), shard_size=2, progress=False,
                segments=fixed)
    assert segment_spans(tmp_path / "ranks") == segment_spans(tmp_path / "single")
    _assert_same_rows(tmp_path / "ranks", tmp_path / "single")
    shard_consistency(tmp_path / "ranks")


def test_a_segmented_shard_written_but_not_registered_is_adopted_on_resume(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        _write(tmp_path / "videos" / f"v{i}.mp4", 6.0 + i)
    fixed = SegmentConfig(mode="fixed", window=4.0, stride=2.0)
    real_register = catalog.register_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill after the shard's rename, before its registration
        return real_register(*args, **kwargs)

    monkeypatch.setattr(catalog, "register_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", tmp_path / "videos", SegmentingExtractor(), shard_size=2, progress=False,
                    segments=fixed)
    monkeypatch.setattr(catalog, "register_shard", real_register)
    resume = SegmentingExtractor()
    build_index(tmp_path / "idx", tmp_path / "videos", resume, shard_size=2, progress=False)  # the recorded mode
    assert resume.seen == []  # both shards were on disk: the orphan's segments were registered, not re-encoded
    build_index(tmp_path / "clean", tmp_path / "videos", SegmentingExtractor(), shard_size=2, progress=False,
                segments=fixed)
    assert segment_spans(tmp_path / "idx") == segment_spans(tmp_path / "clean")
    _assert_same_rows(tmp_path / "idx", tmp_path / "clean")
    shard_consistency(tmp_path / "idx")
