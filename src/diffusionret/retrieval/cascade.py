"""The one retrieval path: text query -> first stage -> WTI -> diffusion re-ranking -> :class:`Hit` s.

Search over an on-disk index (:class:`~diffusionret.index.searcher.Searcher`) and the demo's query
over in-memory features (:class:`FeatureStore`) both run :func:`retrieve`; they differ only in the
:class:`CandidateStore` they hand it.

1. **First stage**: the store proposes up to ``candidates`` rows per query (an index: cosine of
   pooled embeddings, exact or ANN; in-memory features: every video, in corpus order).
2. **WTI**: the model's token-level similarity head (docs/reference.md §1.4) on the candidates' frame
   features (with their stored video-side weights when the store has them).
3. **Diffusion re-ranking** of the top ``K`` WTI candidates (:class:`Reranker`): each gets a
   bonus in (0, 1), so the K stay ahead of the other candidates, whose WTI order is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from diffusionret.retrieval.reranker import Reranker

Tokenizer = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class CandidateRecord:
    """The record of an in-memory candidate: its id only."""

    id: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id}


@dataclass(frozen=True)
class Hit:
    """One retrieved candidate.

    Attributes:
        rank: 1-based position in the final ranking.
        score: final score (WTI, plus the diffusion bonus for re-ranked candidates).
        record: the candidate (:class:`~diffusionret.index.catalog.VideoRecord` for an index,
            :class:`CandidateRecord` for in-memory features); ``id`` is its id.
        stage_scores: ``coarse`` (first stage, when the store scores one), ``wti`` and, when
            re-ranked, ``rerank`` (the final score).
        wti_rank: 1-based position among the candidates by WTI score alone.
        start, end: the matching time span in seconds, for hits inside a longer video (``None``:
            the whole video).
    """

    rank: int
    score: float
    record: Any
    stage_scores: dict[str, float] = field(default_factory=dict)
    wti_rank: Optional[int] = None
    start: Optional[float] = None
    end: Optional[float] = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def video_id(self) -> str:
        return self.record.id

    @property
    def wti_score(self) -> float:
        return self.stage_scores["wti"]

    @property
    def path(self) -> str:
        return self.record.path

    @property
    def duration(self) -> float | None:
        return getattr(self.record, "duration", None)

    def to_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "score": self.score, "stage_scores": dict(self.stage_scores), **self.record.to_dict(),
               "video_id": self.video_id, "start": self.start, "end": self.end}
        return out


class CandidateStore(Protocol):
    """Where candidates come from: an on-disk :class:`~diffusionret.index.store.VideoIndex` or :class:`FeatureStore`."""

    def __len__(self) -> int: ...

    def first_stage(self, query: Tensor, n: int) -> tuple[Tensor | None, Tensor]:
        """Candidates of each query: query (B, D) normalised float32 -> scores (B, n') or ``None``, rows (B, n')."""
        ...

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Frame features (n, T, D) and frame mask (n, T) of ``rows`` (n,)."""
        ...

    def gather_weights(self, rows: Tensor) -> Tensor | None:
        """Stored WTI video-side weights (n, T) of ``rows``, or ``None`` (the model computes them)."""
        ...

    def record(self, row: int) -> Any:
        """The candidate at ``row`` (has ``id`` and ``to_dict()``)."""
        ...


class FeatureStore:
    """In-memory candidates: every video of a features object, proposed in corpus order.

    Args:
        video: (Nv, T, D) frame features; frame_mask: (Nv, T); video_ids: Nv ids.
    """

    def __init__(self, video: Tensor, frame_mask: Tensor, video_ids: Sequence[str]) -> None:
        if video.ndim != 3 or frame_mask.shape != video.shape[:2] or len(video_ids) != video.shape[0]:
            raise ValueError(f"expected video (N, T, D), frame_mask (N, T) and N ids, got {tuple(video.shape)}, "
                             f"{tuple(frame_mask.shape)} and {len(video_ids)}")
        self.video, self.frame_mask, self.video_ids = video, frame_mask, list(video_ids)

    @classmethod
    def from_features(cls, feats: Any) -> "FeatureStore":
        """From :class:`~diffusionret.evaluation.features.CorpusFeatures` (``video``, ``frame_mask``, ``video_ids``)."""
        return cls(feats.video, feats.frame_mask, feats.video_ids)

    def __len__(self) -> int:
        return len(self.video_ids)

    def first_stage(self, query: Tensor, n: int) -> tuple[Tensor | None, Tensor]:
        # Exhaustive: the whole corpus in its own order (n is ignored: every video is scored by WTI).
        return None, torch.arange(len(self)).expand(query.shape[0], -1)

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        if torch.equal(rows, torch.arange(len(self))):
            return self.video, self.frame_mask  # the whole corpus: no copy
        return self.video[rows], self.frame_mask[rows]

    def gather_weights(self, rows: Tensor) -> Tensor | None:
        return None

    def record(self, row: int) -> CandidateRecord:
        return CandidateRecord(self.video_ids[row])


