"""``index build/update --segments``: the recorded segmentation, its checks, and whole mode equal to before."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from helpers import assert_same_index, cli_logging, make_videos, write_tiny_video
from diffusionret.cli import main
from diffusionret.index import builder, catalog
from diffusionret.index.builder import SegmentsError, build_index, check_segments, update_index
from diffusionret.index.segments import SegmentConfig
from diffusionret.index.shards import SHARD_DIR
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor

MODEL_SETTINGS = {"extractor": "diffusionret", "max_frames": 12, "fps": 1.0, "sampling": "uniform", "image_size": 32}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with cli_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusionret.models.checkpoint import save_model
    from diffusionret.models.config import ModelConfig
    from diffusionret.models.factory import build_model

    model = build_model(ModelConfig.tiny(denoisers=True), generator=torch.Generator().manual_seed(0))
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


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


def test_update_refuses_another_segmentation_and_changes_nothing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # As if fixed windows were written: the refusal is about mixing segmentations, not about the mode.
    monkeypatch.setattr(builder, "_WRITABLE_MODES", ("whole", "fixed"))
    videos = tmp_path / "videos"
    make_videos(videos, 3)
    root = tmp_path / "idx"
    build_index(root, videos, SyntheticExtractor(), progress=False)
    before = (root / catalog.COMMIT_NAME).read_bytes()
    make_videos(videos / "new", 2, start=50)
    with pytest.raises(SegmentsError, match="built with segments whole"):
        update_index(root, SyntheticExtractor(), progress=False, segments=SegmentConfig(mode="fixed", window=4.0))
    assert len(VideoIndex.load(root)) == 3 and (root / catalog.COMMIT_NAME).read_bytes() == before


def test_segment_config_resolves_against_the_models_clip_span() -> None:
    assert check_segments(None, MODEL_SETTINGS) is None
    assert check_segments(SegmentConfig(mode="whole", window=3.0), MODEL_SETTINGS) == {"mode": "whole"}
    # The defaults (12 frames at 1 fps: a 12 s window, 6 s stride) are named in the refusal of a mode
    # the builder does not write yet.
    with pytest.raises(SegmentsError, match=r"fixed \(window 12 s, stride 6 s\) is not written"):
        check_segments(SegmentConfig(mode="fixed"), MODEL_SETTINGS)
    with pytest.raises(SegmentsError, match=r"window 4 s, stride 1 s"):
        check_segments(SegmentConfig(mode="auto", window=4.0, stride=1.0), MODEL_SETTINGS)
    with pytest.raises(SegmentsError, match="needs --window"):
        check_segments(SegmentConfig(mode="fixed"), {"extractor": "synthetic", "num_frames": 4})


def test_cli_records_segments_reports_them_and_rejects_bad_options(tmp_path: Path, tiny_model: Path) -> None:
    for i in range(2):
        write_tiny_video(tmp_path / "videos" / f"clip_{i}.mp4", frames=3)
    root = tmp_path / "idx"
    base = ["--no-progress", "--decode-workers", "1"]
    code, _, err = run_cli(["index", "build", "--model", str(tiny_model), "--videos", str(tmp_path / "videos"),
                            "--out", str(root), "--frames", "2", "--segments", "fixed", *base])
    assert code == 2 and "--segments fixed" in err and "not written" in err
    assert not (root / catalog.CATALOG_NAME).exists()  # refused before anything was written
    code, _, err = run_cli(["index", "build", "--model", str(tiny_model), "--videos", str(tmp_path / "videos"),
                            "--out", str(root), "--frames", "2", "--segments", "fixed", "--window", "2",
                            "--stride", "3", *base])
    assert code == 2 and "stride 3.0 s exceeds the window 2.0 s" in err
    code, _, err = run_cli(["index", "build", "--model", str(tiny_model), "--videos", str(tmp_path / "videos"),
                            "--out", str(root), "--frames", "2", *base])
    assert code == 0, err
    code, out, err = run_cli(["index", "info", str(root), "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["videos"] == data["segments"] == 2 and data["segmentation"] == {"mode": "whole"}
    code, _, err = run_cli(["index", "update", str(root), "--window", "3", *base])
    assert code == 2 and "--window and --stride need --segments" in err
    code, _, err = run_cli(["index", "update", str(root), "--segments", "shots", "--window", "3", *base])
    assert code == 2 and "not written" in err
    code, out, err = run_cli(["index", "update", str(root), "--segments", "whole", *base])
    assert code == 0 and out.startswith("2 videos indexed"), err
