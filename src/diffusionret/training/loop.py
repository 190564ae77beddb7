"""The training run shared by both stages: data, optimizer, AMP, DDP, checkpoints, validation, logs.

:func:`train` is the Python API behind ``diffusionret train``. A run folder (``output_dir``) holds::

    config.yaml            the resolved run config (first line: the command that re-runs it)
    train.log              the log (written by the CLI)
    metrics.jsonl          one JSON record per logged step / evaluation / event
    tensorboard/           the same scalars, when the tensorboard package is installed
    plots/loss.png         loss curves;  plots/recall.png  recall@K per evaluation (WTI vs re-ranked)
    checkpoints/last.pt    full trainer state, every epoch and on request (resume from it)
    model.safetensors      the selected model (best validation epoch, or the final one)
    test_metrics.json      metrics of the selected model on the test split

Stage differences live in :mod:`.stage1_contrastive` and :mod:`.stage2_diffusion` (the objective
and which parameters train); everything else is here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusionret.config_utils import atomic_write_text
from diffusionret.training import checkpoint as ckpt
from diffusionret.distributed import (
    DistContext,
    TrainSampler,
    all_reduce_mean,
    any_rank,
    barrier,
    gather_objects,
)
from diffusionret.training.ema import ModelEMA
from diffusionret.training.metric_log import MetricLogger
from diffusionret.training.optim import build_optimizer, build_scheduler, clamp_logit_scale
from diffusionret.training.plots import plot_run

logger = logging.getLogger(__name__)

StepCallback = Callable[[ckpt.TrainProgress, dict[str, float]], None]
_LOG_KEYS = ("loss", "disc_loss", "gen_t2v", "gen_v2t", "num_negatives")


class TrainingStopped(RuntimeError):
    """Raised by :func:`train` when a stop was requested; a checkpoint to resume from was written."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        super().__init__(f"training stopped on request; resume from {checkpoint}")


@dataclass
class _Run:
    """Everything a running training owns (one object instead of a dozen locals)."""

    cfg: Any
    ctx: DistContext
    run_dir: Path
    model: nn.Module              # the bare model
    objective: nn.Module          # DDP-wrapped objective (or the bare one)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: ModelEMA | None
    generators: dict[str, torch.Generator]
    sampler: TrainSampler
    loader: DataLoader            # or a CachedBatches over the feature cache (generation stage)
    train_set: Any
    total_steps: int
    amp_dtype: torch.dtype | None
    progress: ckpt.TrainProgress
    metrics: MetricLogger
    selected_state: dict[str, torch.Tensor] | None = None  # CPU copy of the selected weights


# ---------------------------------------------------------------------------------------------- set-up
def resolve_device(cfg: Any) -> torch.device:
    choice = cfg.train.device
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but CUDA is not available")
    return torch.device(choice)


