"""Every YAML config loads and validates; unknown keys and bad values are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusionret.config import RunConfig, load_run_config
from diffusionret.config_utils import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
BENCHMARKS = ("msrvtt", "msvd", "activitynet", "didemo", "lsmdc")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFUSIONRET_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DIFFUSIONRET_CLIP", str(tmp_path / "ViT-B-32.pt"))
    monkeypatch.setenv("DIFFUSIONRET_SMOKE", str(tmp_path / "smoke"))


def test_every_benchmark_has_both_stages() -> None:
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    for dataset in BENCHMARKS:
        assert {f"{dataset}/stage1.yaml", f"{dataset}/stage2.yaml"} <= names, dataset


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS])
def test_config_loads_and_starts_with_its_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    command = f"diffusionret train --config configs/{path.relative_to(CONFIG_DIR).as_posix()}"
    assert first.startswith("# ") and command in first
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model_config().denoisers == (cfg.stage == "generation")


@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_benchmark_configs_use_the_reference_hyperparameters(dataset: str) -> None:
    s1 = load_run_config(CONFIG_DIR / dataset / "stage1.yaml")
    s2 = load_run_config(CONFIG_DIR / dataset / "stage2.yaml")
    assert (s1.stage, s2.stage) == ("discrimination", "generation")
    for cfg in (s1, s2):
        assert (cfg.optim.lr, cfg.optim.clip_lr_scale, cfg.optim.weight_decay) == (1e-4, 1e-3, 0.2)
        assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.eps == 1e-6 and cfg.optim.warmup_proportion == 0.1
        assert cfg.optim.grad_clip == 1.0 and cfg.train.epochs == 5 and cfg.train.ema_decay == 0.99
        assert cfg.data.batch_size == 128 and cfg.data.fps == 1.0 and cfg.seed == 42
        long_videos = dataset in ("activitynet", "didemo")
        assert (cfg.data.max_words, cfg.data.max_frames) == ((64, 64) if long_videos else (32, 12))
        # Datasets without a real validation split select the final epoch, never the test set.
        assert cfg.eval.model_selection == ("last" if dataset in ("msrvtt", "activitynet") else "val")
    assert s1.model.clip_weights is not None and s1.model_config().temporal_layers == 4
    assert s2.model.init_checkpoint == Path(s1.output_dir) / "model.safetensors"
    d = s2.diffusion
    assert (d.steps, d.schedule, d.num_negatives, d.negative_label, d.loss_temp, d.denoiser_temp) == (
        50, "cosine", 127, 0, 100.0, 1.0)
    assert (s2.eval.top_k, s2.eval.alpha, s2.eval.temp, s2.eval.rerank) == (32, 1.0, 1.0, True)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_run_config(CONFIGS[0])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_run_config(path) == cfg


@pytest.mark.parametrize("override,match", [
    ("bogus=1", "unknown keys"),
    ("train.bogus=1", "unknown keys"),
    ("optim.lrr=1e-3", "unknown keys"),
    ("data.frames=8", "unknown keys"),
    ("model.arch.hidden=3", "unknown keys"),
    ("diffusion.num_negative=3", "unknown keys"),
    ("train.epochs=zero", "expected an integer"),
    ("optim.lr=-1", "lr must be > 0"),
    ("stage=pretraining", "is not one of"),
    ("eval.model_selection=val", "data.val_split is not set"),
    ("diffusion.negative_label=1", "is not one of"),
    ("model.arch.stage=generation", "set by the run"),
    ("model.arch.denoisers=true", "set by the run"),
    ("model.arch.diffusion_steps=10", "set by the run"),
])
def test_bad_keys_and_values_are_errors(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_run_config(CONFIG_DIR / "msrvtt" / "stage1.yaml", [override])


def test_stage2_needs_a_stage1_checkpoint_and_unset_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    stage2 = CONFIG_DIR / "msvd" / "stage2.yaml"
    with pytest.raises(ConfigError, match="init_checkpoint"):
        load_run_config(stage2, ["model.init_checkpoint=null"])
    monkeypatch.delenv("DIFFUSIONRET_DATA")
    with pytest.raises(ConfigError, match=r"DIFFUSIONRET_DATA.*not set"):
        load_run_config(stage2)


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    from diffusionret.config_utils import atomic_path, atomic_write_text

    path = tmp_path / "sub" / "file.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]  # no temp file left behind
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["file.txt"]
