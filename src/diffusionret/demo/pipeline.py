"""The offline demo: synthetic corpus -> stage 1 -> stage 2 -> evaluation -> an example query.

Everything goes through the code paths of real training: the corpus is written in the user-data
format (videos + ``train.csv`` / ``test.csv``), both stages run through
:func:`diffusionret.training.loop.train` with ordinary :class:`~diffusionret.config.RunConfig` objects
(their resolved YAML lands in each stage's folder, so ``diffusionret train --config`` re-runs them),
and the test split is scored by :mod:`diffusionret.evaluation.evaluate`, with and without diffusion
re-ranking. The model is the ``tiny`` preset trained from random weights (no CLIP download).

Output folder::

    corpus/            videos/*.mp4, train.csv, test.csv, clips.jsonl (the facts of every clip)
    stage1/, stage2/   the two training runs (config.yaml, metrics.jsonl, plots/, model.safetensors)
    metrics.json       test metrics without and with re-ranking, timings, the example query
    plots/             recall.png (WTI vs re-ranked), training.png (losses), query.png (top-5 clips)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusionret.config_utils import atomic_write_text, from_dict
from diffusionret.demo.corpus import Corpus, CorpusConfig, caption, write_corpus
from diffusionret.demo.query import Hit, search_videos

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo run depends on (the defaults are the README's ``diffusionret demo``).

    Attributes:
        seed: seeds the corpus, the model initialisation, shuffling and the re-ranking noise.
        corpus: size and rendering of the synthetic corpus.
        stage1_epochs: passes over the training captions in stage 1.
        batch_size: training batch (stage 2 mines its hard negatives from it).
        lr: peak learning rate of stage 1; the backbone is random, so it trains at the full rate
            (``clip_lr_scale`` 1, unlike CLIP fine-tuning's 1e-3).
        stage2_lr: learning rate of the denoisers.
        weight_decay: decoupled weight decay of both stages.
        max_words: caption token length.
        top_k: candidates per query handed to the denoiser at evaluation.
        diffusion_steps: diffusion steps for stage-2 training and DDIM re-ranking.
        num_workers: DataLoader worker processes; one decodes while the training process computes
            (single-threaded, so it does not fight the training threads for the cores).
        query: the example text query; ``None`` describes a random test clip in fresh words.
        stage2_cache: train stage 2 from the feature cache (``train.feature_cache: on``: the
            training split is encoded once, then the denoisers train on the cached features in their
            factored form) for ``stage2_cached_epochs`` epochs (the default); ``False`` encodes every
            step for ``stage2_epochs`` epochs, the reference's way (``--no-stage2-cache``; the
            pinned behaviour of ``tests/test_refactor_golden.py``).
        stage2_epochs: stage-2 epochs without the cache.
        stage2_cached_epochs: stage-2 epochs with the cache: 55 (935 denoiser steps instead of the
            online path's 51) take about the time of the 3 online epochs, one-off encoding included
            (measured on seed 0: online 25.7 s; from the cache, ~4.6 s of encoding then ~0.37 s an
            epoch, where an online epoch takes ~8.5 s, bound by video decoding and the frozen ViT).
        stage2_negatives: ``batch`` or ``dataset`` (``diffusion.negatives``; ``dataset`` needs the cache).
    """

    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    stage1_epochs: int = 20
    stage2_epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    stage2_lr: float = 1e-3
    weight_decay: float = 0.2
    max_words: int = 24
    top_k: int = 32
    diffusion_steps: int = 50
    num_workers: int = 1
    query: str | None = None
    stage2_cache: bool = True
    stage2_cached_epochs: int = 55
    stage2_negatives: str = "batch"

    def __post_init__(self) -> None:
        if self.stage2_negatives not in ("batch", "dataset"):
            raise ValueError(f"stage2_negatives must be 'batch' or 'dataset', got {self.stage2_negatives!r}")
        if self.stage2_negatives == "dataset" and not self.stage2_cache:
            raise ValueError("stage2_negatives 'dataset' needs stage2_cache")
        if min(self.stage1_epochs, self.stage2_epochs, self.stage2_cached_epochs, self.batch_size, self.top_k, self.diffusion_steps) <= 0:
            raise ValueError("epochs, batch_size, top_k and diffusion_steps must be positive")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (contrastive training needs negatives)")

    @classmethod
    def quick(cls, **changes: Any) -> DemoConfig:
        """A small, fast variant for tests (about a minute on two cores)."""
        base: dict[str, Any] = {
            "corpus": CorpusConfig(num_train=150, num_test=50, max_train_captions=2),
            "stage1_epochs": 12, "stage2_epochs": 2, "stage2_cached_epochs": 20, "batch_size": 32, "top_k": 8,
            "diffusion_steps": 10,
        }
        base.update(changes)
        return cls(**base)


