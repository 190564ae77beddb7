"""Retrieval metrics (R@k, median rank, mean rank) with an explicit tie and median policy.

Ranks are 1-based: rank 1 means the correct candidate scored highest. For a query with target score
``s``, let ``g`` be the number of candidates scoring strictly more than ``s`` and ``n`` the number of
*other* (non-positive) candidates scoring exactly ``s``. The ``ties`` argument decides where the target
goes inside its tied block:

* ``"optimistic"`` (default): ``rank = g + 1`` (ties resolve in favour of the target, as open_clip).
* ``"pessimistic"``: ``rank = g + n + 1`` (the target comes after every tied candidate).
* ``"mean"``: the expected rank under uniformly random tie-breaking, ``g + 1 + n / 2`` for one target
  (``scipy.stats.rankdata(method="average")``); with ``p`` tied positives the expected rank of the first
  of them, ``g + (n + p + 1) / (p + 1)``. R@k thresholds this rank (a rank of 5.5 is no hit at R@5).
* ``"reference"``: the reference ``compute_metrics`` counting (docs/reference.md §3.4), for comparison with published
  numbers: a query whose target ties with ``t - 1`` other candidates contributes ``t`` entries with
  0-based ranks ``g, g + 1, ..., g + t - 1``, so tied queries enlarge the denominator
  (``num_entries > num_queries``); queries whose target score is NaN or +-inf vanish (the reference's
  ``sorted - target == 0`` test is never true for them). Only one target per query is allowed.

``R@k`` is ``100 * (fraction of ranks <= k)``. ``MedianR`` is the averaging median (NumPy's
``np.median``, as the reference's ``compute_metrics``; not the lower median of ``torch.median`` and not
floored), ``MeanR`` the arithmetic mean rank.

NaN and inf: outside ``"reference"`` mode NaN scores are treated as ``-inf`` (a NaN candidate never
outranks anything; a query with a NaN target ranks below every finite candidate), and +-inf are
ordinary values (equal infinities tie). A warning is logged when NaNs are seen. In ``"reference"`` mode
NaN candidates never compare greater or equal, and non-finite targets drop their query, as in the
reference.

Every function accepts NumPy arrays or torch tensors (any device; nothing is copied to the host except
per-query counts) and is vectorised: the score matrix is processed in row blocks of at most
``_MAX_CHUNK_ELEMENTS`` elements, so a 10k x 10k matrix needs no more than a few tens of MB of scratch.
All returned values are builtin ``float``/``int`` and can be passed to ``json.dumps`` directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KS",
    "Ties",
    "format_table",
    "multi_caption_metrics",
    "retrieval_metrics",
    "t2v_v2t_metrics",
]

Ties = Literal["optimistic", "pessimistic", "mean", "reference"]
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50)
_TIES = ("optimistic", "pessimistic", "mean", "reference")
# Row blocks hold at most this many scores, bounding the (rows, Nc) boolean scratch tensors.
_MAX_CHUNK_ELEMENTS = 1 << 22


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    array = np.asarray(x)
    if array.dtype == object:
        raise TypeError(f"{name} must be numeric, got an object array")
    # No copy: a 10k x 10k float32 matrix is 400 MB. Read-only arrays (np.load(mmap_mode="r")) make torch
    # warn once per process that writes would be undefined; nothing here writes.
    try:
        return torch.from_numpy(array)
    except ValueError:  # negative strides (e.g. a[:, ::-1]) are not representable in torch
        return torch.from_numpy(np.ascontiguousarray(array))


def _as_scores(sim: ArrayLike, name: str = "sim") -> torch.Tensor:
    scores = _as_tensor(sim, name)
    if scores.dim() != 2:
        raise ValueError(f"{name} must be 2-D (queries, candidates), got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{name} must have at least one query and one candidate, got {tuple(scores.shape)}")
    if scores.is_complex():
        raise TypeError(f"{name} must be real, got {scores.dtype}")
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)  # integers and bools compare exactly in float64 (|x| < 2**53)
    return scores


def _as_index(index: ArrayLike, length: int, upper: int, name: str, device: torch.device) -> torch.Tensor:
    idx = _as_tensor(index, name)
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"{name} must hold integer indices, got {idx.dtype}")
    if idx.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(idx.shape)}")
    idx = idx.to(device=device, dtype=torch.long)
    if length and (int(idx.min()) < 0 or int(idx.max()) >= upper):
        raise ValueError(f"{name} entries must lie in [0, {upper}), got range [{int(idx.min())}, {int(idx.max())}]")
    return idx


def _check_options(ties: str, ks: Sequence[int]) -> tuple[int, ...]:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat, got {ks!r}")
    return tuple(int(k) for k in ks)


def _tie_counts(
    scores: torch.Tensor,
    target: torch.Tensor | None,
    positives: torch.Tensor | None,
    nan_to_neginf: bool,
    need_ties: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: target score ``s``, #scores > s, #non-positives == s, #positives == s; each ``(Nq,)``.

    The tie counts are zeros unless ``need_ties`` (the optimistic rank needs only ``#scores > s``).
    """
    num_queries, num_candidates = scores.shape
    rows = max(1, _MAX_CHUNK_ELEMENTS // num_candidates)
    neg_inf = torch.tensor(-math.inf, dtype=scores.dtype, device=scores.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    nan_count = 0
    for start in range(0, num_queries, rows):
        chunk = scores[start : start + rows]
        # .any() first: a full NaN count costs several times more than the comparisons themselves.
        if nan_to_neginf and bool(chunk.isnan().any()):
            is_nan = chunk.isnan()
            nan_count += int(is_nan.sum())
            chunk = torch.where(is_nan, neg_inf, chunk)
        pos = None if positives is None else positives[start : start + rows]
        if pos is None:
            assert target is not None
            score = chunk.gather(1, target[start : start + rows, None])  # (rows, 1)
        else:
            score = torch.where(pos, chunk, neg_inf).amax(dim=1, keepdim=True)
        # int32 sums are ~2x faster than the default int64 ones and Nc < 2**31.
        greater = (chunk > score).sum(dim=1, dtype=torch.int32)
        if need_ties or pos is not None:
            equal = chunk == score
            tied = equal.sum(dim=1, dtype=torch.int32)
            if pos is None:
                tied_pos = (score[:, 0] == score[:, 0]).int()  # the target ties with itself unless it is NaN
            else:
                tied_pos = (equal & pos).sum(dim=1, dtype=torch.int32)
        else:
            tied = tied_pos = torch.zeros_like(greater)
        parts.append((score[:, 0], greater, tied - tied_pos, tied_pos))
    if nan_count:
        logger.warning("retrieval metrics: %d NaN scores treated as -inf", nan_count)
    score, greater, tied_neg, tied_pos = (torch.cat(column) for column in zip(*parts))
    return score, greater.long(), tied_neg.long(), tied_pos.long()


def _summary(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float | int]:
    """Metrics from one 1-based rank per query, ``ranks`` (Nq,) float64."""
    ordered = ranks.sort().values
    n = ordered.numel()
    median = 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])  # averaging median, as np.median
    out: dict[str, float | int] = {f"R{k}": 100.0 * float((ranks <= k).double().mean()) for k in ks}
    out.update(MedianR=float(median), MeanR=float(ranks.mean()), num_queries=n, num_entries=n)
    return out


