"""Hard negatives from the whole training split (``diffusion.negatives: dataset``).

The reference mines each query's negatives from the global batch (127 of 128 samples). With the
features cached, the hardest negatives can come from every video (text->video) and every caption
(video->text) of the training split instead. Similarity is the model's WTI score, the same score the
batch mining ranks by, computed over the cached features in caption chunks.

A pair (caption ``r``, video ``v``) is *excluded* when ``v`` is the video of ``r`` or the video of a
caption with the same text as ``r`` (case and whitespace normalised): such a video is a correct
answer, not a negative. The relation is symmetric, so the same exclusion serves both directions:
a video's negatives are never its own captions nor a caption that duplicates one of them.

The table is computed once per run: the backbone is frozen in stage 2, so the cached features, hence
the nearest neighbours, are identical every epoch (a per-epoch refresh would recompute the same table).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from diffusionret.distributed import DistContext, all_gather_no_grad, all_gather_variable, shard_range
from diffusionret.models.denoiser import gather_rows

logger = logging.getLogger(__name__)


def _normalise(caption: str) -> str:
    return " ".join(caption.lower().split())


def excluded_videos(captions: Sequence[str], caption_to_video: torch.Tensor) -> list[list[int]]:
    """For every caption row, the videos that are not negatives (its own, and those of duplicate captions).

    Args:
        captions: (Nt,) caption texts of the cache rows.
        caption_to_video: (Nt,) int64 video row of every caption.

    Returns:
        Nt sorted lists of video rows.
    """
    groups: dict[str, set[int]] = {}
    keys = [_normalise(c) for c in captions]
    for key, v in zip(keys, caption_to_video.tolist()):
        groups.setdefault(key, set()).add(v)
    return [sorted(groups[key]) for key in keys]


def _exclusion_mask(excluded: list[list[int]], rows: range, num_videos: int) -> torch.Tensor:
    mask = torch.zeros(len(rows), num_videos, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, excluded[r]] = True
    return mask


class DatasetNegatives:
    """Nearest-neighbour tables over a cached training split, and candidate lists built from them.

    Attributes:
        t2v: (Nt, num) int64 video rows, hardest first, per caption row.
        v2t: (Nv, num) int64 caption rows, hardest first, per video row.
        num: negatives per query (the requested number, capped to what the poorest query has).
    """

    def __init__(self, cache: Any, t2v: torch.Tensor, v2t: torch.Tensor) -> None:
        self.cache = cache
        self.t2v = t2v
        self.v2t = v2t
        self.num = int(t2v.shape[1])

    def candidates(self, caption_rows: torch.Tensor, num: int, *,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate lists ``[positive, hardest negatives...]`` for local queries.

        Args:
            caption_rows: (n,) cache rows of the queries (the sample's caption; its video is the
                video-side query).
            num: negatives per query (<= :attr:`num`).

        Returns:
            ``cand_video`` (n, num+1, T, D) float32, ``cand_mask`` (n, num+1, T) for text->video, and
            ``cand_cls`` (n, num+1, D) float32 for video->text; index 0 is the positive.
        """
        feats = self.cache.features
        rows = caption_rows.cpu()
        videos = self.cache.caption_to_video[rows]
        t2v_idx = torch.cat([videos[:, None], self.t2v[rows, :num]], dim=1)
        v2t_idx = torch.cat([rows[:, None], self.v2t[videos, :num]], dim=1)
        cand_video = gather_rows(feats.video, t2v_idx)
        cand_mask = gather_rows(feats.frame_mask, t2v_idx)
        cand_cls = gather_rows(feats.cls, v2t_idx)
        return cand_video.to(device).float(), cand_mask.to(device), cand_cls.to(device).float()


@torch.no_grad()
def build_dataset_negatives(model: nn.Module, cache: Any, captions: Sequence[str], num_negatives: int, *,
                            ctx: DistContext, chunk_size: int = 32) -> DatasetNegatives:
    """Mine the ``num_negatives`` hardest negatives of every caption and every video of the cache.

    A collective: each rank scores a contiguous shard of the captions against every video; the
    text->video rows are gathered and the per-rank video->text top-k lists merged.

    Args:
        model: the frozen model (its ``similarity`` is the WTI score).
        cache: a :class:`~diffusionret.training.feature_cache.TrainFeatureCache`.
        captions: (Nt,) caption texts of the cache rows (duplicate detection).
        num_negatives: requested negatives per query (capped, with a warning).
        ctx: distributed context.
        chunk_size: captions scored at once (memory: chunk x Nv x L x T floats inside WTI).
    """
    feats = cache.features
    nt, nv = feats.num_captions, feats.num_videos
    c2v = cache.caption_to_video
    excluded = excluded_videos(captions, c2v)
    t2v_avail = nv - max(len(e) for e in excluded)
    per_video = torch.zeros(nv, dtype=torch.long)
    for e in excluded:
        per_video[e] += 1  # captions that may not be negatives of each video
    v2t_avail = nt - int(per_video.max())
    num = min(num_negatives, t2v_avail, v2t_avail)
    if num <= 0:
        raise ValueError(f"dataset negatives: some query has no negative in the training split "
                         f"({nv} videos, {nt} captions)")
    if num < num_negatives:
        logger.warning("dataset negatives: %d requested, the training split offers %d per query; using %d",
                       num_negatives, num, num)
    device = ctx.device
    video = feats.video.to(device).float()
    frame_mask = feats.frame_mask.to(device)
    shard = shard_range(nt, ctx)
    t2v_parts: list[torch.Tensor] = []
    best = torch.full((nv, num), float("-inf"), device=device)
    best_idx = torch.full((nv, num), -1, dtype=torch.long, device=device)
    for start in range(shard.start, shard.stop, chunk_size):
        rows = range(start, min(start + chunk_size, shard.stop))
        tokens = feats.tokens[rows.start:rows.stop].to(device).float()
        mask = feats.text_mask[rows.start:rows.stop].to(device)
        scores = model.similarity(tokens, mask, video, frame_mask).float()              # (c, Nv)
        scores = scores.masked_fill(_exclusion_mask(excluded, rows, nv).to(device), float("-inf"))
        t2v_parts.append(scores.topk(num, dim=1).indices)
        ids = torch.arange(rows.start, rows.stop, device=device).expand(nv, -1)
        merged = torch.cat([best, scores.t()], dim=1)                                    # (Nv, num + c)
        top = merged.topk(num, dim=1)
        best = top.values
        best_idx = torch.cat([best_idx, ids], dim=1).gather(1, top.indices)
    local_t2v = torch.cat(t2v_parts) if t2v_parts else torch.zeros(0, num, dtype=torch.long, device=device)
    t2v = all_gather_variable(local_t2v, ctx).cpu()
    if ctx.is_distributed:
        values = all_gather_no_grad(best, ctx).reshape(ctx.world_size, nv, num).permute(1, 0, 2).reshape(nv, -1)
        indices = all_gather_no_grad(best_idx, ctx).reshape(ctx.world_size, nv, num).permute(1, 0, 2).reshape(nv, -1)
        top = values.topk(num, dim=1)
        best_idx = indices.gather(1, top.indices)
    v2t = best_idx.cpu()
    if bool((v2t < 0).any()):
        raise RuntimeError("dataset negatives: a video got fewer negatives than announced")
    logger.info("dataset negatives: %d per query over %d captions x %d videos (WTI)", num, nt, nv)
    return DatasetNegatives(cache, t2v, v2t)
