"""Kill a run after some steps, resume it, and end with exactly the parameters of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusionret.config import load_run_config
from diffusionret.training.loop import train
from helpers import SMOKE1, SMOKE2, write_smoke_corpus

pytestmark = pytest.mark.slow  # training runs killed and resumed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_smoke_corpus(tmp_path_factory.mktemp("resume"))


class Killed(Exception):
    """Stands in for SIGKILL: the process dies between two steps, after nothing but the last checkpoint."""


def _config(config: Path, corpus: Path, out: Path, *extra: str):
    # Global batch 2 over 10 samples: 5 steps per epoch, 2 epochs; checkpoints every 2 steps, so a kill
    # at step 3 loses a step and resumes in the middle of the first epoch.
    overrides = [f"output_dir={out}", "data.batch_size=2", "train.epochs=2", "train.checkpoint_every=2",
                 "train.log_every=100", "eval.model_selection=last", "eval.test_after_training=false", *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSIONRET_SMOKE", str(corpus))
        return load_run_config(config, overrides)


def _kill_at(step: int):
    def on_step(progress, logs):
        if progress.step == step:
            raise Killed

    return on_step


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["progress"] == b["progress"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][name], b["ema"]["shadow"][name]), f"ema {name}"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for slot in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][slot], state_b[key][slot]), (key, slot)
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.parametrize("stage", ["discrimination", "generation"])
def test_resume_after_kill_matches_uninterrupted_run(stage: str, corpus: Path, tmp_path: Path) -> None:
    if stage == "discrimination":
        config, extra = SMOKE1, ()
    else:
        # Stage 2 starts from a stage-1 result; its t and noise come from a generator that must resume too.
        init = tmp_path / "stage1"
        train(_config(SMOKE1, corpus, init, "train.epochs=1", "train.checkpoint_every=null"))
        config, extra = SMOKE2, (f"model.init_checkpoint={init / 'model.safetensors'}",)

    full = tmp_path / "full"
    train(_config(config, corpus, full, *extra))

    broken = tmp_path / "broken"
    cfg = _config(config, corpus, broken, *extra)
    with pytest.raises(Killed):
        train(cfg, on_step=_kill_at(3))
    killed_at = _final_state(broken)["progress"]
    assert (killed_at["step"], killed_at["epoch"], killed_at["step_in_epoch"]) == (2, 0, 2)
    with pytest.raises(FileExistsError):  # a second start without --resume must not clobber the run
        train(cfg)
    train(cfg, resume=True)

    a, b = _final_state(full), _final_state(broken)
    assert a["progress"]["step"] == 10
    _assert_same_run(a, b)
    if stage == "generation":
        assert a["rng"][0]["generators"]["stage2"].equal(b["rng"][0]["generators"]["stage2"])


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    from diffusionret.training import checkpoint as ckpt

    path = tmp_path / "last.pt"
    ckpt.atomic_torch_save({"step": 1}, path)

    def broken_save(obj, file):
        Path(file).write_bytes(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_stop_and_save_requests(corpus: Path, tmp_path: Path) -> None:
    """What SIGTERM / SIGUSR1 do under ``diffusionret train``: checkpoint after the current step."""
    import threading

    from diffusionret.training.loop import TrainingStopped

    save, stop = threading.Event(), threading.Event()

    def on_step(progress, logs):
        # Requests are checked after each step, before on_step: set during step N, honoured after N + 1.
        if progress.step == 1:
            save.set()  # SIGUSR1
        if progress.step == 3:
            stop.set()  # SIGTERM

    cfg = _config(SMOKE1, corpus, tmp_path / "run", "train.checkpoint_every=null")
    with pytest.raises(TrainingStopped) as info:
        train(cfg, on_step=on_step, save_request=save, stop_request=stop)
    assert info.value.checkpoint == tmp_path / "run" / "checkpoints" / "last.pt"
    assert _final_state(tmp_path / "run")["progress"]["step"] == 4  # stop seen after step 4
    events = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    assert len(events) == 2 and not save.is_set()  # the step-2 save request, then the stop
    train(cfg, resume=True)
    assert _final_state(tmp_path / "run")["progress"]["step"] == 10


# ------------------------------------------------- a stop or a kill during validation (SIGTERM, then SIGKILL)
def _validated(corpus: Path, out: Path):
    # 5 steps per epoch, 2 epochs, validation after each; no periodic checkpoints: only epoch ends save.
    return _config(SMOKE1, corpus, out, "train.checkpoint_every=null", "eval.model_selection=val",
                   "eval.every_epochs=1")


def test_a_kill_during_validation_keeps_the_epoch(corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusionret.evaluation.evaluate as evaluate

    cfg = _validated(corpus, tmp_path / "run")
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
    import threading

    import diffusionret.evaluation.evaluate as evaluate
    from diffusionret.training.loop import TrainingStopped

    cfg = _validated(corpus, tmp_path / "run")
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
