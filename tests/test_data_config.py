"""DataConfig from YAML (bare or as a run config's ``data:``), the factories, and ``diffusionret data check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusionret.cli import main
from diffusionret.config_utils import ConfigError, dump_yaml, from_dict
from diffusionret.data import (
    ClipTransform,
    DataConfig,
    TrainTransform,
    build_dataset,
    check_data,
    format_report,
    load_data_config,
)
from diffusionret.testing.videos import write_index_video


def fake_tokenize(texts, max_words):
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    ids[:, 0] = 1
    return ids, (ids > 0).long()


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own dataset: videos/ + train.csv + test.csv; one test video is missing, one is corrupt."""
    root = tmp_path_factory.mktemp("custom")
    videos = root / "videos"
    for name, frames in (("a", 20), ("b", 35), ("c", 12)):
        write_index_video(videos / f"{name}.mp4", frames, fps=10)
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    (root / "train.csv").write_text("video,caption\na.mp4,first a\na.mp4,second a\nb.mp4,only b\nc.mp4,only c\n")
    (root / "test.csv").write_text("video,caption\nb.mp4,b again\nmissing.mp4,nowhere\ncorrupt.mp4,broken\n")
    (root / "good_test.csv").write_text("video,caption\nb.mp4,b again\nc.mp4,c again\n")
    return root


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bare_and_embedded_configs(tmp_path):
    bare = write_yaml(tmp_path / "data.yaml", "dataset: msrvtt\nanno_path: /a\nvideo_path: /v\nfps: 1e0\n")
    cfg = load_data_config(bare)
    assert cfg.dataset == "msrvtt" and cfg.anno_path == Path("/a") and cfg.fps == 1.0 and cfg.max_words == 32
    text = "seed: 3\nmodel: {name: tiny}\ndata:\n  dataset: msvd\n  anno_path: /a\n  video_path: /v\n"
    run = write_yaml(tmp_path / "run.yaml", text)
    cfg = load_data_config(run, ["max_frames=8", "data.fps=2"])
    assert cfg.dataset == "msvd" and cfg.max_frames == 8 and cfg.fps == 2.0
    # Round trip through YAML is the identity.
    assert load_data_config(write_yaml(tmp_path / "again.yaml", dump_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset: msrvtt\nanno_path: /a\nvideo_path: /v\nframes: 12\n", "unknown keys \\['frames'\\]"),
        ("dataset: kinetics\nanno_path: /a\nvideo_path: /v\n", "kinetics"),
        ("dataset: msrvtt\nanno_path: /a\nvideo_path: /v\nsampling: random\n", "random"),
        ("dataset: msrvtt\nanno_path: /a\nvideo_path: /v\nsampling: reference\nfps: 1.5\n", "integer fps"),
        ("dataset: msrvtt\nanno_path: /a\nvideo_path: /v\nmax_words: 1\n", "max_words"),
        ("dataset: msrvtt\nvideo_path: /v\n", "anno_path"),
    ],
)
def test_invalid_configs_name_the_file(tmp_path, text, message):
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_data_config(path)
    assert "bad.yaml" in str(info.value)


def test_build_dataset(custom_data):
    cfg = DataConfig(dataset="custom", anno_path=custom_data, video_path=custom_data / "videos", max_words=8,
                     max_frames=3, size=32, augment="crop_flip", batch_size=2, batch_size_val=3, num_workers=0,
                     pin_memory=False)
    train = build_dataset(cfg, "train", tokenizer=fake_tokenize)
    assert len(train) == 4 and train.num_videos == 3 and isinstance(train.transform, TrainTransform)
    test = build_dataset(cfg, "test", tokenizer=fake_tokenize)
    assert isinstance(test.transform, ClipTransform) and test.video_ids == ["b", "missing", "corrupt"]
    assert cfg.reader_split("val") == "test"
    skip_cfg = from_dict(DataConfig, {**{k: getattr(cfg, k) for k in ("dataset", "anno_path", "video_path")},
                                      "on_error": "skip"})
    ds = build_dataset(skip_cfg, "test", tokenizer=fake_tokenize, report_dir=custom_data / "reports")
    assert ds.skip_report == custom_data / "reports" / "skipped_test.jsonl"


def test_check_data_reports_missing_and_corrupt(custom_data):
    cfg = DataConfig(dataset="custom", anno_path=custom_data, video_path=custom_data / "videos")
    report = check_data(cfg, workers=2)
    assert [s.split for s in report.splits] == ["train", "test"] and not report.ok
    train, test = report.splits
    assert train.ok and (train.records, train.videos, train.captions_per_video) == (4, 3, (1, 4 / 3, 2))
    assert train.durations["min"] == pytest.approx(1.2) and train.durations["max"] == pytest.approx(3.5)
    assert train.durations["median"] == pytest.approx(2.0)
    assert [m[0] for m in test.missing] == ["missing"] and [u[0] for u in test.undecodable] == ["corrupt"]
    text = format_report(report)
    assert "missing.mp4" in text and "corrupt.mp4" in text and "PROBLEMS FOUND" in text


def test_data_check_command(custom_data, tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", f"data:\n  dataset: custom\n  anno_path: {custom_data}\n"
                                                f"  video_path: {custom_data / 'videos'}\n")
    out_json = tmp_path / "report.json"
    assert main(["data", "check", str(config), "--no-progress", "--json", str(out_json), "--deep"]) == 1
    printed = capsys.readouterr().out
    assert "train" in printed and "missing" in printed and "PROBLEMS FOUND" in printed
    saved = json.loads(out_json.read_text())
    assert saved["ok"] is False and saved["splits"][1]["undecodable"][0][0] == "corrupt"
    # The same data with a clean test split passes.
    assert main(["data", "check", str(config), "test_split=good_test", "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    # A bad config is a usage error, not a crash.
    assert main(["data", "check", str(write_yaml(tmp_path / "x.yaml", "dataset: nope\n")), "--no-progress"]) == 2


def test_check_reports_unreadable_annotations(tmp_path):
    cfg = DataConfig(dataset="msrvtt", anno_path=tmp_path, video_path=tmp_path)
    report = check_data(cfg, ["test"])
    assert not report.ok and "MSRVTT_JSFUSION_test.csv" in report.splits[0].error
    assert "ERROR" in format_report(report)
