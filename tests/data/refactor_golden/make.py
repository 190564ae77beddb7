"""Regenerate ``refactor_golden.json`` and ``legacy_index/``: what the demo and search gave before a refactor.

The architecture refactor (sampler out of the model, one input config, one retrieval path) must not
change behaviour. This script records, with whatever ``diffusionret`` is importable (run it on the
commit *before* a refactor), the metrics of ``diffusionret demo --seed 3 --threads 2`` and the top 10
of fixed queries searched through the CLI over an index of the demo's test videos, and keeps that
index (without its thumbnails) as ``legacy_index/``. ``tests/test_refactor_golden.py`` checks the
current code against both.

Command that made the committed files (on commit 02db94b, 1 intra-op thread per search)::

    python tests/data/refactor_golden/make.py --work /tmp/golden
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil
import sqlite3
from pathlib import Path

HERE = Path(__file__).parent
#: Free-text queries besides the first test captions (the demo corpus's vocabulary).
EXTRA_QUERIES = ("a small red circle moves to the left", "a large blue square rises on a black background")
NUM_CAPTIONS = 5


def _cli(argv: list[str]) -> str:
    from diffusionret.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"diffusionret {' '.join(argv)} failed with exit code {code}")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the demo run and the index)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    demo = args.work / "demo"
    if not (demo / "metrics.json").is_file():
        _cli(["demo", "--out", str(demo), "--seed", "3", "--threads", "2"])
    torch.set_num_threads(1)
    metrics = json.loads((demo / "metrics.json").read_text())
    settings = metrics["config"]
    corpus = demo / "corpus"
    index = args.work / "index"
    if not (index / "catalog.sqlite").exists():
        _cli(["index", "build", "--model", metrics["models"]["stage2"], "--videos", str(corpus / "test.csv"),
              "--video-root", str(corpus / "videos"), "--out", str(index), "--frames", str(settings["corpus"]["num_frames"]),
              "--fps", str(settings["corpus"]["fps"]), "--no-progress"])
    with open(corpus / "test.csv", newline="", encoding="utf-8") as handle:
        captions = [row["caption"] for row in csv.DictReader(handle)][:NUM_CAPTIONS]
    searches = []
    for query in [*captions, *EXTRA_QUERIES]:
        printed = _cli(["search", str(index), query, "-k", "10", "--json", "--rerank", str(settings["top_k"]),
                        "--max-words", str(settings["max_words"])])
        results = json.loads(printed)
        searches.append({"query": query, "top10": [{"id": r["id"], "score": r["score"]} for r in results]})
    golden = {"demo": {"seed": 3, "test": metrics["test"], "query": metrics["query"]},
              "search": {"max_words": settings["max_words"], "rerank_top_k": settings["top_k"], "candidates": 100,
                         "queries": searches}}
    (HERE / "refactor_golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")

    legacy = HERE / "legacy_index"
    shutil.rmtree(legacy, ignore_errors=True)
    shutil.copytree(index, legacy, ignore=shutil.ignore_patterns("*.lock", "*-wal", "*-shm"))
    print(f"wrote {HERE / 'refactor_golden.json'} and {legacy}")


if __name__ == "__main__":
    main()
