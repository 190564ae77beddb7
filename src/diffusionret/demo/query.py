"""Answer a free-text query over encoded videos: WTI scores, then diffusion re-ranking of the top-K."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One retrieved video.

    Attributes:
        rank: 1-based position in the final ranking.
        video_id: id of the video (the file name for the demo corpus).
        score: final score (re-ranked when the model has denoisers, else the WTI score).
        wti_score: the discriminative (WTI) score alone.
        wti_rank: 1-based position in the WTI-only ranking.
    """

    rank: int
    video_id: str
    score: float
    wti_score: float
    wti_rank: int


@torch.no_grad()
def search_videos(model: nn.Module, query: str, feats: Any, *, k: int = 5, top_k: int = 32, max_words: int = 32,
                  generator: torch.Generator | None = None) -> list[Hit]:
    """Rank the videos of ``feats`` for one text query.

    Args:
        model: a :class:`~diffusionret.models.DiffusionRet` (re-ranks when it has denoisers).
        query: the text.
        feats: :class:`~diffusionret.evaluation.features.CorpusFeatures` of the candidate videos
            (``video`` (Nv, T, D), ``frame_mask`` (Nv, T), ``video_ids``).
        k: hits to return.
        top_k: candidates handed to the denoiser (as ``eval.top_k``).
        max_words: token length used for the corpus captions.
        generator: noise of the re-ranking sampler (seeded for reproducible answers).

    Returns:
        The best ``k`` videos, best first.
    """
    from diffusionret.tokenizer import tokenize

    model.eval()
    device = next(model.parameters()).device
    ids, mask = tokenize([query], max_words)
    ids, mask = ids.to(device), mask.to(device)
    video, frame_mask = feats.video.to(device), feats.frame_mask.to(device)
    tokens, cls = model.encode_text(ids, mask)
    wti = model.similarity(tokens, mask, video, frame_mask).float()  # (1, Nv)
    final = wti
    if getattr(model, "has_denoisers", False):
        final = model.rerank_t2v(wti, cls, video, frame_mask, top_k=min(top_k, wti.shape[1]), generator=generator)
    wti_order = torch.argsort(wti[0], descending=True, stable=True)
    wti_rank = torch.empty_like(wti_order)
    wti_rank[wti_order] = torch.arange(1, wti_order.numel() + 1, device=wti_order.device)
    order = torch.argsort(final[0], descending=True, stable=True)[:k]
    return [
        Hit(rank=i + 1, video_id=feats.video_ids[j], score=float(final[0, j]), wti_score=float(wti[0, j]),
            wti_rank=int(wti_rank[j]))
        for i, j in enumerate(order.tolist())
    ]
