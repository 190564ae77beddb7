"""Answer a free-text query over encoded videos: WTI scores, then diffusion re-ranking of the top-K.

A thin use of the one retrieval path (:func:`diffusionret.retrieval.retrieve`) over in-memory
features (:class:`~diffusionret.retrieval.FeatureStore`): every video is a candidate.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from diffusionret.retrieval import FeatureStore, Hit, RerankConfig, Reranker, encode_queries, retrieve

logger = logging.getLogger(__name__)

__all__ = ["Hit", "search_videos"]


@torch.no_grad()
def search_videos(model: nn.Module, query: str, feats: Any, *, k: int = 5, rerank: RerankConfig | None = None,
                  max_words: int, generator: torch.Generator | None = None) -> list[Hit]:
    """Rank the videos of ``feats`` for one text query.

    Args:
        model: a :class:`~diffusionret.models.DiffusionRet` (re-ranks when it has denoisers).
        query: the text.
        feats: :class:`~diffusionret.evaluation.features.CorpusFeatures` of the candidate videos
            (``video`` (Nv, T, D), ``frame_mask`` (Nv, T), ``video_ids``).
        k: hits to return.
        rerank: the re-ranking (``top_k`` candidates handed to the denoiser, the sampler); default
            :class:`RerankConfig`'s.
        max_words: token length used for the corpus captions.
        generator: noise of the re-ranking sampler (seeded for reproducible answers).

    Returns:
        The best ``k`` videos, best first (``Hit.id`` is the video id).
    """
    model.eval()
    tokens, mask, cls = encode_queries(model, [query], max_words)
    reranker = Reranker(model, rerank) if getattr(model, "has_denoisers", False) else None
    store = FeatureStore.from_features(feats)
    return retrieve(model, tokens, mask, cls, store, k=k, candidates=len(store), reranker=reranker,
                    generator=generator or torch.Generator(device=next(model.parameters()).device))[0]
