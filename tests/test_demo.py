"""``diffusionret demo`` end to end through the CLI (seed 3, not the default): outputs exist and the model learns.

The full run is the session fixture ``demo_run`` in ``conftest.py``, with the online stage 2
(``--no-stage2-cache``, pinned by ``test_refactor_golden.py``): what it checks here holds in either
stage-2 mode. The default, stage 2 from the feature cache, is run on the ``--quick`` demo (about a
minute) rather than as a second full demo.
"""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import cli_logging
from diffusionret.cli import main
from diffusionret.demo.pipeline import DemoConfig

pytestmark = pytest.mark.slow


def test_demo_writes_everything(demo_run):
    code, out, printed = demo_run
    assert code == 0
    assert "Without re-ranking" in printed and "With diffusion re-ranking" in printed
    assert "Example query:" in printed and "test_" in printed
    # The last step: one query against a long video assembled from test clips, answered with a moment.
    assert "Long-video query:" in printed and "found the moment" in printed
    assert (out / "corpus" / "long_demo.mp4").is_file()
    for name in ("metrics.json", "plots/recall.png", "plots/training.png", "plots/query.png",
                 "corpus/train.csv", "corpus/test.csv", "stage1/model.safetensors", "stage2/model.safetensors",
                 "stage1/config.yaml", "stage2/config.yaml"):
        assert (out / name).is_file(), name
    assert len(list((out / "corpus" / "videos").glob("*.mp4"))) == 1000


def test_demo_learns_and_reports_both_rankings(demo_run):
    _, out, _ = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["corpus"]["train_videos"] == 750 and metrics["corpus"]["test_videos"] == 250
    test = metrics["test"]
    assert test["num_test_videos"] == 250 and test["num_test_captions"] == 250
    assert test["chance_R1"] == pytest.approx(0.4)
    # The demo's promise (issue 4): text->video R@1 of at least 25 % on the held-out split, from
    # random weights, whether or not the diffusion re-ranking is applied.
    assert test["wti"]["t2v"]["R1"] >= 25.0
    assert test["rerank"]["t2v"]["R1"] >= 25.0
    assert test["wti"]["v2t"]["R1"] >= 25.0
    for direction in ("t2v", "v2t"):
        assert set(test["rerank"][direction]) >= {"R1", "R5", "R10", "MedianR"}
        assert test["rerank_effect"][f"{direction}/R1"] == pytest.approx(
            test["rerank"][direction]["R1"] - test["wti"][direction]["R1"], abs=1e-3)
    query = metrics["query"]
    assert query["target"].startswith("test_") and len(query["top5"]) == 5
    assert 1 <= query["target_rank"] <= 250
    assert set(metrics["timings_s"]) >= {"corpus", "stage1", "stage2", "evaluation", "total"}


def test_demo_refuses_to_overwrite_a_run(demo_run):
    _, out, _ = demo_run
    assert main(["demo", "--quick", "--out", str(out)]) == 1


def test_demo_rejects_bad_arguments(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--num-videos", "3"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path / "y"), "--threads", "0"]) == 2


def _last_step(run_dir) -> int:
    """Optimizer steps a training run took (its last end-of-epoch checkpoint event)."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(e["step"] for e in events if e.get("kind") == "event" and "checkpoint" in e)


def test_quick_demo_trains_stage_2_from_the_cache_by_default(tmp_path) -> None:
    out = tmp_path / "quick"
    with cli_logging():
        assert main(["demo", "--quick", "--out", str(out), "--seed", "1", "--threads", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    quick = DemoConfig.quick()
    assert metrics["config"]["stage2_cache"] is True
    assert yaml.safe_load((out / "stage2" / "config.yaml").read_text())["train"]["feature_cache"] == "on"
    assert list((out / "stage2" / "feature_cache").glob("*.safetensors")), "the training split was not cached"
    # Every cached epoch ran: stage 2 took the stage-1 steps per epoch times its own epochs.
    steps_per_epoch = _last_step(out / "stage1") // quick.stage1_epochs
    assert _last_step(out / "stage2") == steps_per_epoch * quick.stage2_cached_epochs
    test = metrics["test"]
    for direction in ("t2v", "v2t"):
        assert test["rerank_effect"][f"{direction}/R1"] == pytest.approx(
            test["rerank"][direction]["R1"] - test["wti"][direction]["R1"], abs=1e-3)
        # The re-ranked ranking stays a retrieval ranking (chance R@1 is 2 % on 50 test videos; the
        # quick demo's are ~16-24 % with or without re-ranking).
        assert test["rerank"][direction]["R1"] >= 5 * test["chance_R1"]
