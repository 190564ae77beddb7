"""Hard-negative mining for the generation stage (docs/reference.md §1.7, §8.4/§8.5 fixed).

Each query gets a candidate list: its positive first, then the ``num`` candidates of the global batch
with the highest WTI similarity that are *not* the same video. The reference ranks by
``softmax(sim)`` with positives overwritten by -1; softmax is monotone per row, so ranking the raw
scores with positives at -inf selects and orders the same candidates. Unlike the reference, a
duplicate of the query's video is never returned as a negative: ``num`` is capped to the smallest
number of non-positive candidates over the rows, and a query without any negative is left out.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def available_negatives(positives: torch.Tensor) -> int:
    """(Nq, Nc) bool positives -> the number of negatives the poorest row has."""
    return int((~positives).sum(dim=1).min().item()) if positives.shape[0] else 0


def cap_num_negatives(num: int, positives: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``num`` capped to what the batch can supply, and the queries that have any negative at all.

    A query whose every candidate is its own video (a batch made of copies of one video) has no
    negative; it is left out of the loss instead of being given positives as "negatives".

    Returns:
        ``(num', usable)``: ``num'`` = min(num, fewest negatives among usable queries) (0 when no
        query is usable) and ``usable`` (Nq,) bool.
    """
    available = (~positives).sum(dim=1)
    usable = available >= 1
    if not bool(usable.any()):
        return 0, usable
    return min(num, int(available[usable].min().item())), usable


def mine_hard_negatives(scores: torch.Tensor, positives: torch.Tensor, num: int) -> torch.Tensor:
    """Indices of the ``num`` most similar non-positive candidates per query, hardest first.

    Args:
        scores: (Nq, Nc) similarities (raw WTI scores; any per-row monotone transform is equivalent).
        positives: (Nq, Nc) bool, True for candidates of the query's own video.
        num: negatives per query; must not exceed :func:`available_negatives`.

    Returns:
        (Nq, num) int64 column indices, sorted by descending score.
    """
    if num > available_negatives(positives):
        raise ValueError(f"num={num} exceeds the negatives available in the batch "
                         f"({available_negatives(positives)}); cap it with cap_num_negatives")
    masked = scores.detach().float().masked_fill(positives, float("-inf"))
    return masked.topk(num, dim=1, largest=True, sorted=True).indices


def candidate_indices(scores: torch.Tensor, positives: torch.Tensor, positive_index: torch.Tensor,
                      num: int) -> torch.Tensor:
    """Candidate lists ``[positive, hardest negatives...]`` for every query.

    Args:
        scores: (Nq, Nc) similarities.
        positives: (Nq, Nc) bool.
        positive_index: (Nq,) the column of each query's own sample (index 0 of its list).
        num: negatives per query (already capped).

    Returns:
        (Nq, num + 1) int64 column indices; column 0 is ``positive_index``.
    """
    negatives = mine_hard_negatives(scores, positives, num)
    return torch.cat([positive_index[:, None].to(negatives), negatives], dim=1)
