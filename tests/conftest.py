"""Shared fixtures: the reference golden file and tiny randomly initialised models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "reference_tiny_a.pt"


@pytest.fixture(scope="session")
def golden() -> dict:
    """Outputs of the public reference on a tiny model (see tests/data/GOLDEN_README.md)."""
    return torch.load(GOLDEN, weights_only=True)


def pytest_configure(config):
    # Tiny models: one intra-op thread is faster than two and avoids oversubscribing the 2-core
    # CI machine when tests spawn worker processes.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
