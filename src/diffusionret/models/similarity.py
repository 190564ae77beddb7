"""Weighted token interaction ("WTI") similarity (docs/reference.md §1.4), computed in bounded-memory chunks.

Peak memory is bounded by the chunk size, not by the number of texts or videos: the weight MLPs
run on at most ``chunk_size`` rows at a time (only their small (N, L) softmax outputs are kept),
and features are cast to float32 and L2-normalised inside the chunk loop, so no full-size copy of
the features or of the MLPs' (N, L, 2D) hidden layer ever exists. Besides the (Nt, Nv) output and
the (Nv, T) frame weights, the largest live tensor is one chunk's (A, L, B, T) score block.

Work is spent only on the tokens and frames that exist: texts are grouped by real length and videos
by real frame count, and each block keeps its rows' longest real length; the reference's zero floor
(a padded position's 0 taking part in the maxima) is applied as ``max(., 0)`` on the rows that had
padding (see :func:`length_buckets`). On CPU, evaluation and search (``trim``) pack each chunk's real
tokens without any padding and reduce each score block in one pass with a compiled kernel
(:mod:`diffusionret.native.wti`); the PyTorch reductions remain where it cannot be built, with
``DIFFUSIONRET_NATIVE=0``, on GPU, and where gradients are needed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusionret.native import WtiKernel, load_wti_kernel

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


def default_weight_chunk(length: int, dim: int, budget_bytes: int = 32 * 2**20) -> int:
    """Rows per weight-MLP call so that its (rows, L, 2D) float32 hidden layer stays within the budget."""
    return max(1, budget_bytes // max(1, length * 2 * dim * 4))


def chunked_token_weights(weight_fc: nn.Module, feats: torch.Tensor, mask: torch.Tensor,
                          chunk_size: int | None = None) -> torch.Tensor:
    """:func:`token_weights` on at most ``chunk_size`` rows at a time, on float32-cast features.

    This is exactly what :func:`wti_similarity` computes for its weights, so weights precomputed
    with it (e.g. the video side, stored next to fp16 index features) give the same scores.

    Args:
        feats: (N, L, D), any float dtype (each chunk is cast to float32); mask: (N, L) 0/1.
        chunk_size: rows per MLP call; from a 32 MiB budget for the hidden layer when ``None``.
    Returns:
        (N, L) float32 weights, zero where masked.
    """
    if feats.ndim != 3 or mask.shape != feats.shape[:2]:
        raise ValueError(f"expected feats (N, L, D) and mask (N, L), got {tuple(feats.shape)} and {tuple(mask.shape)}")
    chunk = chunk_size or default_weight_chunk(feats.shape[1], feats.shape[2])
    if feats.shape[0] <= chunk:
        return token_weights(weight_fc, feats.float(), mask)
    return torch.cat([token_weights(weight_fc, feats[i:i + chunk].float(), mask[i:i + chunk])
                      for i in range(0, feats.shape[0], chunk)])


def _masked_unit(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 L2-normalised rows with padded positions zeroed: (N, L, D), (N, L) -> (N, L, D).

    Zero vectors make every masked similarity exactly 0 (not -inf) before the max, as the reference's
    "multiply the scores by both masks" does (kept for number compatibility), without a pass over the
    (A, L, B, T) block.
    """
    return F.normalize(feats.float(), dim=-1) * mask.to(torch.float32).unsqueeze(-1)


