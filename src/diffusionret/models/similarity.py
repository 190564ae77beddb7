"""Weighted token interaction ("WTI") similarity (SPEC.md 1.4), computed in bounded-memory chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MASK_FILL = -9e15


def token_weights(weight_fc: nn.Module, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax weights over tokens/frames from an MLP on the *unnormalised* features.

    Args:
        feats: (N, L, D); mask: (N, L) 0/1.
    Returns:
        (N, L), zero where masked (the -9e15 fill underflows to exactly 0).
    """
    logits = weight_fc(feats).squeeze(-1)
    logits = logits.masked_fill(mask == 0, _MASK_FILL)
    return torch.softmax(logits, dim=-1)


def wti_scores(text_norm: torch.Tensor, text_mask: torch.Tensor, text_w: torch.Tensor,
               video_norm: torch.Tensor, video_mask: torch.Tensor, video_w: torch.Tensor) -> torch.Tensor:
    """WTI logits for one chunk of texts x one chunk of videos.

    Masked similarities are 0, not -inf, before the max (the reference's "zero floor", SPEC.md 1.4
    step 4), which we keep for checkpoint/number compatibility.

    Args:
        text_norm: (A, L, D) L2-normalised tokens; text_mask, text_w: (A, L).
        video_norm: (B, T, D) L2-normalised frames; video_mask, video_w: (B, T).
    Returns:
        (A, B) = (t2v + v2t) / 2.
    """
    a, length, dim = text_norm.shape
    b, frames, _ = video_norm.shape
    # Zeroing padded vectors *before* the product gives exactly the reference's "multiply the
    # scores by both masks" without a pass over the (A, L, B, T) block.
    text_norm = text_norm * text_mask.to(text_norm.dtype).unsqueeze(-1)
    video_norm = video_norm * video_mask.to(video_norm.dtype).unsqueeze(-1)
    # One (A*L, D) x (D, B*T) matrix product; then maxima and weighted sums.
    s = (text_norm.reshape(a * length, dim) @ video_norm.reshape(b * frames, dim).T).view(a, length, b, frames)
    t2v = torch.einsum("al,alb->ab", text_w, s.amax(dim=3))
    v2t = torch.einsum("bt,abt->ab", video_w, s.amax(dim=1))
    return (t2v + v2t) / 2


def default_chunk_size(length: int, frames: int, budget_bytes: int = 64 * 2**20) -> int:
    """Texts (and videos) per chunk so that one (A, L, B, T) float32 block stays within the budget."""
    per_pair = max(1, length * frames * 4 * 2)  # scores + one temporary of the same size
    side = int((budget_bytes / per_pair) ** 0.5)
    return max(1, side)


def wti_similarity(text_weight_fc: nn.Module, video_weight_fc: nn.Module, tokens: torch.Tensor,
                   text_mask: torch.Tensor, video: torch.Tensor, frame_mask: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Full (Nt, Nv) WTI matrix, chunked over both sides so memory is bounded by the chunk size.

    Args:
        tokens: (Nt, L, D) text token features; text_mask: (Nt, L).
        video: (Nv, T, D) frame features after the temporal module; frame_mask: (Nv, T).
        chunk_size: texts/videos per chunk; chosen from a 64 MiB budget when ``None`` (a block
            that size keeps the maxima passes cache-friendly while the product stays a large GEMM).
    Returns:
        (Nt, Nv) float32 scores in [-1, 1].
    """
    if tokens.ndim != 3 or video.ndim != 3:
        raise ValueError(f"expected tokens (Nt, L, D) and video (Nv, T, D), got {tuple(tokens.shape)} and {tuple(video.shape)}")
    if tokens.shape[-1] != video.shape[-1]:
        raise ValueError(f"feature widths differ: text {tokens.shape[-1]} vs video {video.shape[-1]}")
    if text_mask.shape != tokens.shape[:2] or frame_mask.shape != video.shape[:2]:
        raise ValueError(f"mask shapes {tuple(text_mask.shape)}, {tuple(frame_mask.shape)} do not match features "
                         f"{tuple(tokens.shape[:2])}, {tuple(video.shape[:2])}")
    tokens, video = tokens.float(), video.float()
    text_w = token_weights(text_weight_fc, tokens, text_mask)
    video_w = token_weights(video_weight_fc, video, frame_mask)
    text_n = F.normalize(tokens, dim=-1)
    video_n = F.normalize(video, dim=-1)
    chunk = chunk_size or default_chunk_size(tokens.shape[1], video.shape[1])
    out = tokens.new_empty(tokens.shape[0], video.shape[0])
    for i in range(0, tokens.shape[0], chunk):
        ti = slice(i, i + chunk)
        for j in range(0, video.shape[0], chunk):
            vj = slice(j, j + chunk)
            out[ti, vj] = wti_scores(text_n[ti], text_mask[ti], text_w[ti], video_n[vj], frame_mask[vj], video_w[vj])
    return out
