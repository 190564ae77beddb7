"""Batching of dataset items, dropping items that the ``on_error="skip"`` policy turned into ``None``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "collate"]


@dataclass
class Batch:
    """A batch of :class:`~diffusionret.data.dataset.VideoTextDataset` items (or of its text/video views).

    Fields a view does not produce are ``None``. Shapes: ``text_ids``/``text_mask`` ``(B, L)`` int64,
    ``frames`` ``(B, T, 3, S, S)`` float32, ``frame_mask`` ``(B, T)`` int64, ``video_key``, ``index``,
    ``caption_index``, ``video_index`` ``(B,)`` int64, ``video_id`` a list of ``B`` strings.
    """

    video_id: list[str]
    video_key: torch.Tensor
    video_index: torch.Tensor
    text_ids: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    caption_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.video_id)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        moved: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            moved[field.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        pinned: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            pinned[field.name] = value.pin_memory() if torch.is_tensor(value) else value
        return Batch(**pinned)


_TENSOR_FIELDS = ("text_ids", "text_mask", "frames", "frame_mask")
_INT_FIELDS = ("video_key", "video_index", "index", "caption_index")


def collate(samples: Sequence[dict[str, Any] | None]) -> Batch | None:
    """Stack items into a :class:`Batch`.

    ``None`` items (videos skipped under ``on_error="skip"``) are dropped, so a batch can be smaller
    than the loader's batch size; when every item of a batch was skipped the result is ``None`` and
    the caller must skip the step. Skipped items never become zero tensors.
    """
    items = [s for s in samples if s is not None]
    if not items:
        return None
    keys = items[0].keys()
    kwargs: dict[str, Any] = {"video_id": [item["video_id"] for item in items]}
    for name in _TENSOR_FIELDS:
        if name in keys:
            kwargs[name] = torch.stack([item[name] for item in items])
    for name in _INT_FIELDS:
        if name in keys:
            kwargs[name] = torch.tensor([int(item[name]) for item in items], dtype=torch.long)
    return Batch(**kwargs)