@dataclass(frozen=True)
class QueryAnswer:
    """The example query and what the model returned for it.

    Attributes:
        query: the text.
        target: video id of the clip the query was written for (``None`` for a user query).
        hits: the top videos, best first.
        target_rank: 1-based rank of ``target`` in the final ranking (``None`` if unknown).
        target_wti_rank: its rank before re-ranking.
    """

    query: str
    target: str | None
    hits: tuple[Hit, ...]
    target_rank: int | None
    target_wti_rank: int | None


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        out_dir: the output folder.
        metrics: the content of ``metrics.json``.
        answer: the example query and its answer.
        plots: PNG files written into ``out_dir/plots``.
        corpus: the written corpus.
        moment: the long-video query and the moment it found (``None`` if not run).
    """

    out_dir: Path
    metrics: dict[str, Any]
    answer: QueryAnswer
    plots: tuple[Path, ...]
    corpus: Corpus
    moment: Any = None


def _stage_config(stage: str, corpus: Corpus, out_dir: Path, cfg: DemoConfig, init: Path | None) -> Any:
    """The :class:`~diffusionret.config.RunConfig` of one stage, built like a YAML file would be."""
    from diffusionret.config import RunConfig

    c = cfg.corpus
    stage1 = stage == "discrimination"
    data = {
        "dataset": "custom", "anno_path": str(corpus.root), "video_path": str(corpus.video_dir),
        "max_words": cfg.max_words, "max_frames": c.num_frames, "fps": float(c.fps), "size": c.frame_size,
        "batch_size": cfg.batch_size, "batch_size_val": 128, "num_workers": cfg.num_workers,
        "pin_memory": False, "seed": cfg.seed,
    }
    raw = {
        "stage": stage,
        "output_dir": str(out_dir / ("stage1" if stage1 else "stage2")),
        "seed": cfg.seed,
        "model": {"preset": "tiny", **({} if init is None else {"init_checkpoint": str(init)})},
        "data": data,
        "optim": {"lr": cfg.lr if stage1 else cfg.stage2_lr, "clip_lr_scale": 1.0,
                  "weight_decay": cfg.weight_decay, "warmup_proportion": 0.05},
        "train": {"epochs": cfg.stage1_epochs if stage1 else _stage2_epochs(cfg), "device": "cpu",
                  "ema_decay": None, "log_every": 10,
                  "feature_cache": "on" if cfg.stage2_cache and not stage1 else "off"},
        # As many candidates per query in training as the re-ranking sees at test time (top_k), and
        # few enough that a batch with repeated videos still offers them.
        "diffusion": {"steps": cfg.diffusion_steps,
                      "num_negatives": max(1, min(cfg.top_k, cfg.batch_size // 2) - 1),
                      "negatives": cfg.stage2_negatives},
        # The demo has no validation split: keep the final epoch, and test once, below.
        "eval": {"model_selection": "last", "test_after_training": False, "top_k": cfg.top_k,
                 "seed": cfg.seed, "precision": "fp32"},
    }
    return from_dict(RunConfig, raw)


def _stage2_epochs(cfg: DemoConfig) -> int:
    return cfg.stage2_cached_epochs if cfg.stage2_cache else cfg.stage2_epochs


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 2)
    logger.info("%s took %.1f s", name, timings[name])
    return result


def _stem(video_id: str) -> str:
    return video_id.rsplit("/", 1)[-1].removesuffix(".mp4")


def example_query(corpus: Corpus, rng: np.random.Generator) -> tuple[str, str]:
    """A fresh description (not the test caption itself) of a random test clip: ``(query, video_id)``."""
    spec = corpus.test[int(rng.integers(len(corpus.test)))]
    return caption(spec, rng), spec.video_id


def _answer(model: Any, feats: Any, corpus: Corpus, cfg: DemoConfig, rng: np.random.Generator, *, max_words: int,
            rerank: Any) -> QueryAnswer:
    if cfg.query is not None:
        query, target = cfg.query, None
    else:
        query, target = example_query(corpus, rng)
    generator = torch.Generator().manual_seed(cfg.seed)
    everything = search_videos(model, query, feats, k=feats.num_videos, rerank=rerank, max_words=max_words,
                               generator=generator)
    target_hit = next((h for h in everything if _stem(h.video_id) == target), None)
    return QueryAnswer(
        query=query,
        target=target,
        hits=tuple(everything[:5]),
        target_rank=target_hit.rank if target_hit else None,
        target_wti_rank=target_hit.wti_rank if target_hit else None,
    )


def _metrics_summary(results: dict[str, Any], corpus: Corpus) -> dict[str, Any]:
    wti = {d: results[d] for d in ("t2v", "v2t")}
    summary: dict[str, Any] = {
        "num_test_videos": results["num_videos"],
        "num_test_captions": results["num_captions"],
        "chance_R1": 100.0 / max(1, results["num_videos"]),
        "wti": wti,
    }
    if "rerank" in results:
        summary["rerank"] = results["rerank"]
        summary["rerank_effect"] = {
            f"{d}/{k}": round(results["rerank"][d][k] - results[d][k], 3)
            for d in ("t2v", "v2t") for k in ("R1", "R5", "R10")
        }
    return summary


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> DemoResult:
    """Run the whole demo into ``out_dir`` (see the module docstring for what it writes).

    Args:
        out_dir: output folder; must not hold a previous demo's training runs.
        cfg: demo settings (default: :class:`DemoConfig`).

    Returns:
        Metrics, the example query's answer and the written plots.

    Raises:
        FileExistsError: ``out_dir`` already holds a demo run.
    """
    from diffusionret.distributed import DistContext
    from diffusionret.models.checkpoint import load_checkpoint
    from diffusionret.training.loop import train

    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir)
    if (out_dir / "stage1").exists() or (out_dir / "stage2").exists():
        raise FileExistsError(f"{out_dir} already holds a demo run; remove it or choose another --out")
    rng = np.random.default_rng(cfg.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    corpus = _timed(timings, "corpus", lambda: write_corpus(out_dir / "corpus", cfg.corpus, rng))
    stage1 = _stage_config("discrimination", corpus, out_dir, cfg, None)
    stage1_model = _timed(timings, "stage1", lambda: train(stage1))
    stage2 = _stage_config("generation", corpus, out_dir, cfg, stage1_model)
    stage2_model = _timed(timings, "stage2", lambda: train(stage2))

    ctx = DistContext.single("cpu")
    loaded = load_checkpoint(stage2_model)
    model = loaded.model
    # Re-ranking as stage 2 trained it (the run's diffusion section) with the run's eval settings.
    rerank = stage2.rerank_config()

    feats, results = _timed(timings, "evaluation", lambda: _evaluate_test(stage2, model, ctx, rerank))
    answer = _timed(timings, "query", lambda: _answer(model, feats, corpus, cfg, rng, max_words=loaded.input.max_words,
                                                      rerank=rerank))

    from diffusionret.demo.plots import plot_demo

    plots = _timed(timings, "plots", lambda: plot_demo(out_dir, results, answer, corpus))
    # Last, with its own generator: nothing above (the metrics) depends on it.
    from diffusionret.demo.moment_query import long_video_query

    moment = _timed(timings, "moment_query", lambda: long_video_query(
        model, corpus, fps=cfg.corpus.fps, sample_fps=loaded.input.fps, max_frames=loaded.input.max_frames,
        max_words=loaded.input.max_words, seed=cfg.seed))
    timings["total"] = round(time.perf_counter() - started, 2)
    metrics = {
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "corpus": {"train_videos": len(corpus.train), "test_videos": len(corpus.test),
                   "train_captions": _count_rows(corpus.train_csv)},
        "test": _metrics_summary(results, corpus),
        "timings_s": timings,
        "query": {"text": answer.query, "target": answer.target, "target_rank": answer.target_rank,
                  "target_wti_rank": answer.target_wti_rank, "top5": [_hit_summary(h) for h in answer.hits]},
        "models": {"stage1": str(stage1_model), "stage2": str(stage2_model)},
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    return DemoResult(out_dir=out_dir, metrics=metrics, answer=answer, plots=tuple(plots), corpus=corpus,
                      moment=moment)


def _hit_summary(hit: Hit) -> dict[str, Any]:
    return {"rank": hit.rank, "video_id": hit.video_id, "score": hit.score, "wti_score": hit.wti_score,
            "wti_rank": hit.wti_rank}


def _evaluate_test(stage2: Any, model: Any, ctx: Any, rerank: Any) -> tuple[Any, dict[str, Any]]:
    """Encode the test split and score it without and with re-ranking (the demo's evaluation).

    Args:
        stage2: the stage-2 run config; model: the trained model; ctx: a one-process context;
        rerank: the :class:`RerankConfig` (``stage2.rerank_config()``).
    """
    from diffusionret.evaluation.evaluate import evaluate_features, extract_features

    feats = extract_features(stage2, model, split="test", dist=ctx)
    ev = stage2.eval
    results = evaluate_features(model, feats, ctx=ctx, chunk_size=ev.chunk_size, rerank=rerank, seed=ev.seed,
                                ties=ev.ties, progress=False)
    return feats, results


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return max(0, sum(1 for _ in f) - 1)
