"""The evaluation driver: features -> WTI matrix (chunked) -> optional diffusion re-ranking -> metrics.

Public entry points:

* :func:`evaluate` — what ``diffusionret eval`` runs: a checkpoint + a run config (or a data config)
  -> metrics dict, optionally written as JSON.
* :func:`extract_features` — what ``diffusionret extract`` runs: encode a split and cache it.
* :func:`evaluate_model` / :func:`evaluate_features` — the same on an in-memory model / features
  (used by training for per-epoch validation).

Results have the layout ``{"t2v": metrics, "v2t": metrics, "rerank": {"t2v": ..., "v2t": ...},
"num_captions": ..., "num_videos": ..., "num_missing_videos": ...}`` where ``metrics`` is what
:func:`diffusionret.evaluation.metrics.multi_caption_metrics` returns (R1, R5, R10, R50, MedianR,
MeanR, ...); ``rerank`` is present only when re-ranking ran. Re-ranking noise comes from a generator
seeded with ``eval.seed`` and does not depend on the number of processes, so repeated evaluations
give identical numbers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusionret.config_utils import atomic_write_text
from diffusionret.evaluation.features import CorpusFeatures, encode_corpus
from diffusionret.evaluation.metrics import format_table, multi_caption_metrics
from diffusionret.distributed import DistContext, all_gather_variable, broadcast_object, shard_range
from diffusionret.models.fingerprint import model_fingerprint
from diffusionret.retrieval.reranker import RerankConfig, Reranker

logger = logging.getLogger(__name__)

#: Captions per ``model.similarity`` call of :func:`similarity_matrix`. Each call normalises every
#: video once (a pass over the video features), so few large calls beat one call per chunk of 128
#: (that repeated pass was ~5 % of WTI at 1,000 x 1,000); a group's tokens are its extra memory
#: (2,048 captions of 32 x 512 float32: 128 MiB).
CAPTION_GROUP = 2048


# ------------------------------------------------------------------------------------------ scores
@torch.no_grad()
def similarity_matrix(model: nn.Module, feats: CorpusFeatures, *, chunk_size: int, ctx: DistContext,
                      progress: bool = True) -> torch.Tensor:
    """WTI scores of every caption against every video, in bounded memory.

    Each rank takes a contiguous share of the captions and scores them against all videos in groups
    of up to :data:`CAPTION_GROUP` captions (one ``model.similarity`` call each, with a progress
    step); inside a call the captions go in chunks of at most ``chunk_size`` of similar real length
    (so a chunk's products cover only its real tokens, see
    :func:`diffusionret.models.similarity.length_buckets`) and the videos ``chunk_size`` at a time.
    Peak memory is one ``(chunk, L, chunk, T)`` block besides the call's own copies (the group's
    tokens on the device, the videos' unit features). The video weight MLP runs once over all
    videos, not once per group.

    Returns:
        (Nt, Nv) float32 on ``ctx.device``, identical on every rank.
    """
    device = ctx.device
    video = feats.video.to(device)
    frame_mask = feats.frame_mask.to(device)
    rows = shard_range(feats.num_captions, ctx)
    # The video-side weights are the same for every caption group: compute them once (as the model
    # would inside each call, with the same chunking, so the scores are unchanged).
    frame_weights = model.frame_weights(video, frame_mask, chunk_size=chunk_size)
    local = torch.empty(len(rows), feats.num_videos, dtype=torch.float32, device=device)
    group = max(chunk_size, CAPTION_GROUP)
    starts = range(rows.start, rows.stop, group)
    for start in tqdm(starts, desc="similarity", unit="group", disable=not (progress and ctx.is_main), leave=False):
        src = slice(start, min(start + group, rows.stop))  # a view of the features: no copy on the device they are on
        local[src.start - rows.start:src.stop - rows.start] = model.similarity(
            feats.tokens[src].to(device), feats.text_mask[src].to(device), video, frame_mask, chunk_size=chunk_size,
            frame_weights=frame_weights, trim=True).float()
    return all_gather_variable(local, ctx)


@torch.no_grad()
def rerank_scores(model: nn.Module, sim: torch.Tensor, feats: CorpusFeatures, *, rerank: RerankConfig, seed: int,
                  ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion re-ranking of both directions (docs/reference.md §3.3) with :class:`~diffusionret.retrieval.Reranker`.

    The initial noise of every query is drawn up front from ``torch.Generator().manual_seed(seed)``
    (text->video rows first, then video->text rows), so the result does not depend on how the rows
    are split over ranks.

    Args:
        sim: (Nt, Nv) WTI scores.

    Returns:
        t2v (Nt, Nv) and v2t (Nv, Nt), identical on every rank.
    """
    device = ctx.device
    nt, nv = sim.shape
    k_t2v, k_v2t = min(rerank.top_k, nv), min(rerank.top_k, nt)
    gen = torch.Generator().manual_seed(seed)
    noise_t2v = torch.randn(nt, k_t2v, generator=gen)
    noise_v2t = torch.randn(nv, k_v2t, generator=gen)
    cls = feats.cls.to(device)
    video = feats.video.to(device)
    frame_mask = feats.frame_mask.to(device)
    reranker = Reranker(model, rerank)

    t_rows = shard_range(nt, ctx)
    t2v_local = reranker.t2v(sim[t_rows.start:t_rows.stop], cls[t_rows.start:t_rows.stop], video, frame_mask,
                             noise=noise_t2v[t_rows.start:t_rows.stop].to(device), generator=gen)
    v_rows = shard_range(nv, ctx)
    sim_v2t = sim.t()
    v2t_local = reranker.v2t(sim_v2t[v_rows.start:v_rows.stop], cls, video[v_rows.start:v_rows.stop],
                             frame_mask[v_rows.start:v_rows.stop], noise=noise_v2t[v_rows.start:v_rows.stop].to(device),
                             generator=gen)
    return all_gather_variable(t2v_local, ctx), all_gather_variable(v2t_local, ctx)


