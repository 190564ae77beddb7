"""Serve the synthetic search index of ``bench_search.py`` over HTTP, for ``load_test.py``.

    python benchmarks/serve_synthetic.py --videos 1000000 --port 8123 [--batch-max-size 16 --batch-max-wait-ms 0]
    python benchmarks/load_test.py --spawn-synthetic 1000000 --concurrency 8 --serve-args "--batch-max-size 1"

The index, model and cascade are exactly those of ``bench_search.py`` (ViT-B/32-sized text tower,
N = 100, K = 32, 50 DDIM steps, PQ first stage from 100k videos when FAISS is installed, frame
features memory-mapped above 200k videos; the features are generated into ``--cache`` on first
use). The app is :func:`diffusionret.serve.app.create_app` on the uvicorn server of
``diffusionret serve``, with the same options for workers, threads, pending searches and batching.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import uvicorn
from _common import CACHE_DIR

from bench_search import ann_stage, faiss_installed, search_model, synthetic_index
from diffusionret.commands.serve import settle_heap
from diffusionret.index.first_stage import LARGE_INDEX_VIDEOS, FirstStageConfig
from diffusionret.index.identity import model_fingerprint
from diffusionret.index.searcher import SearchConfig, Searcher
from diffusionret.models.config import DiffusionSchedule
from diffusionret.serve.app import ServeConfig, create_app
from diffusionret.serve.server import uvicorn_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (as `serve --threads`)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-pending", type=int, default=64)
    parser.add_argument("--batch-max-size", type=int, default=16)
    parser.add_argument("--batch-max-wait-ms", type=float, default=0.0)
    parser.add_argument("--batch-regroup-ms", type=float, default=20.0)
    parser.add_argument("--batch-split", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--search-timeout", type=float, default=60.0)
    parser.add_argument("--mmap-above", type=int, default=200_000)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR / "search")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = search_model(512, 12)
    model_id = model_fingerprint(model)
    index = synthetic_index(args.videos, 12, 512, model, model_id, args.cache, args.mmap_above)
    config = SearchConfig(first_stage=FirstStageConfig(method="auto"))
    if faiss_installed() and args.videos >= LARGE_INDEX_VIDEOS:
        stage, _ = ann_stage(index, "pq", rebuild=False)
        index.configure_first_stage(config.first_stage, ann=stage)
    searcher = settle_heap(Searcher(model, index, config, model_id=model_id, diffusion=DiffusionSchedule(50)))
    app = create_app(searcher, ServeConfig(max_pending=args.max_pending, workers=args.workers,
                                           search_timeout_s=args.search_timeout, batch_max_size=args.batch_max_size,
                                           batch_max_wait_ms=args.batch_max_wait_ms,
                                           batch_regroup_ms=args.batch_regroup_ms, batch_split=args.batch_split))
    print(f"serving {len(index)} synthetic videos ({searcher.first_stage.describe()}) on port {args.port}", flush=True)
    uvicorn.Server(uvicorn_config(app, "127.0.0.1", args.port, log_level="warning", access_log=False)).run()


if __name__ == "__main__":
    main()
