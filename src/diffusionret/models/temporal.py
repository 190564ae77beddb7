"""Temporal modules over per-frame CLIP features (docs/reference.md §1.3).

Parameter names mirror the reference (``transformerClip.resblocks.{i}.attn/ln_1/mlp.c_fc/...``,
``frame_position_embeddings``, ``lstm_visual``) so official checkpoints load without renaming.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TemporalBlock(nn.Module):
    """Pre-LN residual attention block with the reference's TF-style LayerNorm (eps 1e-12)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        # eps 1e-12, not CLIP's 1e-5: the reference uses its own LayerNorm here even though the
        # weights are copied from CLIP text layers (docs/reference.md §1.3).
        self.ln_1 = nn.LayerNorm(width, eps=1e-12)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: (T, B, W) sequence-first; attn_mask: (B * heads, T, T) additive."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    """Stack of :class:`TemporalBlock` (the reference's ``transformerClip``)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.resblocks = nn.ModuleList(TemporalBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, W), frame_mask: (B, T) 0/1 -> (B, T, W)."""
        batch, frames, _ = x.shape
        # Finite -1e6 key mask (not -inf), as in the reference, so all-padding rows stay finite.
        key_bias = (1.0 - frame_mask.to(x.dtype)) * -1000000.0
        attn_mask = key_bias.unsqueeze(1).expand(batch, frames, frames).repeat_interleave(self.heads, dim=0)
        h = x.transpose(0, 1)
        for block in self.resblocks:
            h = block(h, attn_mask)
        return h.transpose(0, 1)


def aggregate_seq_transf(frame_feats: torch.Tensor, frame_mask: torch.Tensor, position: nn.Embedding,
                         transformer: TemporalTransformer) -> torch.Tensor:
    """seqTransf: add frame positions, run the temporal transformer, residual around the stack.

    Args:
        frame_feats: (B, T, D) per-frame CLS features (float32).
        frame_mask: (B, T) 0/1.
    Returns:
        (B, T, D).
    """
    frames = frame_feats.shape[1]
    if frames > position.num_embeddings:
        raise ValueError(f"{frames} frames exceed the {position.num_embeddings}-row frame position table")
    ids = torch.arange(frames, device=frame_feats.device)
    x = frame_feats + position(ids).unsqueeze(0)
    return transformer(x, frame_mask) + frame_feats


def aggregate_seq_lstm(frame_feats: torch.Tensor, frame_mask: torch.Tensor, lstm: nn.LSTM) -> torch.Tensor:
    """seqLSTM: packed LSTM over the valid frames, padded tail keeps the input, plus residual."""
    lengths = frame_mask.sum(dim=1).clamp(min=1).cpu()
    packed = nn.utils.rnn.pack_padded_sequence(frame_feats, lengths, batch_first=True, enforce_sorted=False)
    out, _ = lstm(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=frame_feats.shape[1])
    valid = frame_mask.bool().unsqueeze(-1)
    out = torch.where(valid, out, frame_feats)
    return out + frame_feats
