"""``diffusionret demo``'s settings: stage 2 from the feature cache by default, the online stage 2 on request.

Fast (no demo is run): the command line is parsed into a :class:`DemoConfig` and the stage-2 run
config is built from it, as ``run_demo`` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffusionret.cli import build_parser
from diffusionret.commands.demo import _demo_config
from diffusionret.demo.pipeline import DemoConfig, _stage_config


def _config(*args: str) -> DemoConfig:
    return _demo_config(build_parser().parse_args(["demo", *args]))


def _stage2(cfg: DemoConfig, tmp_path: Path):
    corpus = SimpleNamespace(root=tmp_path / "corpus", video_dir=tmp_path / "corpus" / "videos")
    return _stage_config("generation", corpus, tmp_path, cfg, tmp_path / "stage1.safetensors")


@pytest.mark.parametrize("quick", [False, True])
def test_stage2_trains_from_the_cache_by_default(quick: bool, tmp_path: Path) -> None:
    cfg = _config(*(["--quick"] if quick else []))
    base = DemoConfig.quick() if quick else DemoConfig()
    assert cfg.stage2_cache and base.stage2_cache
    stage2 = _stage2(cfg, tmp_path)
    assert stage2.train.feature_cache == "on"
    assert stage2.train.epochs == base.stage2_cached_epochs
    # More denoiser steps than the online stage 2 (the point of the cache), in about its time.
    assert base.stage2_cached_epochs > base.stage2_epochs
    # Stage 1 never uses the cache.
    assert _stage_config("discrimination", SimpleNamespace(root=tmp_path, video_dir=tmp_path), tmp_path, cfg,
                         None).train.feature_cache == "off"


@pytest.mark.parametrize("quick", [False, True])
def test_no_stage2_cache_is_the_online_stage_2(quick: bool, tmp_path: Path) -> None:
    cfg = _config("--no-stage2-cache", *(["--quick"] if quick else []))
    base = DemoConfig.quick() if quick else DemoConfig()
    assert not cfg.stage2_cache
    stage2 = _stage2(cfg, tmp_path)
    assert stage2.train.feature_cache == "off"
    assert stage2.train.epochs == base.stage2_epochs
    if not quick:
        # The pinned online demo (tests/test_refactor_golden.py): the default settings, stage 2 aside.
        assert cfg == dataclasses.replace(DemoConfig(), stage2_cache=False)


@pytest.mark.parametrize(("flags", "field", "cache"), [
    (["--stage2-epochs", "7"], "stage2_cached_epochs", True),
    (["--stage2-cache", "--stage2-epochs", "7"], "stage2_cached_epochs", True),
    (["--no-stage2-cache", "--stage2-epochs", "7"], "stage2_epochs", False),
])
def test_stage2_epochs_set_the_epochs_of_the_chosen_mode(flags: list[str], field: str, cache: bool,
                                                          tmp_path: Path) -> None:
    cfg = _config(*flags)
    assert getattr(cfg, field) == 7 and cfg.stage2_cache is cache
    assert _stage2(cfg, tmp_path).train.epochs == 7


def test_dataset_negatives_need_the_cache() -> None:
    assert _config("--stage2-negatives", "dataset").stage2_negatives == "dataset"
    with pytest.raises(ValueError, match="needs stage2_cache"):
        _config("--no-stage2-cache", "--stage2-negatives", "dataset")


def test_help_states_the_epochs_of_both_modes(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "500")  # one line per option: no "--no-" / "stage2-cache" wrapping
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    full, quick = DemoConfig(), DemoConfig.quick()
    assert (f"default: {full.stage2_cached_epochs} from the cache, {full.stage2_epochs} with --no-stage2-cache; "
            f"--quick: {quick.stage2_cached_epochs} and {quick.stage2_epochs})") in text
