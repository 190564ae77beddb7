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

from diffusionret.rerank import draw_noise
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
    docs/reference.md §1.4) exactly as the ``max_words - longest`` padded positions would. Texts
    of different lengths are then packed (``DiffusionRet.encode_text(packed=True)``): each runs
    the tower on its own real positions plus one, not on the longest one's (the other padded
    positions come back 0, masked).
    """
    if tokenizer is None:
        from diffusionret.tokenizer import tokenize as tokenizer
    device = next(model.parameters()).device
    ids, mask = tokenizer(list(queries), max_words=max_words)
    if trim:
        keep = min(ids.shape[1], int(mask.sum(dim=1).max()) + 1)
        ids, mask = ids[:, :keep], mask[:, :keep]
    ids, mask = ids.to(device), mask.to(device)
    if trim and _packing_saves(mask):
        parts = [model.encode_text(ids[group], mask[group], packed=True) for group in _pack_groups(mask)]
        tokens, cls = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    else:
        tokens, cls = model.encode_text(ids, mask)
    return tokens, mask, cls


#: Most positions packed into one sequence: its attention spans the whole sequence (masked), so
#: its cost grows with the square of the length; 256 keeps it under ~10 % of the linear layers'.
PACK_POSITIONS = 256


def _kept_positions(mask: Tensor) -> Tensor:
    """(B,) positions each text of ``mask`` (B, L) keeps when packed: its real ones plus one, at most L."""
    return torch.clamp(mask.sum(dim=1) + 1, max=mask.shape[1])


def _pack_groups(mask: Tensor) -> list[slice]:
    """Consecutive rows of ``mask`` (B, L) whose kept positions (real + 1) fit :data:`PACK_POSITIONS` together."""
    keep = _kept_positions(mask).tolist()
    groups, start, used = [], 0, 0
    for row, n in enumerate(keep):
        if row > start and used + n > PACK_POSITIONS:
            groups.append(slice(start, row))
            start, used = row, 0
        used += n
    groups.append(slice(start, len(keep)))
    return groups


def _packing_saves(mask: Tensor) -> bool:
    """Whether packing texts (mask (B, L)) runs fewer positions than padding them all to L.

    Packed, each text keeps its real positions plus one; their attention spans the whole packed
    sequence (masked), which costs little beside the linear layers at search batch sizes.
    """
    keep = _kept_positions(mask)
    return mask.shape[0] > 1 and int(keep.sum()) < mask.numel()


@torch.no_grad()
def retrieve(model: nn.Module, tokens: Tensor, mask: Tensor, cls: Tensor, store: CandidateStore, *,
             k: int | Sequence[int], candidates: int, reranker: Reranker | None = None, seed: int = 0,
             generator: torch.Generator | None = None) -> list[list[Hit]]:
    """The top ``k`` candidates of ``store`` for each encoded query (module docstring).

    The queries are processed together: one first-stage call per distinct candidate count, one
    gather, and one re-ranking call for all of them. Each query's result is the one it gets alone.

    Args:
        tokens: (B, L, D), mask: (B, L), cls: (B, D): encoded queries (:func:`encode_queries`).
        k: hits per query: one number for all, or one per query.
        candidates: first-stage candidates per query scored by WTI (raised to the query's ``k``).
        reranker: re-ranks the top ``reranker.config.top_k`` WTI candidates; ``None`` or
            ``top_k = 0``: the WTI ranking.
        seed: the re-ranking noise of every query comes from a fresh generator seeded with it (on the
            model's device), so a query's result does not depend on the others in the batch.
        generator: instead, draw every query's noise from this generator, in query order (the
            queries are then re-ranked one at a time).

    Returns:
        One list of hits per query, best first.
    """
    count = cls.shape[0]
    ks = [k] * count if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != count:
        raise ValueError(f"got {len(ks)} values of k for {count} queries")
    if any(x <= 0 for x in ks):
        raise ValueError(f"k must be positive, got {k}")
    if len(store) == 0:
        return [[] for _ in range(count)]
    device = next(model.parameters()).device
    query = torch.nn.functional.normalize(cls.float(), dim=-1).cpu()
    # Queries asking for more than `candidates` hits get more candidates: group by the count, so
    # each query's first stage and WTI see exactly the candidates they would alone.
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(ks):
        groups.setdefault(max(candidates, x), []).append(i)
    results: list[list[Hit]] = [[] for _ in range(count)]
    for n, members in groups.items():
        picked = torch.tensor(members)
        coarse, rows = store.first_stage(query[picked], n)
        batched = (generator is None and reranker is not None and reranker.config.top_k > 0
                   and reranker.config.eta == 0 and len(members) > 1)
        if batched:
            hits = _second_stage_batch(model, tokens[picked], mask[picked], cls[picked], coarse, rows, store,
                                       ks=[ks[i] for i in members], reranker=reranker, device=device, seed=seed)
        else:
            hits = [_second_stage(model, tokens[i:i + 1], mask[i:i + 1], cls[i:i + 1],
                                  None if coarse is None else coarse[j], rows[j], store, k=ks[i], reranker=reranker,
                                  device=device, generator=generator or torch.Generator(device=device).manual_seed(seed))
                    for j, i in enumerate(members)]
        for i, result in zip(members, hits, strict=True):
            results[i] = result
    return results


def _candidates(model: nn.Module, tokens: Tensor, mask: Tensor, rows: Tensor, store: CandidateStore,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One query's candidate features and WTI scores.

    Args:
        tokens: (1, L, D); mask: (1, L); rows: (N,) store rows.
    Returns:
        video (N, T, D), frame_mask (N, T) on ``device`` and wti (1, N) float32.
    """
    video, frame_mask = store.gather(rows)
    video, frame_mask = video.to(device), frame_mask.to(device)
    return video, frame_mask, _wti(model, tokens, mask, video, frame_mask, store, rows, device)


def _wti(model: nn.Module, tokens: Tensor, mask: Tensor, video: Tensor, frame_mask: Tensor, store: CandidateStore,
         rows: Tensor, device: torch.device) -> Tensor:
    """WTI scores (1, N) float32 of one query against its gathered candidates ``video`` (N, T, D).

    The video-side weights stored at build time are used when every row has them (``None``: the
    model computes them), exactly as for a query searched alone.
    """
    weights = store.gather_weights(rows)
    if weights is not None:
        weights = weights.to(device)
    return model.similarity(tokens, mask, video, frame_mask, frame_weights=weights, trim=True).float()


def _second_stage_batch(model: nn.Module, tokens: Tensor, mask: Tensor, cls: Tensor, coarse: Tensor | None,
                        rows: Tensor, store: CandidateStore, *, ks: list[int], reranker: Reranker,
                        device: torch.device, seed: int) -> list[list[Hit]]:
    """:func:`_second_stage` of B queries with one re-ranking call (deterministic sampler only).

    Args:
        tokens: (B, L, D); mask: (B, L); cls: (B, D); coarse: (B, N) or None; rows: (B, N) store rows.
    """
    b, n = rows.shape
    video, frame_mask = store.gather(rows.reshape(-1))  # (B * N, T, D): one gather for the batch
    video, frame_mask = video.to(device), frame_mask.to(device)
    wti = torch.cat([_wti(model, tokens[i:i + 1], mask[i:i + 1], video[i * n:(i + 1) * n],
                          frame_mask[i * n:(i + 1) * n], store, rows[i], device) for i in range(b)])  # (B, N)
    top_k = min(reranker.config.top_k, wti.shape[1])
    # Each query's own noise: a fresh generator seeded as when it runs alone.
    noise = torch.cat([draw_noise(1, top_k, torch.Generator(device=device).manual_seed(seed), device)
                       for _ in range(wti.shape[0])])
    final = reranker.t2v_rows(wti, cls, video, frame_mask, noise=noise)
    return [_hits(final[i].cpu(), wti[i].cpu(), None if coarse is None else coarse[i], rows[i], store, k=ks[i],
                  top_k=top_k) for i in range(wti.shape[0])]


def _second_stage(model: nn.Module, tokens: Tensor, mask: Tensor, cls: Tensor, coarse: Tensor | None, rows: Tensor,
                  store: CandidateStore, *, k: int, reranker: Reranker | None, device: torch.device,
                  generator: torch.Generator) -> list[Hit]:
    """WTI over one query's first-stage candidates, then diffusion re-ranking of the top K.

    Args:
        tokens: (1, L, D); mask: (1, L); cls: (1, D); coarse: (N,) first-stage scores or None; rows: (N,) store rows.
    """
    video, frame_mask, wti = _candidates(model, tokens, mask, rows, store, device)
    final = wti
    top_k = 0 if reranker is None else min(reranker.config.top_k, wti.shape[1])
    if top_k > 0:
        final = reranker.t2v(wti, cls, video, frame_mask, generator=generator)
    return _hits(final[0].cpu(), wti[0].cpu(), coarse, rows, store, k=k, top_k=top_k)


def _hits(final: Tensor, wti: Tensor, coarse: Tensor | None, rows: Tensor, store: CandidateStore, *, k: int,
          top_k: int) -> list[Hit]:
    """The top ``k`` hits of one query: final (N,) and wti (N,) scores, coarse (N,) or None, rows (N,)."""
    # Stable sorts: equal scores keep first-stage order, so results are deterministic.
    wti_order = torch.sort(wti, descending=True, stable=True).indices
    wti_rank = torch.empty_like(wti_order)
    wti_rank[wti_order] = torch.arange(1, wti_order.numel() + 1)
    order = torch.sort(final, descending=True, stable=True).indices[:k]
    # Each column picked once and moved to Python in one .tolist() (the same Python floats and ints
    # as float()/int() of each element) rather than four tensor indexings per hit.
    final_s, wti_s, ranks = (t.index_select(0, order).tolist() for t in (final, wti, wti_rank))
    picked = rows.index_select(0, order.to(rows.device)).tolist()
    coarse_s = None if coarse is None else coarse.index_select(0, order.to(coarse.device)).tolist()
    hits = []
    for i in range(len(picked)):
        stages = {} if coarse_s is None else {"coarse": coarse_s[i]}
        stages["wti"] = wti_s[i]
        # The bonuses are positive, so the K re-ranked candidates are exactly the first K ranks.
        if i < top_k:
            stages["rerank"] = final_s[i]
        hits.append(Hit(rank=i + 1, score=final_s[i], record=store.record(picked[i]), stage_scores=stages,
                        wti_rank=ranks[i]))
    return hits
