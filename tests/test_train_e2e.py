"""End to end through the CLI: tiny config, stage 1 and stage 2 a few steps, evaluate, metrics written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionret.cli import main
from helpers import SMOKE1, SMOKE2, write_smoke_corpus

pytestmark = pytest.mark.slow  # both stages trained end to end

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 then stage 2 through ``diffusionret train`` (shared by the tests of this module)."""
    root = write_smoke_corpus(tmp_path_factory.mktemp("smoke"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSIONRET_SMOKE", str(root))
        assert main(["train", "--config", str(SMOKE1)]) == 0
        assert main(["train", "--config", str(SMOKE2)]) == 0
    return root


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage1_run_folder(smoke_runs: Path) -> None:
    run = smoke_runs / "runs" / "stage1"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "checkpoints/last.pt", "model.safetensors",
                 "test_metrics.json", "plots/loss.png", "plots/recall.png"):
        assert (run / name).is_file(), name
    assert (run / "config.yaml").read_text().startswith("# resolved config; re-run with: diffusionret train")
    records = _records(run)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 10 samples / global batch 4 = 2 steps, 2 epochs
    assert all(np.isfinite(r["loss"]) for r in train)
    val = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2]
    assert "t2v/R1" in val[0] and "ema/t2v/R1" in val[0] and "rerank/t2v/R1" not in val[0]
    test = json.loads((run / "test_metrics.json").read_text())
    # The multi-caption test video is encoded once: 3 captions, 2 videos.
    assert test["num_captions"] == 3 and test["num_videos"] == 2 and "rerank" not in test


def test_smoke_losses_are_pinned(smoke_runs: Path) -> None:
    """The smoke runs' losses equal those recorded in tests/data/smoke_losses.json (one thread, lossless
    videos): only a change of the training maths moves them. After an intended change, regenerate
    with the command in tests/data/make_smoke_losses.py and say why in the commit."""
    expected = json.loads((DATA / "smoke_losses.json").read_text())
    for stage in ("stage1", "stage2"):
        train = [r for r in _records(smoke_runs / "runs" / stage) if r["kind"] == "train"]
        got = {key: train[0][key] for key in expected[stage] if key != "loss_per_step"}
        got["loss_per_step"] = [r["loss"] for r in train]
        assert got.keys() == expected[stage].keys()
        for key, value in expected[stage].items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=0), (stage, key, got[key])


def test_stage2_trains_only_the_denoisers(smoke_runs: Path) -> None:
    from diffusionret.models.checkpoint import load_model

    stage1 = load_model(smoke_runs / "runs" / "stage1" / "model.safetensors")
    stage2 = load_model(smoke_runs / "runs" / "stage2" / "model.safetensors")
    assert not stage1.has_denoisers and stage2.has_denoisers
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    for name, value in s1.items():  # the frozen backbone is bit-identical
        assert torch.equal(value, s2[name]), name
    payload = torch.load(smoke_runs / "runs" / "stage2" / "checkpoints" / "last.pt", weights_only=True)
    trained = {n for group in payload["optimizer"]["param_groups"] for n in group["params"]}
    assert len(trained) == sum(1 for n, p in stage2.named_parameters() if n.startswith("diffusion_model"))
    records = _records(smoke_runs / "runs" / "stage2")
    train = [r for r in records if r["kind"] == "train"]
    # Global batch 4: at most 3 negatives per query (fewer when it holds two copies of a video).
    assert all(1 <= r["num_negatives"] <= 3 for r in train)
    assert all(np.isfinite(r["gen_t2v"]) and np.isfinite(r["gen_v2t"]) for r in train)
    val = [r for r in records if r["kind"] == "val"]
    assert val and "rerank/t2v/R1" in val[-1] and "rerank/v2t/R5" in val[-1]
    assert "rerank" in json.loads((smoke_runs / "runs" / "stage2" / "test_metrics.json").read_text())


