"""Stage 1 ("discrimination", docs/reference.md §1.5): fine-tune CLIP + temporal module + WTI head contrastively.

:class:`ContrastiveObjective` wraps the model so that one ``forward`` computes the whole loss; that
is what DDP needs (its gradient hooks are armed in ``forward``), and it keeps the all-gather inside
the wrapped call.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from diffusionret.distributed import DistContext
from diffusionret.training.losses import symmetric_info_nce

logger = logging.getLogger(__name__)


class ContrastiveObjective(nn.Module):
    """Symmetric, duplicate-aware InfoNCE of a :class:`~diffusionret.models.DiffusionRet`.

    Args:
        model: the model being trained (stage ``discrimination``).
        ctx: distributed context (the loss sees the global batch).
    """

    def __init__(self, model: nn.Module, ctx: DistContext) -> None:
        super().__init__()
        self.model = model
        self.ctx = ctx

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, frames: torch.Tensor,
                frame_mask: torch.Tensor, video_key: torch.Tensor) -> dict[str, torch.Tensor]:
        """One local batch -> losses.

        Args:
            text_ids, text_mask: (b, L) int64.
            frames: (b, T, 3, H, W) normalised frames; frame_mask: (b, T) int64.
            video_key: (b,) int64 stable video identity.

        Returns:
            ``loss`` (scalar, differentiable) and ``disc_loss`` (the same value, detached).
        """
        tokens, _cls = self.model.encode_text(text_ids, text_mask)
        video = self.model.encode_video(frames, frame_mask)
        out = symmetric_info_nce(self.model.similarity, tokens, text_mask, video, frame_mask, video_key,
                                 self.model.logit_scale, self.ctx)
        return {"loss": out.loss, "disc_loss": out.loss.detach()}


def prepare_stage1_model(model: nn.Module) -> nn.Module:
    """Trainable set of the discrimination stage (docs/reference.md §1.8): everything but ``clip.visual.conv1``.

    The model must not have denoisers (a stage-1 run on a stage-2 checkpoint is a config error).
    """
    if getattr(model, "has_denoisers", False):
        raise ValueError("stage 'discrimination' needs a model without denoisers; "
                         "this checkpoint is a generation-stage model")
    for name, param in model.named_parameters():
        param.requires_grad_(name != "clip.visual.conv1.weight")
    model.train()
    return model


def stage1_batch_args(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors :meth:`ContrastiveObjective.forward` takes, moved to ``device``.

    Args:
        batch: a :class:`diffusionret.data.collate.Batch` (or a mapping with the same fields).
    """
    get = batch.get if isinstance(batch, dict) else (lambda name: getattr(batch, name))
    return {
        "text_ids": get("text_ids").to(device, non_blocking=True),
        "text_mask": get("text_mask").to(device, non_blocking=True),
        "frames": get("frames").to(device, non_blocking=True).float(),
        "frame_mask": get("frame_mask").to(device, non_blocking=True),
        "video_key": get("video_key").to(device, non_blocking=True).long(),
    }
