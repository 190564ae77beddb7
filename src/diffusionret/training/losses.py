"""Stage-1 contrastive loss: symmetric InfoNCE over the global batch, duplicate-aware.

The reference (docs/reference.md §1.5) all-gathers features, scores the whole global batch on every rank and
takes the diagonal as the only positive, so two samples of the same video in one batch push each
other apart (docs/reference.md §8.5), and its AllGather backward drops the other ranks' gradient terms. Here:

* positives are decided by the stable ``video_key`` of every sample, so every copy of a video in
  the global batch is a positive (a soft target spread uniformly over the copies), never a
  negative; with no duplicates this is exactly the reference's ``CrossEn``;
* each rank scores only its own queries (local texts against all videos, local videos against all
  texts), and :func:`~diffusionret.distributed.all_gather_with_grad` sums gradients over
  ranks, so DDP's gradient average equals the single-process gradient of the global-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from diffusionret.distributed import DistContext, all_gather_no_grad, all_gather_with_grad, batch_sizes

# sim_fn(text_tokens (Nt,L,D), text_mask (Nt,L), video (Nv,T,D), frame_mask (Nv,T)) -> (Nt, Nv)
SimilarityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def positive_mask(query_keys: torch.Tensor, candidate_keys: torch.Tensor) -> torch.Tensor:
    """(Nq,) and (Nc,) int64 video keys -> (Nq, Nc) bool, True where the video is the same."""
    return query_keys[:, None] == candidate_keys[None, :]


def soft_target_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-row InfoNCE with the target spread uniformly over every positive column.

    Args:
        logits: (Nq, Nc) scaled similarities.
        positives: (Nq, Nc) bool; every row needs at least one positive.

    Returns:
        (Nq,) losses ``-sum_j target_ij * log_softmax(logits)_ij``. With exactly one positive per row
        this is the usual cross-entropy against that column.
    """
    counts = positives.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("every query needs at least one positive candidate")
    # float32: log_softmax under autocast would otherwise run in half precision.
    log_prob = F.log_softmax(logits.float(), dim=1)
    target = positives.to(log_prob.dtype) / counts.to(log_prob.dtype)
    return -(target * log_prob).sum(dim=1)


@dataclass
class ContrastiveOutput:
    """What one contrastive step computed on this rank.

    Attributes:
        loss: scalar, this rank's share of the global-batch mean of ``(L_t2v + L_v2t) / 2``
            (the mean over its queries when every rank holds the same number of samples).
        t2v: (b, B) raw (unscaled) similarities of the local texts to every video of the global batch.
        v2t: (b, B) raw similarities of the local videos to every text of the global batch.
        positives: (b, B) bool, same video key (identical for both directions).
        keys: (B,) video keys of the global batch, in rank order.
        offset: position of this rank's first sample in the global batch.
    """

    loss: torch.Tensor
    t2v: torch.Tensor
    v2t: torch.Tensor
    positives: torch.Tensor
    keys: torch.Tensor
    offset: int


def symmetric_info_nce(sim_fn: SimilarityFn, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                       video: torch.Tensor, frame_mask: torch.Tensor, video_keys: torch.Tensor,
                       logit_scale: torch.Tensor, ctx: DistContext) -> ContrastiveOutput:
    """Symmetric, duplicate-aware InfoNCE over the global batch (docs/reference.md §1.5, §8.4/§8.5 fixed).

    Args:
        sim_fn: the WTI similarity, ``(tokens, text_mask, video, frame_mask) -> (Nt, Nv)``.
        text_tokens: (b, L, D) this rank's word features.
        text_mask: (b, L) int 0/1.
        video: (b, T, D) this rank's video (frame) features.
        frame_mask: (b, T) int 0/1.
        video_keys: (b,) int64 stable video identities (not Python's salted ``hash``).
        logit_scale: scalar log-temperature; logits are ``exp(logit_scale) * sim``.
        ctx: distributed context (one process: ``b == B``).

    Returns:
        :class:`ContrastiveOutput`; only ``loss`` carries gradients that matter for training.
    """
    sizes = batch_sizes(text_tokens.shape[0], ctx)
    keys = all_gather_no_grad(video_keys, ctx, sizes)
    offset = sum(sizes[:ctx.rank])
    if ctx.is_distributed:
        all_tokens = all_gather_with_grad(text_tokens, ctx, sizes)
        all_video = all_gather_with_grad(video, ctx, sizes)
        all_text_mask = all_gather_no_grad(text_mask, ctx, sizes)
        all_frame_mask = all_gather_no_grad(frame_mask, ctx, sizes)
        t2v = sim_fn(text_tokens, text_mask, all_video, all_frame_mask)          # (b, B)
        v2t = sim_fn(all_tokens, all_text_mask, video, frame_mask).t()           # (b, B)
    else:
        # One process: the local rows are the whole batch, so one matrix serves both directions.
        t2v = sim_fn(text_tokens, text_mask, video, frame_mask)                  # (B, B)
        v2t = t2v.t()
    positives = positive_mask(video_keys, keys)
    scale = logit_scale.exp()
    per_row = (soft_target_cross_entropy(scale * t2v, positives)
               + soft_target_cross_entropy(scale * v2t, positives)) / 2          # (b,)
    # Sum over local rows / (global rows / world): DDP's average over ranks is then the global-batch
    # mean even when ranks hold different numbers of samples (skipped videos).
    loss = per_row.sum() * (ctx.world_size / sum(sizes))
    return ContrastiveOutput(loss=loss, t2v=t2v, v2t=v2t, positives=positives, keys=keys, offset=offset)