def check_complete(feats: CorpusFeatures, *, allow_missing: bool) -> int:
    """Refuse metrics over a split that lost videos unless ``allow_missing``; returns how many are missing.

    Raises:
        MissingVideosError: videos are missing and ``allow_missing`` is false.
    """
    from diffusionret.data.dataset import require_complete

    total = feats.num_videos + len(feats.missing_video_ids)
    return require_complete(total, feats.missing_video_ids, allow_missing=allow_missing)


@torch.no_grad()
def evaluate_features(model: nn.Module, feats: CorpusFeatures, *, ctx: DistContext, chunk_size: int = 128,
                      rerank: RerankConfig | None = None, seed: int = 42, ties: str = "optimistic",
                      allow_missing: bool = False, progress: bool = True) -> dict[str, Any]:
    """Metrics of ``model`` on encoded features (both directions, re-ranked when asked and possible).

    Args:
        rerank: also report the diffusion re-ranked ranking with these settings (``None``: WTI only).
        seed: seed of the re-ranking noise.

    Every rank takes part (similarity and re-ranking are sharded by rows); every rank returns the
    same dict.

    Raises:
        MissingVideosError: see :func:`check_complete`.
    """
    missing = check_complete(feats, allow_missing=allow_missing)
    model.eval()
    sim = similarity_matrix(model, feats, chunk_size=chunk_size, ctx=ctx, progress=progress)
    c2v = feats.caption_to_video
    results: dict[str, Any] = dict(multi_caption_metrics(sim.cpu(), c2v, ties=ties))  # type: ignore[arg-type]
    if rerank is not None and not getattr(model, "has_denoisers", False):
        logger.warning("the model has no denoisers (a discrimination-stage model): reporting the WTI ranking only")
        rerank = None
    if rerank is not None:
        t2v, v2t = rerank_scores(model, sim, feats, rerank=rerank, seed=seed, ctx=ctx)
        results["rerank"] = multi_caption_metrics(t2v.cpu(), c2v, sim_v2t=v2t.cpu(),
                                                  ties=ties)  # type: ignore[arg-type]
    results.update(num_captions=feats.num_captions, num_videos=feats.num_videos, num_missing_videos=missing)
    return results