def _reference_summary(
    greater: torch.Tensor, tied: torch.Tensor, num_candidates: int, num_queries: int, ks: tuple[int, ...]
) -> dict[str, float | int]:
    """Metrics over the multiset of 0-based ranks ``greater[q] + [0, tied[q])`` without materialising it.

    A constant matrix would yield Nq * Nc entries, so the entries are counted as a histogram over rank
    values (a difference array: +1 at ``g``, -1 at ``g + t``), which is O(Nq + Nc).
    """
    delta = torch.zeros(num_candidates + 1, dtype=torch.long)
    delta.index_add_(0, greater, torch.ones_like(greater))
    delta.index_add_(0, greater + tied, -torch.ones_like(greater))
    hist = delta.cumsum(0)[:num_candidates]  # hist[r] = number of entries with 0-based rank r
    cum = hist.cumsum(0)
    total = int(cum[-1])

    def nth(i: int) -> int:  # the i-th (0-based) smallest entry
        return int(torch.searchsorted(cum, torch.tensor([i]), right=True)[0])

    median = 0.5 * (nth((total - 1) // 2) + nth(total // 2)) + 1.0
    mean = float((torch.arange(num_candidates, dtype=torch.float64) * hist).sum()) / total + 1.0
    out: dict[str, float | int] = {f"R{k}": 100.0 * int(hist[:k].sum()) / total for k in ks}
    out.update(MedianR=median, MeanR=mean, num_queries=num_queries, num_entries=total)
    return out


def retrieval_metrics(
    sim: ArrayLike,
    *,
    query_to_target: ArrayLike | None = None,
    positives: ArrayLike | None = None,
    ties: Ties = "optimistic",
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float | int]:
    """R@k, median and mean rank of a score matrix (higher score = better match).

    The ground truth is given by at most one of ``query_to_target`` and ``positives``; by default it is
    the diagonal (``Nq == Nc``). See the module docstring for the tie, median and NaN policies.

    Args:
        sim: ``(Nq, Nc)`` scores, NumPy or torch, any real dtype and device.
        query_to_target: ``(Nq,)`` integer index of each query's correct candidate (e.g. the video of
            each caption in text-to-video retrieval with several captions per video).
        positives: ``(Nq, Nc)`` boolean mask of correct candidates, at least one per query; a query is
            ranked by its best-scoring positive (a hit is any positive).
        ties: ``"optimistic"``, ``"pessimistic"``, ``"mean"`` or ``"reference"``.
        ks: recall cut-offs.

    Returns:
        ``{"R1": ..., "R5": ..., "R10": ..., "R50": ...`` (percent, one key per ``k``)
        ``, "MedianR": ..., "MeanR": ..., "num_queries": int, "num_entries": int}``; ``num_queries``
        counts the ranked queries and ``num_entries`` the ranks averaged over (they differ only in
        ``"reference"`` mode).

    Raises:
        ValueError: on bad shapes, out-of-range indices, a query without positives, unknown ``ties``,
            ``"reference"`` with several positives for a query, or when no query is left to rank.
        TypeError: on non-integer indices or a non-boolean ``positives``.
    """
    ks = _check_options(ties, ks)
    scores = _as_scores(sim)
    num_queries, num_candidates = scores.shape
    if query_to_target is not None and positives is not None:
        raise ValueError("give at most one of query_to_target and positives")
    target = pos = None
    if positives is not None:
        pos = _as_tensor(positives, "positives").to(scores.device)
        if pos.dtype != torch.bool:
            raise TypeError(f"positives must be a boolean mask, got {pos.dtype}")
        if pos.shape != scores.shape:
            raise ValueError(f"positives shape {tuple(pos.shape)} != sim shape {tuple(scores.shape)}")
        per_query = pos.sum(dim=1)
        if bool((per_query == 0).any()):
            raise ValueError(f"{int((per_query == 0).sum())} queries have no positive candidate")
        if ties == "reference" and bool((per_query > 1).any()):
            raise ValueError("ties='reference' reproduces compute_metrics, which has one target per query")
    elif query_to_target is not None:
        target = _as_index(query_to_target, num_queries, num_candidates, "query_to_target", scores.device)
    else:
        if num_queries != num_candidates:
            raise ValueError(
                f"sim is {num_queries}x{num_candidates}: without query_to_target/positives the ground truth is "
                "the diagonal, which needs a square matrix"
            )
        target = torch.arange(num_queries, device=scores.device)

    score, greater, tied_neg, tied_pos = _tie_counts(
        scores, target, pos, nan_to_neginf=ties != "reference", need_ties=ties != "optimistic"
    )
    greater, tied_neg, tied_pos = greater.cpu(), tied_neg.cpu(), tied_pos.cpu()
    if ties == "reference":
        valid = score.isfinite().cpu()
        if not bool(valid.all()):
            logger.warning("ties='reference': %d queries with a non-finite target score dropped", int((~valid).sum()))
        if not bool(valid.any()):
            raise ValueError("ties='reference': every target score is non-finite, nothing to rank")
        tied = (tied_neg + tied_pos)[valid]
        return _reference_summary(greater[valid], tied, num_candidates, int(valid.sum()), ks)
    greater, tied_neg, tied_pos = greater.double(), tied_neg.double(), tied_pos.double()
    if ties == "optimistic":
        ranks = greater + 1.0
    elif ties == "pessimistic":
        ranks = greater + tied_neg + 1.0
    else:  # E[position of the first of p positives among n + p shuffled tied items] = (n + p + 1) / (p + 1)
        ranks = greater + (tied_neg + tied_pos + 1.0) / (tied_pos + 1.0)
    return _summary(ranks, ks)


def t2v_v2t_metrics(
    sim_t2v: ArrayLike,
    sim_v2t: ArrayLike | None = None,
    *,
    ties: Ties = "optimistic",
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, dict[str, float | int]]:
    """Both directions for one caption per video (ground truth on the diagonal).

    Args:
        sim_t2v: ``(N, N)`` text-to-video scores (rows: captions, columns: videos).
        sim_v2t: ``(N, N)`` video-to-text scores (rows: videos); defaults to ``sim_t2v.T``. Re-ranking
            produces a separate matrix per direction, as the reference does.
        ties: see :func:`retrieval_metrics`.
        ks: recall cut-offs.

    Returns:
        ``{"t2v": metrics, "v2t": metrics}`` as returned by :func:`retrieval_metrics`.
    """
    t2v = _as_scores(sim_t2v, "sim_t2v")
    v2t = t2v.T if sim_v2t is None else _as_scores(sim_v2t, "sim_v2t")
    return {"t2v": retrieval_metrics(t2v, ties=ties, ks=ks), "v2t": retrieval_metrics(v2t, ties=ties, ks=ks)}


def multi_caption_metrics(
    sim_t2v: ArrayLike,
    caption_to_video: ArrayLike,
    *,
    sim_v2t: ArrayLike | None = None,
    ties: Ties = "optimistic",
    ks: Sequence[int] = DEFAULT_KS,
    v2t_candidates: Literal["videos", "captions"] = "videos",
) -> dict[str, dict[str, float | int]]:
    """Both directions when videos have several captions (MSVD-style evaluation, docs/reference.md §3.5 fixed).

    Text-to-video: every caption ranks all videos; its target is its own video.

    Video-to-text, ``v2t_candidates="videos"`` (default, CLIP4Clip's intended algorithm): each video
    scores every video's caption *set* by its best caption (max over the set; NaN counted as ``-inf``) and
    ranks the ``V`` sets; its target is its own set. ``"captions"``: each video ranks all ``Ncap``
    captions and is ranked by its best-ranked own caption (a hit at k is any own caption in the top k);
    other videos' captions each count, so ranks are larger than with ``"videos"``. ``"captions"`` cannot
    be combined with ``ties="reference"`` when a video has several captions.

    With ``ties="reference"`` both directions use ``compute_metrics`` counting; the reference's MSVD
    text-to-video scorer (``tensor_text_to_video_metrics``) instead breaks ties arbitrarily and takes the
    lower median, which is not reproducible and not reproduced.

    Captions are grouped by ``caption_to_video``, not by position, so the reference's off-by-one
    grouping cannot occur. Videos without captions stay candidates for text-to-video but are not
    video-to-text queries (they have nothing to retrieve) and have no caption set to be ranked.

    Args:
        sim_t2v: ``(Ncap, V)`` caption-to-video scores.
        caption_to_video: ``(Ncap,)`` integer video index of each caption.
        sim_v2t: optional ``(V, Ncap)`` video-to-caption scores (e.g. after video-to-text re-ranking);
            defaults to ``sim_t2v.T``.
        ties: see :func:`retrieval_metrics`.
        ks: recall cut-offs.
        v2t_candidates: ``"videos"`` or ``"captions"``, see above.

    Returns:
        ``{"t2v": metrics, "v2t": metrics}`` as returned by :func:`retrieval_metrics`.

    Raises:
        ValueError: on inconsistent shapes, out-of-range video indices or an unknown ``v2t_candidates``.
    """
    if v2t_candidates not in ("videos", "captions"):
        raise ValueError(f"v2t_candidates must be 'videos' or 'captions', got {v2t_candidates!r}")
    t2v = _as_scores(sim_t2v, "sim_t2v")
    num_captions, num_videos = t2v.shape
    c2v = _as_index(caption_to_video, num_captions, num_videos, "caption_to_video", t2v.device)
    if sim_v2t is None:
        caption_scores = t2v  # (Ncap, V)
    else:
        v2t = _as_scores(sim_v2t, "sim_v2t")
        if v2t.shape != (num_videos, num_captions):
            raise ValueError(f"sim_v2t must have shape ({num_videos}, {num_captions}), got {tuple(v2t.shape)}")
        caption_scores = v2t.T.to(t2v.device)
    has_caption = torch.bincount(c2v, minlength=num_videos) > 0  # (V,)
    if not bool(has_caption.all()):
        logger.warning("%d videos have no caption; they are not video-to-text queries", int((~has_caption).sum()))

    results = {"t2v": retrieval_metrics(t2v, query_to_target=c2v, ties=ties, ks=ks)}
    if v2t_candidates == "captions":
        own = c2v[None, :] == torch.arange(num_videos, device=c2v.device)[:, None]  # (V, Ncap)
        results["v2t"] = retrieval_metrics(
            caption_scores.T[has_caption], positives=own[has_caption], ties=ties, ks=ks
        )
        return results
    # set_scores[k, j] = best score between video j and a caption of video k: (V, V)
    finite = torch.where(caption_scores.isnan(), -math.inf, caption_scores)
    set_scores = torch.full((num_videos, num_videos), -math.inf, dtype=finite.dtype, device=finite.device)
    set_scores.scatter_reduce_(0, c2v[:, None].expand(-1, num_videos), finite, reduce="amax")
    v2t_sets = set_scores.T[has_caption][:, has_caption]  # rows: query videos, columns: caption sets
    results["v2t"] = retrieval_metrics(v2t_sets, ties=ties, ks=ks)
    return results


def _format_value(value: object, precision: int) -> str:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{precision}f}"


def format_table(results: Mapping[str, object], *, precision: int = 1) -> str:
    """Render metrics as an aligned text table: one row per direction, one column per metric.

    Args:
        results: ``{"t2v": metrics, "v2t": metrics, ...}`` (any row names) or a single metrics dict,
            which is rendered as one unnamed row.
        precision: decimals for float values; ints (counts) are printed as ints.

    Returns:
        The table, lines joined by ``"\\n"``, without a trailing newline.
    """
    if not results:
        return ""
    named = all(isinstance(value, Mapping) for value in results.values())
    rows: dict[str, Mapping[str, object]] = (
        {str(name): value for name, value in results.items()} if named else {"": results}  # type: ignore[misc]
    )
    columns: list[str] = []
    for metrics in rows.values():
        columns.extend(key for key in metrics if key not in columns)
    cells = [["", *columns]]
    cells += [[name, *(_format_value(m.get(c, ""), precision) for c in columns)] for name, m in rows.items()]
    if not named:  # a single unnamed row: no name column
        cells = [row[1:] for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        # Row names are left-aligned like labels; every value column is right-aligned like numbers.
        first = row[0].ljust(widths[0]) if named else row[0].rjust(widths[0])
        lines.append("  ".join([first, *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))]).rstrip())
    return "\n".join(lines)