def test_eval_command_is_seeded_and_caches_features(smoke_runs: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DIFFUSIONRET_SMOKE", str(smoke_runs))
    ckpt = smoke_runs / "runs" / "stage2" / "model.safetensors"
    feats = smoke_runs / "feats.safetensors"
    outs = [smoke_runs / f"eval_{i}.json" for i in range(3)]
    base = ["eval", "--checkpoint", str(ckpt), "--config", str(SMOKE2)]
    assert main(base + ["--output", str(outs[0])]) == 0
    table = capsys.readouterr().out
    assert "t2v (re-ranked)" in table and "v2t" in table
    assert main(base + ["--output", str(outs[1]), "--features", str(feats)]) == 0
    assert feats.is_file()
    assert main(base + ["--output", str(outs[2]), "--features", str(feats)]) == 0  # re-uses the cache
    results = [json.loads(p.read_text()) for p in outs]
    assert results[0] == results[1] == results[2]
    assert set(results[0]) >= {"t2v", "v2t", "rerank", "num_captions", "num_videos"}
    # Without re-ranking: the same WTI numbers, no re-ranked ones.
    assert main(base + ["--output", str(outs[0]), "--no-rerank"]) == 0
    plain = json.loads(outs[0].read_text())
    assert "rerank" not in plain and plain["t2v"] == results[0]["t2v"]
    # The cache refuses another model.
    stage1 = smoke_runs / "runs" / "stage1" / "model.safetensors"
    with pytest.raises(ValueError, match="do not match"):
        main(["eval", "--checkpoint", str(stage1), "--config", str(SMOKE2), "--features", str(feats)])


def test_extract_command(smoke_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusionret.evaluation.features import CorpusFeatures

    monkeypatch.setenv("DIFFUSIONRET_SMOKE", str(smoke_runs))
    out = smoke_runs / "extract.safetensors"
    ckpt = smoke_runs / "runs" / "stage1" / "checkpoints" / "last.pt"
    assert main(["extract", "--checkpoint", str(ckpt), "--config", str(SMOKE1), "--split", "val",
                 "--output", str(out)]) == 0
    feats = CorpusFeatures.load(out)
    assert feats.num_captions == 2 and feats.num_videos == 2 and feats.video_ids == ["v8", "v9"]
    assert feats.tokens.shape == (2, 16, 64) and feats.video.shape == (2, 3, 64)
    assert feats.caption_to_video.tolist() == [0, 1] and feats.meta["split"] == "val"


def test_stage2_from_the_feature_cache_trains_like_stage2_online(smoke_runs: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.feature_cache: auto`` (the smoke config: no augmentation) encoded the training split once;
    the same run encoding every step (``off``) logs the same losses, step by step."""
    monkeypatch.setenv("DIFFUSIONRET_SMOKE", str(smoke_runs))
    cached = smoke_runs / "runs" / "stage2"
    assert (cached / "feature_cache" / "train.safetensors").is_file()
    online = smoke_runs / "runs" / "stage2_online"
    assert main(["train", "--config", str(SMOKE2), f"output_dir={online}", "train.feature_cache=off",
                 "eval.test_after_training=false"]) == 0
    assert not (online / "feature_cache").exists()
    steps = {run: [r for r in _records(run) if r["kind"] == "train"] for run in (cached, online)}
    assert [r["step"] for r in steps[cached]] == [r["step"] for r in steps[online]] == [1, 2, 3, 4]
    for key in ("loss", "gen_t2v", "gen_v2t", "disc_loss", "num_negatives"):
        torch.testing.assert_close(torch.tensor([r[key] for r in steps[cached]]),
                                   torch.tensor([r[key] for r in steps[online]]), rtol=1e-5, atol=1e-6, msg=key)


def test_stage2_with_augmentation_trains_from_cached_augmented_views(smoke_runs: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.feature_cache_views: 2`` with ``data.augment``: two views encoded, each epoch trained from one."""
    from diffusionret.evaluation.features import CorpusFeatures

    monkeypatch.setenv("DIFFUSIONRET_SMOKE", str(smoke_runs))
    run = smoke_runs / "runs" / "stage2_views"
    assert main(["train", "--config", str(SMOKE2), f"output_dir={run}", "data.augment=crop_flip",
                 "train.feature_cache_views=2", "eval.test_after_training=false", "eval.model_selection=last"]) == 0
    views = [CorpusFeatures.load(run / "feature_cache" / f"view{v}" / "train.safetensors") for v in range(2)]
    assert torch.equal(views[0].tokens, views[1].tokens) and not torch.equal(views[0].video, views[1].video)
    assert [r["step"] for r in _records(run) if r["kind"] == "train"] == [1, 2, 3, 4]  # 2 epochs, one view each