def resolve_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or ``None`` for fp32. CPU always trains in fp32."""
    if device.type != "cuda":
        if precision not in ("auto", "fp32"):
            logger.warning("precision %s requested on CPU: training in fp32", precision)
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_model(cfg: Any, ctx: DistContext, payload: dict[str, Any] | None) -> nn.Module:
    """The model at the start of the run (from the resume checkpoint, an init checkpoint, CLIP or scratch)."""
    from diffusionret.models.checkpoint import load_checkpoint
    from diffusionret.models.factory import build_model
    from diffusionret.training.stage1_contrastive import prepare_stage1_model
    from diffusionret.training.stage2_diffusion import prepare_stage2_model

    init_gen = torch.Generator().manual_seed(cfg.seed)
    d = cfg.diffusion
    if payload is not None:
        model = ckpt.model_from_trainer_checkpoint(payload)
    elif cfg.model.init_checkpoint is not None:
        model = load_checkpoint(cfg.model.init_checkpoint, use_ema=cfg.model.init_use_ema).model
        logger.info("initialised from %s%s", cfg.model.init_checkpoint,
                    " (EMA weights)" if cfg.model.init_use_ema else "")
    elif cfg.model.clip_weights is not None:
        model = build_model(cfg.model_config(), clip_path=cfg.model.clip_weights, generator=init_gen)
        logger.info("CLIP weights from %s", cfg.model.clip_weights)
    else:
        model = build_model(cfg.model_config(), generator=init_gen)
        logger.warning("no model.clip_weights: CLIP starts from random weights (fine for tests, not for results)")
    if cfg.stage == "generation":
        if payload is None and not model.has_denoisers:
            # Denoisers are created with the run's settings (official checkpoints record none).
            model.config = dataclasses.replace(model.config, denoiser_temp=d.denoiser_temp)
        prepare_stage2_model(model, generator=init_gen)
    else:
        prepare_stage1_model(model)
    return model.to(ctx.device)


def _build_objective(cfg: Any, model: nn.Module, ctx: DistContext, cache: Any = None,
                     train_set: Any = None) -> tuple[nn.Module, dict[str, torch.Generator]]:
    from diffusionret.diffusion.gaussian import GaussianDiffusion
    from diffusionret.training.stage1_contrastive import ContrastiveObjective
    from diffusionret.training.stage2_diffusion import GenerationObjective

    if cfg.stage == "discrimination":
        return ContrastiveObjective(model, ctx), {}
    d = cfg.diffusion
    negatives = None
    if d.negatives == "dataset":
        from diffusionret.training.dataset_negatives import build_dataset_negatives

        index = cache.features.text_index
        rows = index.tolist() if index is not None else range(cache.features.num_captions)
        captions = [train_set.records[i].caption for i in rows]
        negatives = build_dataset_negatives(model, cache, captions, d.num_negatives, ctx=ctx,
                                            chunk_size=cfg.eval.chunk_size)
    # Per-rank stream: every rank draws t and noise for its own queries.
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 1_000_003 * (ctx.rank + 1))
    # From the cache the denoisers are the whole step: their factored form (same x0 up to rounding).
    objective = GenerationObjective(model, ctx, num_negatives=d.num_negatives, negative_label=d.negative_label,
                                    loss_temp=d.loss_temp, generator=gen,
                                    diffusion=GaussianDiffusion(d.steps, d.schedule).to(ctx.device),
                                    dataset_negatives=negatives, factored=cache is not None)
    return objective, {"stage2": gen}


def _feature_cache(cfg: Any, ctx: DistContext, run_dir: Path, model: nn.Module, train_set: Any) -> list[Any]:
    """Encode the training split once (or find it encoded) and memory-map it (generation stage).

    Returns:
        the caches of the ``train.feature_cache_views`` views (one without augmentation).
    """
    from diffusionret.training.feature_cache import (CacheSpec, TrainFeatureCache, cache_fingerprint,
                                                     ensure_view_caches, input_settings, view_directory)

    data = cfg.data
    amp_dtype = resolve_amp_dtype(cfg.train.precision, ctx.device)
    encode_dtype = str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"
    inputs = {**input_settings(cfg.input_config()), "dataset": data.dataset, "split": data.reader_split("train"),
              "anno_path": str(data.anno_path), "video_path": str(data.video_path),
              "exclude_ids": list(data.exclude_ids), "num_samples": len(train_set)}
    directory = Path(cfg.train.feature_cache_dir) if cfg.train.feature_cache_dir is not None else run_dir / "feature_cache"
    views = cfg.train.feature_cache_views
    specs = []
    for view in range(views):
        # An augmented view is the draw of one epoch: the augmentation, its seed and the view name it.
        meta = inputs if views == 1 else {**inputs, "augment": data.augment, "augment_seed": data.seed, "view": view}
        fingerprint = cache_fingerprint(model, meta, encode_dtype=encode_dtype,
                                        store_dtype=cfg.train.feature_cache_dtype)
        specs.append(CacheSpec(directory=view_directory(directory, view, views), fingerprint=fingerprint, meta=meta,
                               batch_size=data.batch_size_val, num_workers=data.num_workers, amp_dtype=amp_dtype,
                               store_dtype=cfg.train.feature_cache_dtype))
    started = time.monotonic()
    caches = [TrainFeatureCache(path, len(train_set)) for path in ensure_view_caches(model, train_set, specs, ctx)]
    feats = caches[0].features
    logger.info("feature cache ready in %.1f s: %s (%d captions, %d videos%s); training from the cache",
                time.monotonic() - started, directory, feats.num_captions, feats.num_videos,
                f", {views} augmented views, epoch e reads view e mod {views}" if views > 1 else "")
    return caches


def _wrap_ddp(objective: nn.Module, cfg: Any, ctx: DistContext) -> nn.Module:
    if not ctx.is_distributed:
        return objective
    return nn.parallel.DistributedDataParallel(
        objective,
        device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
        broadcast_buffers=False,  # the only buffers are constant diffusion tables
        find_unused_parameters=cfg.train.find_unused_parameters,
    )


def _train_loader(cfg: Any, ctx: DistContext, run_dir: Path) -> tuple[Any, TrainSampler, DataLoader]:
    from diffusionret.data.collate import collate
    from diffusionret.data.config import build_dataset
    from diffusionret.data.dataset import worker_init_fn

    data = cfg.data
    train_set = build_dataset(data, "train", train=True, report_dir=run_dir)
    sampler = TrainSampler(len(train_set), data.batch_size, ctx, seed=data.seed, shuffle=cfg.train.shuffle)
    loader = DataLoader(train_set, batch_size=sampler.local_batch, sampler=sampler, num_workers=data.num_workers,
                        collate_fn=collate, worker_init_fn=worker_init_fn, drop_last=False,
                        pin_memory=data.pin_memory and ctx.device.type == "cuda")
    logger.info("train split %s: %d samples, %d videos, %d steps per epoch (global batch %d)", train_set.name,
                len(train_set), train_set.num_videos, sampler.steps_per_epoch, data.batch_size)
    return train_set, sampler, loader


def _setup(cfg: Any, ctx: DistContext, resume: bool | str | Path) -> _Run:
    run_dir = Path(cfg.output_dir)
    last = run_dir / "checkpoints" / "last.pt"
    payload = None
    if resume:
        path = last if resume is True else Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        payload = ckpt.load_trainer_checkpoint(path)
        _check_resume_config(payload, cfg)
        logger.info("resuming from %s (step %d)", path, payload["progress"]["step"])
    elif last.exists():
        raise FileExistsError(f"{run_dir} already holds a run ({last}); pass --resume to continue it, "
                              "or choose another output_dir")
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        header = f"# resolved config; re-run with: diffusionret train --config {run_dir / 'config.yaml'}\n"
        atomic_write_text(run_dir / "config.yaml", header + cfg.to_yaml())
    # Same seed on every rank for the model's random parts (DDP also broadcasts rank 0's weights).
    seed_everything(cfg.seed)
    model = _build_model(cfg, ctx, payload)
    train_set, sampler, loader = _train_loader(cfg, ctx, run_dir)
    cache = None
    if cfg.uses_feature_cache():
        from diffusionret.training.feature_cache import CachedBatches

        caches = _feature_cache(cfg, ctx, run_dir, model, train_set)
        loader = CachedBatches(caches, sampler)  # type: ignore[assignment]
        cache = caches[0]  # dataset negatives (one view only: they need data.augment none)
    elif cfg.stage == "generation":
        logger.info("generation stage without the feature cache (train.feature_cache %s, data.augment %s): "
                    "the frozen encoders run at every step", cfg.train.feature_cache, cfg.data.augment)
    objective, generators = _build_objective(cfg, model, ctx, cache, train_set)
    wrapped = _wrap_ddp(objective, cfg, ctx)
    steps = sampler.steps_per_epoch * cfg.train.epochs
    total = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    o = cfg.optim
    optimizer = build_optimizer(model, lr=o.lr, clip_lr_scale=o.clip_lr_scale, weight_decay=o.weight_decay,
                                betas=tuple(o.betas), eps=o.eps)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_proportion=o.warmup_proportion)
    amp_dtype = resolve_amp_dtype(cfg.train.precision, ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    progress = ckpt.TrainProgress()
    # Per-rank randomness from here on (e.g. dropout) differs between ranks.
    seed_everything(cfg.seed + ctx.rank)
    if payload is not None:
        _restore(payload, optimizer, scheduler, scaler, ema, generators, ctx)
        progress = ckpt.TrainProgress.from_dict(payload["progress"])
    return _Run(cfg=cfg, ctx=ctx, run_dir=run_dir, model=model, objective=wrapped, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, ema=ema, generators=generators, sampler=sampler, loader=loader,
                train_set=train_set, total_steps=total, amp_dtype=amp_dtype, progress=progress,
                metrics=MetricLogger(run_dir, enabled=ctx.is_main))


def _check_resume_config(payload: dict[str, Any], cfg: Any) -> None:
    saved = payload.get("run_config") or {}
    if saved.get("stage") != cfg.stage:
        raise ValueError(f"cannot resume a {saved.get('stage')!r} run as stage {cfg.stage!r}")
    now = cfg.to_dict()
    changed = sorted(f"{section}.{key}" for section in now if isinstance(now[section], dict)
                     for key in now[section] if (saved.get(section) or {}).get(key) != now[section][key])
    if changed:
        logger.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))


def _restore(payload: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
             ema: ModelEMA | None, generators: dict[str, torch.Generator], ctx: DistContext) -> None:
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler") is not None and scaler.is_enabled():
        scaler.load_state_dict(payload["scaler"])
    if ema is not None:
        if payload.get("ema") is None:
            logger.warning("the checkpoint has no EMA state: the EMA restarts from the current weights")
        else:
            ema.load_state_dict(payload["ema"])
    states = payload["rng"]
    if len(states) != ctx.world_size:
        logger.warning("checkpoint from %d processes resumed on %d: random streams are not continued exactly",
                       len(states), ctx.world_size)
    ckpt.restore_rng_state(states[ctx.rank % len(states)], generators)


# ---------------------------------------------------------------------------------------------- steps
def _autocast(run: _Run) -> contextlib.AbstractContextManager:
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.ctx.device.type, dtype=run.amp_dtype)


def _train_step(run: _Run, batch: Any) -> dict[str, float]:
    from diffusionret.training.stage1_contrastive import stage1_batch_args

    from diffusionret.training.feature_cache import CachedBatch

    if isinstance(batch, CachedBatch):
        args = batch.args(run.ctx.device)
    else:
        args = stage1_batch_args(batch, run.ctx.device)  # both stages take the same inputs
    with _autocast(run):
        out = run.objective(**args)
    loss = out["loss"]
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.model.parameters() if p.requires_grad]
    clip = run.cfg.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    clamp_logit_scale(run.model, run.cfg.optim.max_logit_scale)
    if run.ema is not None:
        run.ema.update(run.model)
    names = [k for k in _LOG_KEYS if k in out]
    values = all_reduce_mean(torch.stack([out[k].detach().float() for k in names]), run.ctx).tolist()
    logs = dict(zip(names, values))
    if not math.isfinite(logs["loss"]):
        raise FloatingPointError(f"non-finite loss {logs['loss']} at step {run.progress.step + 1}")
    logs["grad_norm"] = float(grad_norm)
    logs["lr"] = run.scheduler.get_last_lr()[0]
    return logs


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: _Run, *, tag: str | None = None) -> Path:
    """Write ``checkpoints/last.pt`` (and ``checkpoints/<tag>.pt``); a collective (RNG of every rank)."""
    rng = gather_objects(ckpt.capture_rng_state(run.generators), run.ctx)
    path = run.run_dir / "checkpoints" / "last.pt"
    if run.ctx.is_main:
        ckpt.save_trainer_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                     scaler=run.scaler, ema=run.ema, rng=rng, progress=run.progress,
                                     run_config=run.cfg.to_dict())
        if tag is not None:
            ckpt.atomic_torch_save(torch.load(path, map_location="cpu", weights_only=True),
                                   run.run_dir / "checkpoints" / f"{tag}.pt")
        run.metrics.log("event", run.progress.step, {"checkpoint": str(path)}, epoch=run.progress.epoch)
    barrier(run.ctx)
    return path


def _save_selected(run: _Run, source: str, score: float | None) -> Path:
    """Keep the live weights or their EMA as the run's result: a CPU copy on every rank (for the final
    test, without relying on a shared filesystem) and ``model.safetensors`` (rank 0)."""
    from diffusionret.models.checkpoint import save_model
    from diffusionret.models.config import DiffusionSchedule

    path = run.run_dir / "model.safetensors"
    meta = {"epoch": str(run.progress.epoch), "step": str(run.progress.step), "weights": source,
            "selection": run.cfg.eval.model_selection, "score": "" if score is None else f"{score:.4f}"}
    d = run.cfg.diffusion
    # The input settings the model was trained with (index build, search and the demo read them) and,
    # for the denoisers, the diffusion process (re-ranking samples it).
    saved = dict(input_config=run.cfg.input_config(), diffusion=DiffusionSchedule(d.steps, d.schedule))
    context = run.ema.applied_to(run.model) if source == "ema" and run.ema is not None else contextlib.nullcontext()
    with context:
        run.selected_state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        if run.ctx.is_main:
            save_model(run.model, path, metadata=meta, **saved)
    barrier(run.ctx)
    return path


# ---------------------------------------------------------------------------------------------- evaluation
def _selection_split(cfg: Any) -> str | None:
    return {"val": "val", "test": "test", "last": None}[cfg.eval.model_selection]


def _log_selection_policy(cfg: Any) -> None:
    policy = cfg.eval.model_selection
    data = cfg.data
    if policy == "val":
        logger.info("model selection: best epoch on the validation split %s/%s (%s)", data.dataset,
                    data.reader_split("val"), cfg.eval.select_metric)
    elif policy == "last":
        logger.info("model selection: the final epoch. %s has no validation split separate from its test split "
                    "(%s), so no epoch is chosen by test metrics", data.dataset, data.reader_split("test"))
    else:
        logger.warning("model selection on the TEST split %s/%s, as the reference did: the reported test numbers "
                       "are optimistic", data.dataset, data.reader_split("test"))


def _evaluate(run: _Run, dataset: Any, kind: str) -> dict[str, Any]:
    """Evaluate the live weights and, with EMA, the averaged ones; log both; return both."""
    from diffusionret.evaluation.evaluate import evaluate_model

    cfg, data = run.cfg, run.cfg.data
    kwargs = dict(ctx=run.ctx, batch_size=data.batch_size_val, num_workers=data.num_workers, eval_cfg=cfg.eval,
                  rerank=cfg.rerank_config() if cfg.eval.rerank and run.model.has_denoisers else None)
    results = {"model": evaluate_model(run.model, dataset, **kwargs)}
    if run.ema is not None:
        with run.ema.applied_to(run.model):
            results["ema"] = evaluate_model(run.model, dataset, **kwargs)
    record: dict[str, Any] = dict(results["model"])
    if "ema" in results:
        record["ema"] = results["ema"]
    run.metrics.log(kind, run.progress.step, record, epoch=run.progress.epoch)
    run.objective.train()  # stage 2 keeps its frozen backbone in eval mode
    return results


def _validate_and_select(run: _Run, val_set: Any) -> None:
    from diffusionret.evaluation.evaluate import metric_value, results_table

    cfg, progress = run.cfg, run.progress
    results = _evaluate(run, val_set, "val")
    scores = {src: metric_value(res, cfg.eval.select_metric) for src, res in results.items()}
    source = max(scores, key=lambda s: scores[s])
    if run.ctx.is_main:
        logger.info("validation after epoch %d (%s):\n%s", progress.epoch, source, results_table(results[source]))
    if progress.best_score is None or scores[source] > progress.best_score:
        progress.best_score, progress.best_epoch, progress.best_source = scores[source], progress.epoch, source
        _save_selected(run, source, scores[source])
        run.metrics.log("event", progress.step, {"best": scores[source], "best_source": source}, epoch=progress.epoch)
        logger.info("new best %s = %.2f (epoch %d, %s weights)", cfg.eval.select_metric, scores[source],
                    progress.epoch, source)


def _final_test(run: _Run) -> dict[str, Any]:
    """Evaluate the selected weights on the test split; write test_metrics.json."""
    from diffusionret.data.config import build_dataset
    from diffusionret.evaluation.evaluate import evaluate_model, results_table
    from diffusionret.models.checkpoint import load_model

    cfg = run.cfg
    if run.selected_state is not None:
        selected = run.model
        selected.load_state_dict(run.selected_state)
    else:  # selected before an interruption: read it back (output_dir must be shared by all ranks)
        selected = load_model(run.run_dir / "model.safetensors", device=run.ctx.device)
    test_set = build_dataset(cfg.data, cfg.eval.split, train=False, report_dir=run.run_dir)
    results = evaluate_model(selected, test_set, ctx=run.ctx, batch_size=cfg.data.batch_size_val,
                             num_workers=cfg.data.num_workers, eval_cfg=cfg.eval,
                             rerank=cfg.rerank_config() if cfg.eval.rerank and selected.has_denoisers else None)
    run.metrics.log("test", run.progress.step, results, epoch=run.progress.epoch)
    if run.ctx.is_main:
        atomic_write_text(run.run_dir / "test_metrics.json", json.dumps(results, indent=2) + "\n")
        logger.info("test split %s/%s, selected model:\n%s", cfg.data.dataset, cfg.data.reader_split(cfg.eval.split),
                    results_table(results))
    return results


# ---------------------------------------------------------------------------------------------- the run
def train(run_config: Any, *, dist: DistContext | None = None, resume: bool | str | Path = False,
          on_step: StepCallback | None = None, save_request: threading.Event | None = None,
          stop_request: threading.Event | None = None) -> Path:
    """Train one stage as configured; the Python API behind ``diffusionret train``.

    Args:
        run_config: a :class:`diffusionret.config.RunConfig`.
        dist: distributed context (from :func:`~diffusionret.distributed.init_distributed`);
            default: one process on ``train.device``.
        resume: ``True`` continues from ``<output_dir>/checkpoints/last.pt``; a path names the checkpoint.
        on_step: called on every rank after every optimizer step with the progress and the logged values.
        save_request: when set (e.g. by a SIGUSR1 handler), a checkpoint is written after the current
            step and the event cleared. Give it on every rank or on none.
        stop_request: when set (e.g. SIGTERM), a checkpoint is written and :class:`TrainingStopped` raised.

    Returns:
        ``<output_dir>/model.safetensors``: the selected model (see ``eval.model_selection``).
    """
    ctx = dist or DistContext.single(resolve_device(run_config))
    run = _setup(run_config, ctx, resume)
    cfg = run.cfg
    _log_selection_policy(cfg)
    split = _selection_split(cfg)
    val_set = None
    if split is not None:
        from diffusionret.data.config import build_dataset

        val_set = build_dataset(cfg.data, split, train=False, report_dir=run.run_dir)
    try:
        _run_epochs(run, val_set, on_step, save_request, stop_request)
        if split is None or run.progress.best_score is None:
            # "last" selection (or nothing validated): the final weights are the result.
            _save_selected(run, "model", None)
        if cfg.eval.test_after_training:
            _final_test(run)
    finally:
        # Drawn once at the end (a few seconds of matplotlib); `plot_run(run_dir)` redraws any time.
        if ctx.is_main:
            plot_run(run.run_dir)
        run.metrics.close()
    return run.run_dir / "model.safetensors"


def _run_epochs(run: _Run, val_set: Any, on_step: StepCallback | None, save_request: threading.Event | None,
                stop_request: threading.Event | None) -> None:
    cfg, progress = run.cfg, run.progress
    epochs = cfg.train.epochs
    if progress.validation_pending:  # resumed from the checkpoint written just before a validation
        if val_set is not None:
            _validate_and_select(run, val_set)
        progress.validation_pending = False
    while progress.epoch < epochs and progress.step < run.total_steps:
        run.sampler.set_epoch(progress.epoch, start_step=progress.step_in_epoch)
        run.train_set.set_epoch(progress.epoch)
        run.objective.train()
        _run_one_epoch(run, on_step, save_request, stop_request)
        progress.epoch += 1
        progress.step_in_epoch = 0
        last_epoch = progress.epoch >= epochs or progress.step >= run.total_steps
        validate = val_set is not None and (progress.epoch % cfg.eval.every_epochs == 0 or last_epoch)
        # Checkpoint before validating: a stop or a kill during a long evaluation then costs the
        # evaluation, not the epoch.
        progress.validation_pending = validate
        path = save_checkpoint(run, tag=f"epoch_{progress.epoch}" if cfg.train.keep_epoch_checkpoints else None)
        if _stop_requested(run, stop_request):
            raise TrainingStopped(path)
        if validate:
            _validate_and_select(run, val_set)
            progress.validation_pending = False
            if _stop_requested(run, stop_request):  # asked during the evaluation: keep its result too
                raise TrainingStopped(save_checkpoint(run))
            if last_epoch:  # a finished run's checkpoint holds its final selection
                save_checkpoint(run)
        elif val_set is None:
            logger.info("epoch %d done (no validation: the final epoch is the result)", progress.epoch)


def _stop_requested(run: _Run, stop_request: threading.Event | None) -> bool:
    return any_rank(stop_request.is_set(), run.ctx) if stop_request is not None else False


def _run_one_epoch(run: _Run, on_step: StepCallback | None, save_request: threading.Event | None,
                   stop_request: threading.Event | None) -> None:
    cfg, ctx, progress = run.cfg, run.ctx, run.progress
    steps = run.sampler.steps_per_epoch
    bar = tqdm(total=steps, initial=progress.step_in_epoch, desc=f"epoch {progress.epoch + 1}/{cfg.train.epochs}",
               unit="step", disable=not ctx.is_main, dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    started = time.monotonic()
    try:
        for batch in run.loader:
            if any_rank(batch is None, ctx):  # every video of some rank's batch was unreadable
                logger.warning("skipping step: a local batch is empty after dropping unreadable videos")
                progress.step_in_epoch += 1
                bar.update(1)
                continue
            logs = _train_step(run, batch)
            progress.step += 1
            progress.step_in_epoch += 1
            bar.update(1)
            for key, value in logs.items():
                window.setdefault(key, []).append(value)
            if progress.step % cfg.train.log_every == 0 or progress.step == 1:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                means["steps_per_s"] = len(window["loss"]) / max(1e-9, time.monotonic() - started)
                run.metrics.log("train", progress.step, means, epoch=progress.epoch)
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
                logger.info("step %d/%d epoch %d: %s", progress.step, run.total_steps, progress.epoch + 1,
                            ", ".join(f"{k}={v:.4g}" for k, v in means.items()))
                window.clear()
                started = time.monotonic()
            _maybe_checkpoint(run, save_request, stop_request)
            if on_step is not None:
                on_step(progress, logs)
            if progress.step >= run.total_steps:
                break
    finally:
        bar.close()


def _maybe_checkpoint(run: _Run, save_request: threading.Event | None, stop_request: threading.Event | None) -> None:
    every = run.cfg.train.checkpoint_every
    periodic = every is not None and run.progress.step % every == 0
    requested = any_rank(save_request.is_set(), run.ctx) if save_request is not None else False
    stop = any_rank(stop_request.is_set(), run.ctx) if stop_request is not None else False
    if periodic or requested or stop:
        path = save_checkpoint(run)
        if save_request is not None:
            save_request.clear()
        if stop:
            raise TrainingStopped(path)