def _zero_floor(maxima: torch.Tensor, floor: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``max(maxima, 0)`` on the slices along ``dim`` where ``floor`` (bool) is set; ``None``: none."""
    if floor is None or not bool(floor.any()):
        return maxima
    if bool(floor.all()):
        return maxima.clamp_min(0)
    shape = [1] * maxima.ndim
    shape[dim] = -1
    return torch.where(floor.view(shape), maxima.clamp_min(0), maxima)


def _block_scores(text_unit: torch.Tensor, text_w: torch.Tensor, video_unit: torch.Tensor, video_w: torch.Tensor,
                  text_floor: torch.Tensor | None = None, video_floor: torch.Tensor | None = None) -> torch.Tensor:
    """WTI logits of one block from masked unit features: (A, L, D), (A, L), (B, T, D), (B, T) -> (A, B).

    ``text_floor`` (A,) / ``video_floor`` (B,) bool: rows that had padding which is not among the
    positions given. A padded position scores 0 against everything, so its only effect is a 0 taking
    part in the maxima across that side (the zero floor); applying it as ``max(., 0)`` is the same
    number, without the position's share of the product.
    """
    a, length, dim = text_unit.shape
    b, frames, _ = video_unit.shape
    # One (A*L, D) x (D, B*T) matrix product; then maxima and weighted sums.
    s = (text_unit.reshape(a * length, dim) @ video_unit.reshape(b * frames, dim).T).view(a, length, b, frames)
    t2v = torch.einsum("al,alb->ab", text_w, _zero_floor(s.amax(dim=3), video_floor, 2))
    v2t = torch.einsum("bt,abt->ab", video_w, _zero_floor(s.amax(dim=1), text_floor, 0))
    return (t2v + v2t) / 2


def default_chunk_size(length: int, frames: int, budget_bytes: int = 64 * 2**20) -> int:
    """Texts (and videos) per chunk so that one (A, L, B, T) float32 block stays within the budget."""
    per_pair = max(1, length * frames * 4 * 2)  # scores + one temporary of the same size
    side = int((budget_bytes / per_pair) ** 0.5)
    return max(1, side)


def real_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Valid positions per row: (N, L) 0/1 -> (N,) int64."""
    return mask.ne(0).sum(dim=1)


def length_order(mask: torch.Tensor) -> torch.Tensor:
    """Row indices sorted by real length, ties in input order: (N, L) -> (N,) int64.

    Consecutive rows of this order have nearly equal lengths, so a chunk of them can be trimmed to
    its longest member (see :func:`length_buckets`).
    """
    return torch.argsort(real_lengths(mask), stable=True)


@dataclass(frozen=True)
class LengthBucket:
    """A chunk of rows of similar real length and the positions of theirs that take part in WTI.

    Attributes:
        rows: (n,) row indices into the full (N, L) tensors.
        keep: positions kept per row: the chunk's longest real length (at least 1).
        positions: (n, keep) positions to keep, valid ones first; ``None`` when every mask is a prefix
            (valid positions first), so the first ``keep`` positions are the ones.
        floor: (n,) bool, rows with padding (real length < L): their side's maxima take a 0 part
            (the zero floor), whether or not a padded position is among the kept ones.
    """

    rows: torch.Tensor
    keep: int
    positions: torch.Tensor | None
    floor: torch.Tensor

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This bucket's rows and kept positions of x: (N, L, *F) -> (n, keep, *F)."""
        sub = x.index_select(0, self.rows)
        if self.positions is None:
            return sub[:, :self.keep]
        index = self.positions.view(*self.positions.shape, *([1] * (sub.ndim - 2))).expand(-1, -1, *sub.shape[2:])
        return torch.gather(sub, 1, index)


#: A bucket's longest row keeps at most this many times the positions of its shortest (+ 1): on the
#: MSR-VTT 1k-A captions (chunks of 128) the products then cover 12.5 positions per caption instead
#: of 13.4 with fixed-size chunks (11.6 would be each caption's own length), in 10 buckets.
BUCKET_SPREAD = 1.25


def length_buckets(mask: torch.Tensor, chunk_size: int) -> list[LengthBucket]:
    """Split rows into chunks of at most ``chunk_size`` in :func:`length_order`, each trimmed to what WTI needs.

    A padded position scores exactly 0 against everything and its softmax weight is 0, so it matters
    only as the 0 that takes part in the maxima (the reference's zero floor, docs/reference.md §1.4),
    which :attr:`LengthBucket.floor` supplies. A chunk therefore keeps its longest real length
    (capped at L, at least 1); its shorter rows keep some padded positions, which changes nothing. A
    chunk also ends where a row would need more than :data:`BUCKET_SPREAD` times the positions (+ 1)
    of the chunk's first row, so the long tail of lengths does not widen a whole chunk. Rows with no
    valid position keep one (padded) position and score 0, as before.

    Args:
        mask: (N, L) 0/1, not necessarily a prefix mask.
    Returns:
        buckets covering every row exactly once.
    """
    n, full = mask.shape
    valid = mask.ne(0)
    lengths = valid.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()  # one host transfer for all chunks
    prefix = bool(torch.equal(valid, torch.arange(full, device=mask.device)[None, :] < lengths[:, None]))
    # Valid positions first, each group in its original order.
    positions = None if prefix else torch.argsort((~valid).to(torch.int32), dim=1, stable=True)
    floor = lengths < full
    buckets = []
    start = 0
    while start < n:
        # The first row past the spread (a binary search: a Python loop over every row would cost
        # seconds at a million rows), capped at chunk_size rows.
        limit = BUCKET_SPREAD * (sorted_lengths[start] + 1) - 1
        stop = min(bisect.bisect_right(sorted_lengths, limit, lo=start + 1), start + chunk_size, n)
        rows = order[start:stop]
        keep = max(1, min(full, sorted_lengths[stop - 1]))
        buckets.append(LengthBucket(rows=rows, keep=keep, floor=floor.index_select(0, rows),
                                    positions=None if positions is None else positions.index_select(0, rows)[:, :keep]))
        start = stop
    return buckets


def wti_similarity(text_weight_fc: nn.Module, video_weight_fc: nn.Module, tokens: torch.Tensor,
                   text_mask: torch.Tensor, video: torch.Tensor, frame_mask: torch.Tensor,
                   chunk_size: int | None = None, *, frame_weights: torch.Tensor | None = None,
                   trim: bool = False) -> torch.Tensor:
    """Full (Nt, Nv) WTI matrix, in bounded memory.

    With ``trim`` (evaluation and search), texts are grouped by real length and videos by real frame
    count (:func:`length_buckets`); each block's product covers only its rows' valid positions (the
    zero floor of padded rows is applied to the maxima), and the scores go back to the input order.
    This equals the padded computation up to float re-association (tested: <= 1e-6). On CPU without
    gradients, the chunk's real tokens are packed (no padded row at all) and the compiled reduction
    (:mod:`diffusionret.native.wti`) reduces each block in one pass (same scores, tested <= 1e-6).
    Besides a chunk's block, ``trim`` holds float32 unit copies of all the videos (the size of the
    float32 video features), made once per call instead of once per text chunk. Training keeps
    the padded blocks (``trim=False``): its batches are small, and re-associated sums, however
    close, would send a seeded run down another trajectory. Features may be fp16/bf16 (e.g. from an
    index): every chunk is cast to float32 first.

    Args:
        tokens: (Nt, L, D) text token features; text_mask: (Nt, L).
        video: (Nv, T, D) frame features after the temporal module; frame_mask: (Nv, T).
        chunk_size: texts/videos per chunk, and rows per weight-MLP call; chosen from a 64 MiB
            budget at full length when ``None`` (a block that size keeps the maxima passes
            cache-friendly while the product stays a large GEMM).
        frame_weights: optional precomputed (Nv, T) video-side softmax weights, as returned by
            :func:`chunked_token_weights` on ``video_weight_fc`` (``DiffusionRet.frame_weights``);
            when given, ``video_weight_fc`` is not run. Pass float32 weights for scores identical
            to computing them here.
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
    if frame_weights is not None and frame_weights.shape != video.shape[:2]:
        raise ValueError(f"frame_weights must be (Nv, T) = {tuple(video.shape[:2])}, got {tuple(frame_weights.shape)}")
    chunk = chunk_size or default_chunk_size(tokens.shape[1], video.shape[1])
    # The video weights are needed by every text chunk: compute the small (Nv, T) matrix once, over
    # all T frames (exactly what DiffusionRet.frame_weights stores with an index).
    if frame_weights is None:
        video_w = chunked_token_weights(video_weight_fc, video, frame_mask, chunk)
    else:
        video_w = frame_weights.to(device=video.device, dtype=torch.float32)
    out = torch.empty(tokens.shape[0], video.shape[0], dtype=torch.float32, device=tokens.device)
    if not trim:
        for i in range(0, tokens.shape[0], chunk):
            ti = slice(i, i + chunk)
            text = tokens[ti].float()
            text_w = token_weights(text_weight_fc, text, text_mask[ti])
            text_unit = _masked_unit(text, text_mask[ti])
            del text
            for j in range(0, video.shape[0], chunk):
                vj = slice(j, j + chunk)
                out[ti, vj] = _block_scores(text_unit, text_w, _masked_unit(video[vj], frame_mask[vj]), video_w[vj])
        return out
    # Unit copies of all the videos (as large as the float32 video features), made once rather than
    # once per text chunk (with the evaluation calling once per 128 captions, that repeated pass was
    # ~5 % of its WTI time at 1,000 x 1,000).
    videos = [(vb, _masked_unit(vb.take(video), vb.take(frame_mask)), vb.take(video_w))
              for vb in length_buckets(frame_mask, chunk)]
    kernel = _reduction_kernel(out)
    for tb in length_buckets(text_mask, chunk):
        # The weight MLP runs on the kept positions only: a padded position's weight is exactly 0
        # either way (the -9e15 fill underflows), so the softmax is the same.
        text, text_m = tb.take(tokens).float(), tb.take(text_mask)
        text_w = token_weights(text_weight_fc, text, text_m)
        text_unit = _masked_unit(text, text_m)
        del text
        if kernel is not None and not (text_w.requires_grad or video_w.requires_grad or text_unit.requires_grad):
            _ragged_scores(kernel, text_unit, text_w, text_m, tb, videos, out)
            continue
        rows = tb.rows.unsqueeze(1)
        for vb, video_unit, vw in videos:
            out[rows, vb.rows] = _block_scores(text_unit, text_w, video_unit, vw, tb.floor, vb.floor)
    return out


#: Videos per product of the compiled path: a (R, 32 T) block (1.8 MiB at 1,200 token rows, T 12)
#: is still in the core's cache when the kernel reduces it, and 1-thread GEMM ran at 91-94 GFLOP/s
#: on this shape against 70-82 with 128 videos (AMD EPYC, AVX-512).
RAGGED_VIDEO_BLOCK = 32


def _reduction_kernel(out: torch.Tensor) -> WtiKernel | None:
    """The compiled reduction kernel where it applies (CPU float32 output), else None (PyTorch ops)."""
    if out.device.type != "cpu" or out.dtype != torch.float32:
        return None
    return load_wti_kernel()


def _ragged_scores(kernel: WtiKernel, text_unit: torch.Tensor, text_w: torch.Tensor, text_m: torch.Tensor,
                   tb: LengthBucket, videos: list[tuple[LengthBucket, torch.Tensor, torch.Tensor]],
                   out: torch.Tensor) -> None:
    """One text chunk against every video bucket, written into ``out``: the product over the real tokens only.

    The chunk's real tokens are packed caption after caption (no padded row, so the product covers
    exactly the real tokens), and the compiled kernel reduces each (R, B T) block in one pass,
    applying the zero floors (:func:`length_buckets`) itself. Same scores as :func:`_block_scores`
    up to float rounding.

    Args:
        text_unit: (A, L', D) masked unit features of the chunk's kept positions (valid ones first);
        text_w: (A, L') their weights; text_m: (A, L') their mask.
        videos: (bucket, (B, T', D) masked unit features, (B, T') weights) per video bucket.
        out: (Nt, Nv) float32.
    """
    valid = text_m.ne(0)
    rows, weights = text_unit[valid], text_w[valid]  # (R, D), (R,): caption-major, valid positions first
    offsets = torch.zeros(valid.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(valid.sum(dim=1), dim=0, out=offsets[1:])
    widest = max(min(unit.shape[0], RAGGED_VIDEO_BLOCK) * unit.shape[1] for _, unit, _ in videos)
    # One scratch for every block's product: a fresh (R, B T) allocation per block would fault its pages in again.
    scratch = torch.empty(rows.shape[0] * widest, dtype=torch.float32)
    threads = torch.get_num_threads()
    for vb, video_unit, vw in videos:
        for j in range(0, video_unit.shape[0], RAGGED_VIDEO_BLOCK):
            unit = video_unit[j:j + RAGGED_VIDEO_BLOCK]
            width = unit.shape[0] * unit.shape[1]
            block = torch.mm(rows, unit.reshape(width, -1).T,
                             out=scratch[:rows.shape[0] * width].view(rows.shape[0], width))
            pick = slice(j, j + RAGGED_VIDEO_BLOCK)
            kernel.reduce(block, offsets, weights, tb.floor, vw[pick], vb.floor[pick], out, tb.rows, vb.rows[pick],
                          threads=threads)