@torch.no_grad()
def encode_queries(model: nn.Module, queries: Sequence[str], max_words: int, *, trim: bool = False,
                   tokenizer: Tokenizer | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Tokenise and encode texts: ``tokens`` (B, L', D), ``mask`` (B, L'), ``cls`` (B, D) on the model's device.

    With ``trim`` the padding after the longest text is cut to one position:
    ``L' = min(max_words, longest + 1)``. The scores are the same: the text tower's attention is
    causal, so real positions never see later ones, and the WTI head needs only one padded
    position, whose similarity 0 takes part in the maximum over tokens (the "zero floor",
    docs/reference.md §1.4) exactly as the ``max_words - longest`` padded positions would.
    """
    if tokenizer is None:
        from diffusionret.tokenizer import tokenize as tokenizer
    device = next(model.parameters()).device
    ids, mask = tokenizer(list(queries), max_words=max_words)
    if trim:
        keep = min(ids.shape[1], int(mask.sum(dim=1).max()) + 1)
        ids, mask = ids[:, :keep], mask[:, :keep]
    ids, mask = ids.to(device), mask.to(device)
    tokens, cls = model.encode_text(ids, mask)
    return tokens, mask, cls


@torch.no_grad()
def retrieve(model: nn.Module, tokens: Tensor, mask: Tensor, cls: Tensor, store: CandidateStore, *, k: int,
             candidates: int, reranker: Reranker | None = None, seed: int = 0,
             generator: torch.Generator | None = None) -> list[list[Hit]]:
    """The top ``k`` candidates of ``store`` for each encoded query (module docstring).

    Args:
        tokens: (B, L, D), mask: (B, L), cls: (B, D): encoded queries (:func:`encode_queries`).
        candidates: first-stage candidates per query scored by WTI (raised to ``k``).
        reranker: re-ranks the top ``reranker.config.top_k`` WTI candidates; ``None`` or
            ``top_k = 0``: the WTI ranking.
        seed: the re-ranking noise of every query comes from a fresh generator seeded with it (on the
            model's device), so a query's result does not depend on the others in the batch.
        generator: instead, draw every query's noise from this generator, in query order.

    Returns:
        One list of hits per query, best first.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if len(store) == 0:
        return [[] for _ in range(cls.shape[0])]
    device = next(model.parameters()).device
    coarse, rows = store.first_stage(torch.nn.functional.normalize(cls.float(), dim=-1).cpu(), max(candidates, k))
    return [
        _second_stage(model, tokens[i:i + 1], mask[i:i + 1], cls[i:i + 1], None if coarse is None else coarse[i],
                      rows[i], store, k=k, reranker=reranker, device=device,
                      generator=generator or torch.Generator(device=device).manual_seed(seed))
        for i in range(cls.shape[0])
    ]


def _second_stage(model: nn.Module, tokens: Tensor, mask: Tensor, cls: Tensor, coarse: Tensor | None, rows: Tensor,
                  store: CandidateStore, *, k: int, reranker: Reranker | None, device: torch.device,
                  generator: torch.Generator) -> list[Hit]:
    """WTI over one query's first-stage candidates, then diffusion re-ranking of the top K.

    Args:
        tokens: (1, L, D); mask: (1, L); cls: (1, D); coarse: (N,) first-stage scores or None; rows: (N,) store rows.
    """
    video, frame_mask = store.gather(rows)
    video, frame_mask = video.to(device), frame_mask.to(device)
    weights = store.gather_weights(rows)  # stored at build time; None: the model computes them
    if weights is not None:
        weights = weights.to(device)
    wti = model.similarity(tokens, mask, video, frame_mask, frame_weights=weights, trim=True).float()  # (1, N)
    final = wti
    top_k = 0 if reranker is None else min(reranker.config.top_k, wti.shape[1])
    if top_k > 0:
        final = reranker.t2v(wti, cls, video, frame_mask, generator=generator)
    final, wti = final[0].cpu(), wti[0].cpu()
    # Stable sorts: equal scores keep first-stage order, so results are deterministic.
    wti_order = torch.sort(wti, descending=True, stable=True).indices
    wti_rank = torch.empty_like(wti_order)
    wti_rank[wti_order] = torch.arange(1, wti_order.numel() + 1)
    order = torch.sort(final, descending=True, stable=True).indices[:k]
    hits = []
    for rank, position in enumerate(order.tolist(), start=1):
        stages = {} if coarse is None else {"coarse": float(coarse[position])}
        stages["wti"] = float(wti[position])
        # The bonuses are positive, so the K re-ranked candidates are exactly the first K ranks.
        if top_k > 0 and rank <= top_k:
            stages["rerank"] = float(final[position])
        hits.append(Hit(rank=rank, score=float(final[position]), record=store.record(int(rows[position])),
                        stage_scores=stages, wti_rank=int(wti_rank[position])))
    return hits
