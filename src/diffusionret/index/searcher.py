"""``Searcher``: text query -> ranked videos, by a three-stage cascade over a :class:`VideoIndex`.

1. **First stage** (every video): cosine between the normalised text ``cls`` and each video's
   pooled embedding (:func:`~diffusionret.index.features.pool_frames`); exact (fp32, or fp16
   embeddings for large indexes) or an ANN index (FAISS PQ fast-scan with exact re-scoring, or
   IVF-Flat) for large indexes that have one; see
   :mod:`~diffusionret.index.first_stage`. Keeps the top ``N`` (``candidates``).
2. **WTI** (``N`` videos): the model's token-level similarity head (docs/reference.md §1.4) on the stored
   frame features, with the video-side weights stored at build time when the index has them.
3. **Diffusion re-ranking** (top ``K`` of the WTI list, ``rerank_top_k``): the text->video denoiser
   adds a bonus in (0, 1) to each of the K scores (docs/reference.md §3.3), so the re-ranked K stay ahead of
   the other N - K, whose WTI order is kept. Skipped when the model has no denoisers or ``K = 0``.

The searcher is pure composition of objects (model, index, tokenizer); :meth:`Searcher.open` is a
convenience that loads them from paths.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionret.index.catalog import VideoRecord
from diffusionret.index.first_stage import FirstStageConfig
from diffusionret.index.identity import ModelMismatchError, model_fingerprint
from diffusionret.index.store import VideoIndex

logger = logging.getLogger(__name__)

Tokenizer = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class SearchConfig:
    """Cascade sizes and query processing.

    Attributes:
        candidates: N, first-stage candidates scored by the WTI head (raised to ``k`` when smaller).
        rerank_top_k: K, WTI candidates re-ranked by the diffusion denoiser (0 disables; the paper
            uses 32).
        max_words: query length in tokens, SOT and EOT included (the reference uses 32).
        seed: seeds the denoiser's initial noise per query, so the same query always gives the
            same ranking.
        first_stage: how the first stage searches (exact / PQ / IVF, precision, ``rescore``, ``nprobe``).
        trim_query: run the text tower on the real tokens plus one padded position instead of all
            ``max_words`` (same scores, see :meth:`Searcher.encode_queries`).
    """

    candidates: int = 100
    rerank_top_k: int = 32
    max_words: int = 32
    seed: int = 0
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    trim_query: bool = True

    def __post_init__(self) -> None:
        if self.candidates <= 0:
            raise ValueError(f"candidates must be positive, got {self.candidates}")
        if self.rerank_top_k < 0:
            raise ValueError(f"rerank_top_k must be >= 0, got {self.rerank_top_k}")
        if self.max_words < 2:
            raise ValueError(f"max_words must be >= 2, got {self.max_words}")


@dataclass(frozen=True)
class SearchHit:
    """One result.

    Attributes:
        rank: 1-based position.
        score: final score (WTI, plus the diffusion bonus for re-ranked candidates).
        record: the video.
        stage_scores: ``coarse`` (first stage), ``wti`` and, when re-ranked, ``rerank`` (the final score).
    """

    rank: int
    score: float
    record: VideoRecord
    stage_scores: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def path(self) -> str:
        return self.record.path

    @property
    def duration(self) -> float | None:
        return self.record.duration

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, "stage_scores": dict(self.stage_scores),
                **self.record.to_dict()}


class Searcher:
    """Cascade search of an index with the model that built it.

    Args:
        model: a loaded ``DiffusionRet`` (eval mode).
        index: the loaded index.
        config: cascade sizes.
        model_id: the model's identity if already known (skips hashing the weights).
        tokenizer: ``(texts, max_words) -> (ids (B, L), mask (B, L))``; default :func:`diffusionret.tokenize`.

    Raises:
        ModelMismatchError: ``model`` is not the model that built ``index``.
    """

    def __init__(self, model: nn.Module, index: VideoIndex, config: SearchConfig | None = None, *,
                 model_id: str | None = None, tokenizer: Tokenizer | None = None) -> None:
        model_id = model_id or model_fingerprint(model)
        if model_id != index.model_id:
            raise ModelMismatchError(
                f"index {index.root} was built by model {index.model_id[:12]} ({index.info.model_path}); "
                f"refusing to search it with model {model_id[:12]}"
            )
        if tokenizer is None:
            from diffusionret.tokenizer import tokenize as tokenizer
        self.model = model.eval()
        self.index = index
        self.config = config or SearchConfig()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        index.configure_first_stage(self.config.first_stage)

    @classmethod
    def open(cls, index_dir: str | os.PathLike, model_path: str | os.PathLike | None = None, *,
             device: str = "cpu", config: SearchConfig | None = None) -> "Searcher":
        """Load the index at ``index_dir`` and its model (``model_path``, default: the recorded checkpoint)."""
        from diffusionret.index.encode import checkpoint_data_settings
        from diffusionret.models.checkpoint import load_model

        info = VideoIndex.read_info(index_dir)
        model_path = model_path or info.model_path
        if model_path is None:
            raise ValueError(f"{index_dir} does not record its model's checkpoint; pass the model path")
        if config is None:  # query length as in training, when the checkpoint records it
            config = SearchConfig(max_words=int(checkpoint_data_settings(model_path).get("max_words", 32)))
        model = load_model(model_path, device=device)
        model_id = model_fingerprint(model)
        index = VideoIndex.load(index_dir, model_id=model_id)
        return cls(model, index, config, model_id=model_id)

    @property
    def reranks(self) -> bool:
        return bool(getattr(self.model, "has_denoisers", False)) and self.config.rerank_top_k > 0

    def describe(self) -> dict[str, Any]:
        """Facts for health checks and the web page."""
        return {
            "videos": len(self.index),
            "model_id": self.index.model_id,
            "model_path": self.index.info.model_path,
            "candidates": self.config.candidates,
            "rerank_top_k": self.config.rerank_top_k if self.reranks else 0,
            "first_stage": self.index.first_stage.describe() if self.index.first_stage is not None else None,
        }

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Tokenise and encode texts: ``tokens`` (B, L', D), ``mask`` (B, L'), ``cls`` (B, D) on the model's device.

        With ``trim_query`` the padding after the longest text is cut to one position:
        ``L' = min(max_words, longest + 1)``. This is exact: the text tower's attention is causal,
        so real positions never see later ones, and the WTI head needs only one padded position,
        whose similarity 0 takes part in the maximum over tokens (the "zero floor", docs/reference.md §1.4)
        exactly as the ``max_words - longest`` padded positions would.
        """
        ids, mask = self.tokenizer(list(queries), max_words=self.config.max_words)
        if self.config.trim_query:
            keep = min(ids.shape[1], int(mask.sum(dim=1).max()) + 1)
            ids, mask = ids[:, :keep], mask[:, :keep]
        ids, mask = ids.to(self.device), mask.to(self.device)
        tokens, cls = self.model.encode_text(ids, mask)
        return tokens, mask, cls

    def search(self, query: str, k: int = 10) -> list[SearchHit]:
        """The top ``k`` videos for one text query (see the module docstring for the cascade)."""
        return self.search_batch([query], k)[0]

    @torch.no_grad()
    def search_batch(self, queries: Sequence[str], k: int = 10) -> list[list[SearchHit]]:
        """The top ``k`` videos for each of several queries (results are independent of batching)."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if isinstance(queries, str) or not queries:
            raise ValueError("queries must be a non-empty sequence of strings")
        if len(self.index) == 0:
            return [[] for _ in queries]
        tokens, mask, cls = self.encode_queries(queries)
        coarse_scores, coarse_rows = self.index.search(F.normalize(cls.float(), dim=-1).cpu(),
                                                       max(self.config.candidates, k))
        return [
            self._second_stage(tokens[i:i + 1], mask[i:i + 1], cls[i:i + 1], coarse_scores[i], coarse_rows[i], k)
            for i in range(len(queries))
        ]

    def _second_stage(self, tokens: Tensor, mask: Tensor, cls: Tensor, coarse: Tensor, rows: Tensor,
                      k: int) -> list[SearchHit]:
        """WTI over the first-stage candidates, then diffusion re-ranking of the top K.

        Args:
            tokens: (1, L, D); mask: (1, L); cls: (1, D); coarse: (N,) first-stage scores; rows: (N,) index rows.
        """
        video, frame_mask = self.index.gather(rows)
        video, frame_mask = video.to(self.device), frame_mask.to(self.device)
        weights = self.index.gather_weights(rows)  # stored at build time; None: the model computes them
        if weights is not None:
            weights = weights.to(self.device)
        wti = self.model.similarity(tokens, mask, video, frame_mask, frame_weights=weights)  # (1, N)
        final = wti
        top_k = min(self.config.rerank_top_k, wti.shape[1])
        reranked = self.reranks and top_k > 0
        if reranked:
            generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
            final = self.model.rerank_t2v(wti, cls, video, frame_mask, top_k=top_k, generator=generator)
        final, wti = final[0].float().cpu(), wti[0].float().cpu()
        # Stable sort: equal scores keep first-stage order, so results are deterministic.
        order = torch.sort(final, descending=True, stable=True).indices[:k]
        hits = []
        for rank, position in enumerate(order.tolist(), start=1):
            stages = {"coarse": float(coarse[position]), "wti": float(wti[position])}
            # The bonuses are positive, so the K re-ranked candidates are exactly the first K ranks.
            if reranked and rank <= top_k:
                stages["rerank"] = float(final[position])
            hits.append(SearchHit(rank=rank, score=float(final[position]),
                                  record=self.index.records[int(rows[position])], stage_scores=stages))
        return hits
