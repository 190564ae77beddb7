"""Regenerate tests/data/smoke_losses.json: the first logged losses of the two smoke runs.

    PYTHONPATH=src python tests/data/make_smoke_losses.py

Runs ``diffusionret train`` with configs/smoke_stage1.yaml and then configs/smoke_stage2.yaml on
the lossless smoke corpus of tests/helpers.py, on one CPU thread (as the tests run), and records
the training losses of step 1 of each stage and the loss of every step. tests/test_train_e2e.py
compares a fresh run with them, so that a change of the training maths cannot pass silently. Regenerate only for an
intended change of the maths, and say so in the commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "smoke_losses.json"
# The logged values of step 1 that are compared; all of them are functions of the maths only.
KEYS = {"stage1": ("loss",), "stage2": ("loss", "gen_t2v", "gen_v2t", "disc_loss", "num_negatives")}


def first_step_losses(run: Path, keys: tuple[str, ...]) -> dict[str, float | list[float]]:
    """The chosen values of the first ``train`` record of ``run``/metrics.jsonl, and the loss of
    every step (``loss_per_step``: later steps also depend on the optimiser's updates)."""
    with open(run / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    if not train or train[0]["step"] != 1:
        raise ValueError(f"{run / 'metrics.jsonl'}: no train record of step 1")
    return {**{key: train[0][key] for key in keys}, "loss_per_step": [r["loss"] for r in train]}


def run_smoke(root: Path) -> dict[str, dict[str, float]]:
    """Both smoke runs on a fresh corpus under ``root``; returns the step-1 values per stage."""
    sys.path.insert(0, str(TESTS))
    from helpers import SMOKE1, SMOKE2, write_smoke_corpus

    from diffusionret.cli import main

    write_smoke_corpus(root)
    previous = os.environ.get("DIFFUSIONRET_SMOKE")
    os.environ["DIFFUSIONRET_SMOKE"] = str(root)
    try:
        for config in (SMOKE1, SMOKE2):
            with contextlib.redirect_stdout(sys.stderr):
                if main(["train", "--config", str(config)]) != 0:
                    raise RuntimeError(f"diffusionret train --config {config} failed")
    finally:
        if previous is None:
            os.environ.pop("DIFFUSIONRET_SMOKE")
        else:
            os.environ["DIFFUSIONRET_SMOKE"] = previous
    return {stage: first_step_losses(root / "runs" / stage, keys) for stage, keys in KEYS.items()}


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        values = run_smoke(Path(tmp))
    tmp_out = OUT.with_name(OUT.name + ".tmp")
    tmp_out.write_text(json.dumps({
        "command": "PYTHONPATH=src python tests/data/make_smoke_losses.py",
        "torch": torch.__version__,
        **values,
    }, indent=2) + "\n")
    tmp_out.replace(OUT)
    print(json.dumps(values, indent=2))


if __name__ == "__main__":
    main()