def evaluate_model(model: nn.Module, dataset: Any, *, ctx: DistContext, batch_size: int, num_workers: int,
                   eval_cfg: Any, rerank: RerankConfig | None, precision: str | None = None,
                   allow_missing: bool | None = None) -> dict[str, Any]:
    """Encode ``dataset`` with ``model`` and evaluate (see :func:`evaluate_features`).

    Args:
        eval_cfg: a :class:`diffusionret.config.EvalConfig` (chunk size, seed, ties, ...);
            ``allow_missing`` overrides it.
        rerank: the re-ranking (:meth:`diffusionret.config.RunConfig.rerank_config`), ``None``: WTI only.
    """
    feats = encode_corpus(model, dataset, ctx=ctx, batch_size=batch_size, num_workers=num_workers,
                          precision=precision or eval_cfg.precision)
    return evaluate_features(
        model, feats, ctx=ctx, chunk_size=eval_cfg.chunk_size, rerank=rerank, seed=eval_cfg.seed, ties=eval_cfg.ties,
        allow_missing=eval_cfg.allow_missing if allow_missing is None else allow_missing,
    )


def metric_value(results: Mapping[str, Any], key: str, *, prefer_rerank: bool = True) -> float:
    """``key`` like ``t2v/R1`` from a results dict; the re-ranked value when present and preferred."""
    direction, name = key.split("/", 1)
    source = results.get("rerank") if prefer_rerank and "rerank" in results else results
    return float(source[direction][name])  # type: ignore[index]


def results_table(results: Mapping[str, Any], precision: int = 1) -> str:
    """The metrics as an aligned text table: WTI rows, then re-ranked rows."""
    rows: dict[str, Mapping[str, Any]] = {"t2v": results["t2v"], "v2t": results["v2t"]}
    if "rerank" in results:
        rows["t2v (re-ranked)"] = results["rerank"]["t2v"]
        rows["v2t (re-ranked)"] = results["rerank"]["v2t"]
    return format_table(rows, precision=precision)


# ------------------------------------------------------------------------------------------ drivers
def _data_meta(data_cfg: Any, split: str) -> dict[str, Any]:
    return {"dataset": data_cfg.dataset, "split": data_cfg.reader_split(split), "max_words": data_cfg.max_words,
            "max_frames": data_cfg.max_frames, "fps": data_cfg.fps, "sampling": data_cfg.sampling,
            "size": data_cfg.size, "anno_path": str(data_cfg.anno_path), "video_path": str(data_cfg.video_path)}


def _load_for_eval(checkpoint: str | os.PathLike | nn.Module, run_config: Any, ctx: DistContext,
                   use_ema: bool) -> tuple[nn.Module, Any]:
    """The model to evaluate and the run config it is evaluated with.

    The input settings the run config does not state (``RunConfig.data_inputs_given``) come from
    the checkpoint's recorded input config, as search and index build take them.
    """
    from diffusionret.models.checkpoint import load_checkpoint

    if isinstance(checkpoint, nn.Module):
        return checkpoint.to(ctx.device).eval(), run_config
    loaded = load_checkpoint(checkpoint, device=ctx.device, use_ema=use_ema)
    if loaded.input_recorded:
        run_config = run_config.with_model_inputs(loaded.input, loaded.source)
    return loaded.model, run_config


