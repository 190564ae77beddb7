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


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
