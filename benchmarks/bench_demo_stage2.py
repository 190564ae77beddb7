"""What stage 2 adds on the demo: the online stage 2 against stage-2 runs from the feature cache.

For every seed the demo with the online stage 2 runs once (``run_demo`` with ``stage2_cache=False``:
corpus, stage 1, 3 online stage-2 epochs, evaluation; the demo's default before stage 2 from the cache
became it); then, from the *same* stage-1 model and corpus, stage 2 is trained again per variant
(feature cache, ``DemoConfig``'s cached epochs unless ``--epochs``; optionally ``diffusion.negatives:
dataset``) and the test split is evaluated exactly as the demo does. Prints one JSON line per run
(stage-2 seconds include the one-off encoding of the training split) and a table of R@1 without and
with re-ranking::

    PYTHONPATH=src python benchmarks/bench_demo_stage2.py --seeds 0 1 2 --out /tmp/demo-stage2
    PYTHONPATH=src python benchmarks/bench_demo_stage2.py --quick --seeds 0   # ~1 min per run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def _summary(name: str, seed: int, results: dict[str, Any], stage2_s: float, steps: int | None) -> dict[str, Any]:
    row = {"variant": name, "seed": seed, "stage2_s": round(stage2_s, 1), "stage2_steps": steps}
    for direction in ("t2v", "v2t"):
        row[f"{direction}_R1"] = results[direction]["R1"]
        row[f"{direction}_R1_rerank"] = results["rerank"][direction]["R1"]
    return row


def _steps(run_dir: Path) -> int | None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if json.loads(line).get("kind") == "train"]
    return max(steps) if steps else None


def main() -> None:
    from diffusionret.demo.pipeline import DemoConfig, _evaluate_test, _stage_config, run_demo
    from diffusionret.distributed import DistContext
    from diffusionret.models.checkpoint import load_checkpoint
    from diffusionret.training.loop import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/demo-stage2"))
    parser.add_argument("--quick", action="store_true", help="the --quick demo (small corpus)")
    parser.add_argument("--epochs", type=int, default=None, help="stage-2 epochs from the cache (default: DemoConfig)")
    parser.add_argument("--variants", nargs="+", default=["cache", "cache_dataset"],
                        choices=["cache", "cache_dataset"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true",
                        help="re-use <out>/seed<N>/today (corpus, stage 1, the online run's metrics) "
                             "from an earlier run")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        base = (DemoConfig.quick(seed=seed, stage2_cache=False) if args.quick
                else DemoConfig(seed=seed, stage2_cache=False))
        base = dataclasses.replace(base, num_workers=1 if args.threads >= 2 else 0)
        torch.set_num_threads(max(1, args.threads - base.num_workers))
        out = args.out / f"seed{seed}"
        if args.reuse and (out / "today" / "metrics.json").is_file():
            metrics = json.loads((out / "today" / "metrics.json").read_text())
            corpus: Any = SimpleNamespace(root=out / "today" / "corpus", video_dir=out / "today" / "corpus" / "videos")
        else:
            result = run_demo(out / "today", base)
            metrics, corpus = result.metrics, result.corpus
        test = metrics["test"]
        rows.append(_summary("online", seed, {"t2v": test["wti"]["t2v"], "v2t": test["wti"]["v2t"],
                                              "rerank": test["rerank"]}, metrics["timings_s"]["stage2"],
                             _steps(out / "today" / "stage2")))
        print(json.dumps(rows[-1]), flush=True)
        stage1_model = Path(metrics["models"]["stage1"])
        for variant in args.variants:
            changes: dict[str, Any] = {"stage2_cache": True}
            if args.epochs is not None:
                changes["stage2_cached_epochs"] = args.epochs
            if variant == "cache_dataset":
                changes["stage2_negatives"] = "dataset"
            cfg = dataclasses.replace(base, **changes)
            name = f"{variant}_{cfg.stage2_cached_epochs}ep"
            stage2 = _stage_config("generation", corpus, out / name, cfg, stage1_model)
            started = time.perf_counter()
            model_path = train(stage2)
            seconds = time.perf_counter() - started
            model = load_checkpoint(model_path).model
            _feats, results = _evaluate_test(stage2, model, DistContext.single("cpu"), stage2.rerank_config())
            rows.append(_summary(name, seed, results, seconds, _steps(out / name / "stage2")))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | seed | stage-2 s | steps | t2v R@1 | t2v R@1 re-ranked | v2t R@1 | v2t R@1 re-ranked |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['stage2_s']} | {r['stage2_steps']} | {r['t2v_R1']:.1f} | "
              f"{r['t2v_R1_rerank']:.1f} | {r['v2t_R1']:.1f} | {r['v2t_R1_rerank']:.1f} |")


if __name__ == "__main__":
    main()
