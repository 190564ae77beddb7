"""``Searcher``: text query -> ranked videos, by the three-stage cascade over a :class:`VideoIndex`.

The cascade itself is :func:`diffusionret.retrieval.retrieve` (shared with the demo):

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

The searcher is pure composition of objects (model, index, tokenizer) and owns its first stage:
the index it is given is not changed. :meth:`Searcher.open` loads them from paths.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from diffusionret.index.first_stage import FirstStageConfig
from diffusionret.index.identity import ModelMismatchError, model_fingerprint
from diffusionret.index.store import VideoIndex
from diffusionret.models.config import REFERENCE_DIFFUSION, REFERENCE_INPUT, DiffusionSchedule, InputConfig
from diffusionret.retrieval.moments import MomentConfig
from diffusionret.retrieval import Hit, RerankConfig, Reranker, encode_queries, retrieve
from diffusionret.retrieval.moments import moment_hits

logger = logging.getLogger(__name__)

Tokenizer = Callable[..., tuple[Tensor, Tensor]]

#: The search result type (one :class:`~diffusionret.retrieval.Hit` type for every retrieval path).
SearchHit = Hit


@dataclass(frozen=True)
class SearchConfig:
    """Cascade sizes and query processing.

    Attributes:
        candidates: N, first-stage candidates scored by the WTI head (raised to ``k`` when smaller).
        rerank_top_k: K, WTI candidates re-ranked by the diffusion denoiser (0 disables; the paper
            uses 32).
        max_words: query length in tokens, SOT and EOT included; ``None``: the model's recorded
            input setting (:class:`~diffusionret.models.config.InputConfig`).
        seed: seeds the denoiser's initial noise per query, so the same query always gives the
            same ranking.
        first_stage: how the first stage searches (exact / PQ / IVF, precision, ``rescore``, ``nprobe``).
        trim_query: run the text tower on the real tokens plus one padded position instead of all
            ``max_words`` (same scores, see :meth:`Searcher.encode_queries`).
        per_video: most moments one video contributes to the results (hits are moments:
            :func:`~diffusionret.retrieval.moments.moment_hits`).
        merge_margin: a segment touching a better one of its video joins its moment when its score
            is at most this much lower (0: a moment is its best segment).
    """

    candidates: int = 100
    rerank_top_k: int = 32
    max_words: Optional[int] = None
    seed: int = 0
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    trim_query: bool = True
    per_video: int = 1
    merge_margin: float = 0.0

    def __post_init__(self) -> None:
        MomentConfig(self.per_video, self.merge_margin)  # validates both
        if self.candidates <= 0:
            raise ValueError(f"candidates must be positive, got {self.candidates}")
        if self.rerank_top_k < 0:
            raise ValueError(f"rerank_top_k must be >= 0, got {self.rerank_top_k}")
        if self.max_words is not None and self.max_words < 2:
            raise ValueError(f"max_words must be >= 2, got {self.max_words}")


class Searcher:
    """Cascade search of an index with the model that built it.

    Args:
        model: a loaded ``DiffusionRet`` (eval mode).
        index: the loaded index (not modified: the searcher opens its own first stage).
        config: cascade sizes.
        model_id: the model's identity if already known (skips hashing the weights).
        tokenizer: ``(texts, max_words) -> (ids (B, L), mask (B, L))``; default :func:`diffusionret.tokenize`.
        input_config: the model's input settings (``max_words`` when ``config`` leaves it unset;
            default the reference's).
        diffusion: the diffusion schedule the model's denoisers were trained with (default the reference's).

    Raises:
        ModelMismatchError: ``model`` is not the model that built ``index``.
    """

    def __init__(self, model: nn.Module, index: VideoIndex, config: SearchConfig | None = None, *,
                 model_id: str | None = None, tokenizer: Tokenizer | None = None,
                 input_config: InputConfig | None = None, diffusion: DiffusionSchedule | None = None) -> None:
        model_id = model_id or model_fingerprint(model)
        if model_id != index.model_id:
            raise ModelMismatchError(
                f"index {index.root} was built by model {index.model_id[:12]} ({index.info.model_path}); "
                f"refusing to search it with model {model_id[:12]}"
            )
        self.model = model.eval()
        self.index = index
        self.config = config or SearchConfig()
        self.tokenizer = tokenizer
        self.max_words = self.config.max_words or (input_config or REFERENCE_INPUT).max_words
        self.device = next(model.parameters()).device
        self.first_stage = index.open_first_stage(self.config.first_stage)
        self._store = _IndexCandidates(index, self.first_stage)
        self.reranker: Reranker | None = None
        if getattr(model, "has_denoisers", False) and self.config.rerank_top_k > 0:
            rerank = RerankConfig.for_schedule(diffusion or REFERENCE_DIFFUSION, top_k=self.config.rerank_top_k)
            self.reranker = Reranker(model, rerank)

    @classmethod
    def open(cls, index_dir: str | os.PathLike, model_path: str | os.PathLike | None = None, *,
             device: str = "cpu", config: SearchConfig | None = None) -> "Searcher":
        """Load the index at ``index_dir`` and its model (``model_path``, default: the recorded checkpoint).

        The query length and the re-ranking schedule are the model file's (``config`` overrides the length).
        """
        from diffusionret.models.checkpoint import load_checkpoint

        info = VideoIndex.read_info(index_dir)
        model_path = model_path or info.model_path
        if model_path is None:
            raise ValueError(f"{index_dir} does not record its model's checkpoint; pass the model path")
        loaded = load_checkpoint(model_path, device=device)
        model_id = model_fingerprint(loaded.model)
        index = VideoIndex.load(index_dir, model_id=model_id)
        return cls(loaded.model, index, config, model_id=model_id, input_config=loaded.input,
                   diffusion=loaded.diffusion)

    @property
    def reranks(self) -> bool:
        return self.reranker is not None

    def describe(self) -> dict[str, Any]:
        """Facts for health checks and the web page."""
        return {
            "videos": len(self.index),
            "model_id": self.index.model_id,
            "model_path": self.index.info.model_path,
            "candidates": self.config.candidates,
            "rerank_top_k": self.config.rerank_top_k if self.reranks else 0,
            "first_stage": self.first_stage.describe(),
        }

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Tokenise and encode texts: ``tokens`` (B, L', D), ``mask`` (B, L'), ``cls`` (B, D) on the model's device.

        With ``trim_query`` the padding after the longest text is cut to one position (same scores:
        :func:`diffusionret.retrieval.encode_queries`).
        """
        return encode_queries(self.model, queries, self.max_words, trim=self.config.trim_query, tokenizer=self.tokenizer)

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The top ``k`` moments for one text query (see the module docstring for the cascade)."""
        return self.search_batch([query], k)[0]

    @torch.no_grad()
    def search_batch(self, queries: Sequence[str], k: int | Sequence[int] = 10) -> list[list[Hit]]:
        """The top ``k`` moments for each of several queries, in one pass of each stage.

        One text-tower pass over all queries (trimmed to the longest + 1: exact, the tower is
        causal), one first-stage call, one gather and one re-ranking call (each query with its own
        seeded noise). A query's hits are those :meth:`search` gives it alone. Every first-stage
        candidate goes through the cascade; the ranked candidates (segments, or whole videos in an
        index without segments) then become moments, at most ``config.per_video`` per video, each
        hit with its ``start``/``end`` in seconds.

        Args:
            queries: B texts.
            k: hits per query: one number, or B numbers (a serving batch mixes requests).
        """
        if isinstance(queries, str) or not queries:
            raise ValueError("queries must be a non-empty sequence of strings")
        ks = [k] * len(queries) if isinstance(k, int) else list(k)
        if len(ks) != len(queries):
            raise ValueError(f"got {len(ks)} values of k for {len(queries)} queries")
        if any(x <= 0 for x in ks):
            raise ValueError(f"k must be positive, got {k}")
        if len(self.index) == 0:
            return [[] for _ in queries]
        tokens, mask, cls = self.encode_queries(queries)
        # Every candidate comes back ranked: several segments of one video may merge into one moment,
        # so the top k moments can need more than k segments.
        ns = [max(x, self.config.candidates) for x in ks]
        ranked = retrieve(self.model, tokens, mask, cls, self._store, k=ns, candidates=self.config.candidates,
                          reranker=self.reranker, seed=self.config.seed)
        moments = MomentConfig(self.config.per_video, self.config.merge_margin)
        return [moment_hits(hits, moments, x) for hits, x in zip(ranked, ks, strict=True)]


class _IndexCandidates:
    """A :class:`~diffusionret.retrieval.CandidateStore` over a :class:`VideoIndex` with a given first stage."""

    def __init__(self, index: VideoIndex, stage: Any) -> None:
        self.index, self.stage = index, stage

    def __len__(self) -> int:
        return len(self.index)

    def first_stage(self, query: Tensor, n: int) -> tuple[Tensor, Tensor]:
        return self.index.search(query, n, stage=self.stage)

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.index.gather(rows)

    def gather_weights(self, rows: Tensor) -> Tensor | None:
        return self.index.gather_weights(rows)

    def record(self, row: int) -> Any:
        return self.index.records[row]
