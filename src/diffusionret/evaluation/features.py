"""Encode an evaluation split once (every caption, every unique video) and cache it on disk.

Texts and videos are encoded separately, through the dataset's text view (no decoding) and video
view (each video decoded once, also for multi-caption datasets such as MSVD). Under torchrun each
rank encodes a contiguous, *unpadded* shard; the gathered rows are put back in place by their
dataset index, so no sample is counted twice and none is lost (the reference padded its shards and
relied on an index scatter, docs/reference.md §3.2 / §8.34).

Videos that cannot be read under ``data.on_error: skip`` are recorded as missing; their captions are
dropped. :func:`diffusionret.evaluation.evaluate.evaluate_features` refuses to report metrics over such
a set unless explicitly allowed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusionret.config_utils import atomic_path
from diffusionret.distributed import DistContext, IndexSampler, all_gather_variable, shard_range

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "diffusionret-features"
FEATURES_VERSION = "1"


@dataclass
class CorpusFeatures:
    """Encoded evaluation split (all float32, on CPU unless moved).

    Attributes:
        tokens: (Nt, L, D) word features of every caption.
        text_mask: (Nt, L) int64.
        cls: (Nt, D) sentence features (projected EOT token).
        video: (Nv, T, D) frame features after the temporal module.
        frame_mask: (Nv, T) int64.
        caption_to_video: (Nt,) int64 row of each caption's video in ``video``.
        video_ids: (Nv,) ids of the encoded videos.
        missing_video_ids: videos of the split that could not be read (not in ``video``).
        meta: provenance (model fingerprint, dataset, split, data settings), checked on re-use.
        text_index: (Nt,) int64 dataset index of every caption row (``None`` in files written before
            it existed: then rows are the dataset's captions in order, less those of missing videos).

    Loaded with ``mmap=True`` the tensors are memory maps of the file (see
    :mod:`~diffusionret.safetensors_mmap`): rows are read from disk when indexed.
    """

    tokens: torch.Tensor
    text_mask: torch.Tensor
    cls: torch.Tensor
    video: torch.Tensor
    frame_mask: torch.Tensor
    caption_to_video: torch.Tensor
    video_ids: list[str]
    missing_video_ids: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    text_index: torch.Tensor | None = None

    @property
    def num_captions(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_videos(self) -> int:
        return int(self.video.shape[0])

    def to(self, device: torch.device | str) -> "CorpusFeatures":
        moved = {name: getattr(self, name).to(device) for name in _TENSORS}
        index = self.text_index.to(device) if self.text_index is not None else None
        return CorpusFeatures(**moved, video_ids=self.video_ids, missing_video_ids=self.missing_video_ids,
                              meta=dict(self.meta), text_index=index)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.safetensors`` file (tensors + JSON metadata), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = features_metadata(self.video_ids, self.missing_video_ids, self.meta)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        if self.text_index is not None:
            tensors["text_index"] = self.text_index.detach().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        logger.info("features written: %s (%d captions, %d videos)", path, self.num_captions, self.num_videos)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> "CorpusFeatures":
        """Read a file written by :meth:`save` (or by the training feature cache).

        Args:
            path: the ``.safetensors`` file.
            mmap: map the tensors instead of reading them: resident memory then grows only with the
                rows used (training on a cache larger than RAM). Half-precision files stay half here.
        """
        from safetensors.torch import load_file

        from diffusionret.safetensors_mmap import mmap_tensors

        path = Path(path)
        metadata = read_features_metadata(path)
        tensors = mmap_tensors(path) if mmap else load_file(str(path))
        return cls(**{name: tensors[name] for name in _TENSORS},
                   video_ids=json.loads(metadata["video_ids"]),
                   missing_video_ids=json.loads(metadata["missing_video_ids"]),
                   meta=json.loads(metadata["meta"]), text_index=tensors.get("text_index"))


_TENSORS = ("tokens", "text_mask", "cls", "video", "frame_mask", "caption_to_video")


def features_metadata(video_ids: list[str], missing_video_ids: list[str], meta: Mapping[str, Any]) -> dict[str, str]:
    """The string metadata of a features file (format tag, ids, provenance)."""
    return {
        "format": FEATURES_FORMAT,
        "format_version": FEATURES_VERSION,
        "video_ids": json.dumps(list(video_ids)),
        "missing_video_ids": json.dumps(list(missing_video_ids)),
        "meta": json.dumps(dict(meta), sort_keys=True),
    }


def read_features_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a features file, checked to be one (format and version).

    Raises:
        FileNotFoundError, ValueError: naming the file.
    """
    from diffusionret.safetensors_mmap import read_header

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    _tensors, metadata, _start = read_header(path)
    if metadata.get("format") != FEATURES_FORMAT:
        raise ValueError(f"{path}: not a diffusionret features file")
    if metadata.get("format_version") != FEATURES_VERSION:
        raise ValueError(f"{path}: features version {metadata.get('format_version')} is not supported")
    return metadata


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` on ``device``: CUDA bf16/fp16 (``auto``: bf16 when supported), CPU fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type="cuda", dtype=dtype)


def _loader(view: Dataset, ctx: DistContext, batch_size: int, num_workers: int) -> DataLoader:
    from diffusionret.data.collate import collate
    from diffusionret.data.dataset import worker_init_fn

    shard = shard_range(len(view), ctx)  # type: ignore[arg-type]
    return DataLoader(view, batch_size=max(1, batch_size // ctx.world_size), sampler=IndexSampler(shard),
                      num_workers=num_workers, collate_fn=collate, worker_init_fn=worker_init_fn,
                      pin_memory=ctx.device.type == "cuda")


def _batches(loader: DataLoader, desc: str, ctx: DistContext) -> Iterator[Any]:
    bar = tqdm(loader, desc=desc, unit="batch", disable=not ctx.is_main, dynamic_ncols=True, leave=False)
    for batch in bar:
        if batch is not None:  # every item of the batch was skipped
            yield batch


@torch.no_grad()
def encode_corpus(model: nn.Module, dataset: Any, *, ctx: DistContext, batch_size: int, num_workers: int = 0,
                  precision: str = "auto", meta: Mapping[str, Any] | None = None) -> CorpusFeatures:
    """Encode every caption and every unique video of ``dataset`` (a ``VideoTextDataset``).

    Args:
        model: a ``DiffusionRet`` on ``ctx.device`` (put in eval mode here).
        dataset: provides ``text_view()``, ``video_view()``, ``video_ids`` and ``caption_to_video``.
        ctx: distributed context; every rank encodes its shard, every rank receives everything.
        batch_size: global batch size (split over ranks).
        num_workers: DataLoader workers per rank.
        precision: autocast setting (see :func:`autocast_context`).
        meta: provenance stored with the features.

    Returns:
        :class:`CorpusFeatures` on CPU; captions of unreadable videos are dropped and the videos listed
        in ``missing_video_ids``.
    """
    was_training = model.training
    model.eval()
    device = ctx.device
    try:
        with autocast_context(device, precision):
            text = _encode_texts(model, dataset, ctx, batch_size, num_workers)
            video = _encode_videos(model, dataset, ctx, batch_size, num_workers)
    finally:
        model.train(was_training)
    return _assemble(dataset, text, video, meta or {})


def _encode_texts(model: nn.Module, dataset: Any, ctx: DistContext, batch_size: int,
                  num_workers: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {"index": [], "tokens": [], "text_mask": [], "cls": []}
    loader = _loader(dataset.text_view(), ctx, batch_size, num_workers)
    for batch in _batches(loader, "encode texts", ctx):
        ids = batch.text_ids.to(ctx.device, non_blocking=True)
        mask = batch.text_mask.to(ctx.device, non_blocking=True)
        tokens, cls = model.encode_text(ids, mask)
        parts["index"].append(batch.index.to(ctx.device))
        parts["tokens"].append(tokens.float())
        parts["text_mask"].append(mask)
        parts["cls"].append(cls.float())
    return _gather_parts(parts, ctx, like=_text_templates(model, dataset, ctx))


def _encode_videos(model: nn.Module, dataset: Any, ctx: DistContext, batch_size: int,
                   num_workers: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {"index": [], "video": [], "frame_mask": []}
    loader = _loader(dataset.video_view(), ctx, batch_size, num_workers)
    for batch in _batches(loader, "encode videos", ctx):
        frames = batch.frames.to(ctx.device, non_blocking=True)
        mask = batch.frame_mask.to(ctx.device, non_blocking=True)
        parts["index"].append(batch.video_index.to(ctx.device))
        parts["video"].append(model.encode_video(frames, mask).float())
        parts["frame_mask"].append(mask)
    return _gather_parts(parts, ctx, like=_video_templates(model, dataset, ctx))


def _text_templates(model: nn.Module, dataset: Any, ctx: DistContext) -> dict[str, torch.Tensor]:
    # Empty tensors with the right trailing shapes, for ranks whose shard is empty.
    length, dim = dataset.max_words, model.embed_dim
    return {"index": torch.empty(0, dtype=torch.long, device=ctx.device),
            "tokens": torch.empty(0, length, dim, device=ctx.device),
            "text_mask": torch.empty(0, length, dtype=torch.long, device=ctx.device),
            "cls": torch.empty(0, dim, device=ctx.device)}


def _video_templates(model: nn.Module, dataset: Any, ctx: DistContext) -> dict[str, torch.Tensor]:
    frames, dim = dataset.max_frames, model.embed_dim
    return {"index": torch.empty(0, dtype=torch.long, device=ctx.device),
            "video": torch.empty(0, frames, dim, device=ctx.device),
            "frame_mask": torch.empty(0, frames, dtype=torch.long, device=ctx.device)}


def _gather_parts(parts: dict[str, list[torch.Tensor]], ctx: DistContext,
                  like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, chunks in parts.items():
        local = torch.cat(chunks) if chunks else like[name]
        out[name] = all_gather_variable(local, ctx).cpu()
    return out


def _assemble(dataset: Any, text: dict[str, torch.Tensor], video: dict[str, torch.Tensor],
              meta: Mapping[str, Any]) -> CorpusFeatures:
    num_videos = dataset.num_videos
    video_index = video["index"]
    if video_index.numel() != torch.unique(video_index).numel():
        raise RuntimeError("a video was encoded twice (sharding bug)")
    present = torch.zeros(num_videos, dtype=torch.bool)
    present[video_index] = True
    order = torch.argsort(video_index)  # back to dataset order
    new_row = torch.full((num_videos,), -1, dtype=torch.long)
    new_row[video_index[order]] = torch.arange(order.numel())
    all_ids = dataset.video_ids
    missing = [all_ids[j] for j in range(num_videos) if not bool(present[j])]

    text_index = text["index"]
    if text_index.numel() != len(dataset) or text_index.numel() != torch.unique(text_index).numel():
        raise RuntimeError(f"expected {len(dataset)} distinct captions, got {text_index.numel()}")
    t_order = torch.argsort(text_index)
    c2v_all = dataset.caption_to_video_tensor()[text_index[t_order]]
    keep = present[c2v_all]
    rows = t_order[keep]
    return CorpusFeatures(
        tokens=text["tokens"][rows],
        text_mask=text["text_mask"][rows],
        cls=text["cls"][rows],
        video=video["video"][order],
        frame_mask=video["frame_mask"][order],
        caption_to_video=new_row[c2v_all[keep]],
        video_ids=[all_ids[j] for j in video_index[order].tolist()],
        missing_video_ids=missing,
        meta=dict(meta),
        text_index=text_index[rows],
    )
