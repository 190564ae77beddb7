"""SIGTERM (the stop request) and kills during validation: the epoch before it is never lost."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from diffusionret.training.loop import TrainingStopped, train
from test_resume import SMOKE1, Killed, _config, _final_state, corpus  # noqa: F401 - corpus is a fixture


def _validated(cfg_dir: Path, corpus: Path, out: Path):
    # 5 steps per epoch, 2 epochs, validation after each; no periodic checkpoints: only epoch ends save.
    return _config(SMOKE1, corpus, out, "train.checkpoint_every=null", "eval.model_selection=val",
                   "eval.every_epochs=1")


def test_a_kill_during_validation_keeps_the_epoch(corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusionret.evaluation.evaluate as evaluate

    cfg = _validated(SMOKE1, corpus, tmp_path / "run")
    real = evaluate.evaluate_model
    calls = []

    def killed_in_first_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise Killed  # SIGTERM's grace period ran out in the middle of a long evaluation
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", killed_in_first_validation)
    with pytest.raises(Killed):
        train(cfg)
    state = _final_state(tmp_path / "run")
    assert state["progress"]["step"] == 5 and state["progress"]["epoch"] == 1  # the whole first epoch
    assert state["progress"]["validation_pending"]
    monkeypatch.setattr(evaluate, "evaluate_model", real)
    train(cfg, resume=True)  # validates epoch 1 first, then trains epoch 2
    assert len(calls) == 1  # (the resumed run used the real evaluation)
    resumed = _final_state(tmp_path / "run")["progress"]
    assert resumed["step"] == 10 and resumed["best_epoch"] in (1, 2) and not resumed["validation_pending"]
    val_epochs = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val_epochs) == 2  # epoch 1's validation was not skipped


def test_a_stop_during_validation_stops_before_the_next_epoch(corpus: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusionret.evaluation.evaluate as evaluate

    cfg = _validated(SMOKE1, corpus, tmp_path / "run")
    stop = threading.Event()
    real = evaluate.evaluate_model

    def stop_requested_meanwhile(*args, **kwargs):
        stop.set()  # SIGTERM arrives while validating
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", stop_requested_meanwhile)
    steps = []
    with pytest.raises(TrainingStopped):
        train(cfg, stop_request=stop, on_step=lambda progress, logs: steps.append(progress.step))
    assert steps == [1, 2, 3, 4, 5]  # no step of the second epoch
    state = _final_state(tmp_path / "run")["progress"]
    assert state["step"] == 5 and not state["validation_pending"] and state["best_epoch"] == 1
