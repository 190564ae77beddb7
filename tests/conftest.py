"""Shared fixtures: the reference golden file and tiny randomly initialised models."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from helpers import cli_logging

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "reference_tiny_a.pt"


@pytest.fixture(scope="session")
def golden() -> dict:
    """Outputs of the public reference on a tiny model (see tests/data/GOLDEN_README.md)."""
    return torch.load(GOLDEN, weights_only=True)


def pytest_configure(config):
    # Module- and session-scoped fixtures run before the per-test fixture below: one thread for them too.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """Every test starts with one intra-op thread and torch seeded with 0.

    Tiny models: one thread is faster than two, and OpenMP threads fighting for the cores of a shared
    2-core machine (or with the worker processes a test spawns) are up to ~50x slower. Reset before
    every test because commands under test (``demo --threads 2``) may change it.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    """``diffusionret demo --seed 3 --no-stage2-cache`` (the full demo, a seed other than the default) through the CLI.

    Run once per session (3-5 minutes on a 2-core machine); returns its exit status, output folder
    (corpus, trained models, metrics) and what it printed. Stage 2 is the online one (encoding every
    step), not the default cached one: ``test_refactor_golden.py`` pins this run's metrics exactly.
    Shared with ``test_demo.py`` (the demo's outputs and targets, which hold in either stage-2 mode)
    and ``test_search_demo.py`` (indexing and searching its test videos), so CI runs one full demo;
    ``test_demo.py`` checks the cached default on the ``--quick`` demo.
    """
    from diffusionret.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    printed = io.StringIO()
    with cli_logging(), contextlib.redirect_stdout(printed):
        code = main(["demo", "--out", str(out), "--seed", "3", "--threads", "2", "--no-stage2-cache"])
    return code, out, printed.getvalue()