def extract_features(run_config: Any, checkpoint: str | os.PathLike | nn.Module, *, split: str | None = None,
                     output: str | os.PathLike | None = None, dist: DistContext | None = None,
                     use_ema: bool = False) -> CorpusFeatures:
    """Encode a split of ``run_config.data`` with a checkpoint and (on rank 0) write it to ``output``.

    Args:
        run_config: a :class:`diffusionret.config.RunConfig`.
        checkpoint: trainer checkpoint, model file / run folder, official ``best.pth``, or a model.
        split: ``train`` / ``val`` / ``test`` or a reader split (default: ``run_config.eval.split``).
        output: ``.safetensors`` path for the features (nothing written when ``None``).
        dist: distributed context (default: one process on the configured device).
        use_ema: the EMA weights of a trainer checkpoint.
    """
    from diffusionret.data.config import build_dataset

    ctx = dist or _default_context(run_config)
    split = split or run_config.eval.split
    model, run_config = _load_for_eval(checkpoint, run_config, ctx, use_ema)
    dataset = build_dataset(run_config.data, split, train=False, report_dir=Path(run_config.output_dir))
    meta = {"model": model_fingerprint(model), **_data_meta(run_config.data, split)}
    data = run_config.data
    feats = encode_corpus(model, dataset, ctx=ctx, batch_size=data.batch_size_val, num_workers=data.num_workers,
                          precision=run_config.eval.precision, meta=meta)
    if output is not None and ctx.is_main:
        feats.save(output)
    return feats


def evaluate(run_config: Any, checkpoint: str | os.PathLike | nn.Module, *, split: str | None = None,
             dist: DistContext | None = None, features: str | os.PathLike | None = None,
             rerank: bool | None = None, allow_missing: bool | None = None, use_ema: bool = False,
             output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on a split: the Python API behind ``diffusionret eval``.

    Args:
        run_config: a :class:`diffusionret.config.RunConfig` (data, eval and diffusion sections are used).
        checkpoint: trainer checkpoint (``last.pt``), model file or run folder (``model.safetensors``),
            official ``best.pth``, or an in-memory model.
        split: default ``run_config.eval.split``.
        dist: distributed context (default: one process).
        features: cache file: re-used when it exists and matches the model and data settings,
            written otherwise.
        rerank, allow_missing: override ``run_config.eval``.
        use_ema: the EMA weights of a trainer checkpoint.
        output: JSON file for the results (written by rank 0).

    Returns:
        The results dict (module docstring), the same on every rank.

    Raises:
        MissingVideosError: videos of the split could not be read and missing ones are not allowed.
        ValueError: a features cache that does not match the model or the data settings.
    """
    ctx = dist or _default_context(run_config)
    ev = run_config.eval
    split = split or ev.split
    model, run_config = _load_for_eval(checkpoint, run_config, ctx, use_ema)
    feats = None
    if features is not None and Path(features).is_file():
        expected = {"model": model_fingerprint(model), **_data_meta(run_config.data, split)}
        feats = CorpusFeatures.load(features)
        stale = {k: (feats.meta.get(k), v) for k, v in expected.items() if feats.meta.get(k) != v}
        if stale:
            raise ValueError(f"{features}: cached features do not match this evaluation "
                             f"({', '.join(f'{k}: {a!r} != {b!r}' for k, (a, b) in stale.items())}); "
                             "delete the file or pass another path")
        logger.info("re-using cached features %s", features)
    if feats is None:
        feats = extract_features(run_config, model, split=split, output=features, dist=ctx)
    allow = ev.allow_missing if allow_missing is None else allow_missing
    if feats.missing_video_ids and allow:
        logger.warning("%d of %d videos of %s/%s are missing; metrics are over the remaining ones",
                       len(feats.missing_video_ids), feats.num_videos + len(feats.missing_video_ids),
                       run_config.data.dataset, split)
    do_rerank = ev.rerank if rerank is None else rerank
    results = evaluate_features(model, feats, ctx=ctx, chunk_size=ev.chunk_size,
                                rerank=run_config.rerank_config() if do_rerank else None, seed=ev.seed, ties=ev.ties,
                                allow_missing=allow)
    results = broadcast_object(results, ctx)
    results["split"] = f"{run_config.data.dataset}/{run_config.data.reader_split(split)}"
    if output is not None and ctx.is_main:
        atomic_write_text(output, json.dumps(results, indent=2) + "\n")
        logger.info("metrics written: %s", output)
    return results


def _default_context(run_config: Any) -> DistContext:
    device = run_config.train.device
    return DistContext.single(None if device == "auto" else device)
