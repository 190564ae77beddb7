"""Behaviour is pinned across refactors: the demo's metrics and search over an index built by older code.

``tests/data/refactor_golden/`` holds what commit 02db94b (before the architecture refactor: sampler
out of the model, one input config, one retrieval path) produced, made by the script next to it:
the metrics of ``diffusionret demo --seed 3 --threads 2`` and the top 10 of fixed queries over an index
of that demo's test videos, plus that index itself (``legacy_index/``, written by the old code). The
session's demo run (``demo_run`` in ``conftest.py``: the same command with ``--no-stage2-cache``, since
stage 2 from the feature cache became the default; the online stage 2 stays an option and must not
drift) must reproduce the metrics exactly, and searching the old index with today's code must return
the same videos and scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import cli_logging
from diffusionret.cli import main

pytestmark = pytest.mark.slow

GOLDEN_DIR = Path(__file__).parent / "data" / "refactor_golden"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN_DIR / "refactor_golden.json").read_text())


def test_demo_metrics_are_unchanged(demo_run, golden: dict) -> None:
    code, out, _ = demo_run
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == golden["demo"]["test"]
    assert metrics["query"] == golden["demo"]["query"]


def test_index_built_by_old_code_gives_the_same_top_10(demo_run, golden: dict, tmp_path: Path, capsys) -> None:
    code, out, _ = demo_run
    assert code == 0
    model = json.loads((out / "metrics.json").read_text())["models"]["stage2"]
    index = tmp_path / "legacy_index"
    shutil.copytree(GOLDEN_DIR / "legacy_index", index)
    settings = golden["search"]
    for expected in settings["queries"]:
        capsys.readouterr()
        with cli_logging():
            code = main(["search", str(index), expected["query"], "-k", "10", "--json", "--model", model,
                         "--rerank", str(settings["rerank_top_k"]), "--candidates", str(settings["candidates"]),
                         "--max-words", str(settings["max_words"])])
        assert code == 0
        results = json.loads(capsys.readouterr().out)
        assert [r["id"] for r in results] == [e["id"] for e in expected["top10"]], expected["query"]
        assert [r["score"] for r in results] == pytest.approx([e["score"] for e in expected["top10"]], abs=1e-6)
