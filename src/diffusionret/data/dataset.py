"""One map-style dataset for every benchmark: records + decoder + sampler + transform + tokenizer.

:class:`VideoTextDataset` has one item per (video, caption) record. For evaluation it also exposes
the unique videos (first-appearance order), the caption -> video mapping (multi-caption datasets such
as MSVD or MSR-VTT's full test) and two views, :meth:`~VideoTextDataset.text_view` and
:meth:`~VideoTextDataset.video_view`, so that every video is decoded and encoded once.

Bad videos (:class:`~diffusionret.data.errors.VideoDecodeError`): with ``on_error="raise"`` the error
propagates; with ``"skip"`` the item becomes ``None`` (dropped by :func:`~diffusionret.data.collate.collate`)
and a JSON line ``{"video_id", "path", "cause"}`` is appended to ``skip_report``. A skipped video is never
replaced by zeros. :meth:`~VideoTextDataset.validate` finds bad videos up front instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusionret.data.decode import read_frames
from diffusionret.inputs import REFERENCE_INPUT
from diffusionret.data.errors import MissingVideosError, VideoDecodeError
from diffusionret.data.records import VideoTextPair, video_key
from diffusionret.data.transforms import ClipTransform, VideoTransform

logger = logging.getLogger(__name__)

__all__ = [
    "SkippedVideo",
    "TextView",
    "VideoTextDataset",
    "VideoView",
    "read_skip_report",
    "require_complete",
    "worker_init_fn",
]

Tokenizer = Callable[[Sequence[str], int], tuple[torch.Tensor, torch.Tensor]]
OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class SkippedVideo:
    """A video left out under ``on_error="skip"``."""

    video_id: str
    path: str
    cause: str


@dataclass(frozen=True)
class _Video:
    video_id: str
    path: Path
    start: float | None
    end: float | None


def _default_tokenizer(texts: Sequence[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusionret.tokenizer import tokenize  # lazy: loads the BPE vocabulary

    return tokenize(list(texts), max_words)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A seed from (seed, epoch, index): reproducible whatever the worker count or sampling order."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def worker_init_fn(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a DataLoader worker from torch's per-worker seed.

    The dataset's own augmentation does not need it (it seeds a generator per item), but third-party
    code called from a worker would otherwise share NumPy's state across workers.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class VideoTextDataset(Dataset):
    """Map-style (video, caption) dataset.

    Args:
        records: the samples, e.g. from a reader in :data:`diffusionret.data.READERS`. Records of one
            video must agree on path and clip bounds.
        tokenizer: ``(texts, max_words) -> (ids (N, L), mask (N, L))``; defaults to
            :func:`diffusionret.tokenizer.tokenize` (imported on first use).
        max_words: ``L``.
        max_frames: ``T``; videos with fewer frames are zero-padded (``frame_mask`` 0 there).
        fps, sampling: passed to :func:`~diffusionret.data.read_frames`.
        size: ``S``, the frame side.
        transform: uint8 ``(n, H, W, 3)`` -> float32 ``(n, 3, S, S)``; defaults to the reference's
            :class:`~diffusionret.data.transforms.ClipTransform` (no augmentation).
        on_error: ``"raise"`` or ``"skip"`` for videos that cannot be decoded.
        skip_report: JSON-lines file that skipped videos are appended to (any process, any worker).
        seed: base seed of per-item augmentation randomness (see :meth:`set_epoch`).
        name: label for log messages (e.g. ``"msrvtt/test"``).
    """

    def __init__(
        self,
        records: Sequence[VideoTextPair],
        *,
        tokenizer: Tokenizer | None = None,
        max_words: int = REFERENCE_INPUT.max_words,
        max_frames: int = REFERENCE_INPUT.max_frames,
        fps: float = REFERENCE_INPUT.fps,
        sampling: str = REFERENCE_INPUT.sampling,
        size: int = REFERENCE_INPUT.size,
        transform: VideoTransform | None = None,
        on_error: OnError = "raise",
        skip_report: str | os.PathLike | None = None,
        seed: int = 0,
        name: str = "dataset",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_words < 2 or max_frames < 1 or size < 1:
            raise ValueError(
                f"need max_words >= 2, max_frames >= 1, size >= 1 (got {max_words}, {max_frames}, {size})"
            )
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.max_frames = max_frames
        self.fps = fps
        self.sampling = sampling
        self.size = size
        self.transform: VideoTransform = transform if transform is not None else ClipTransform(size)
        self.on_error: OnError = on_error
        self.skip_report = Path(skip_report) if skip_report is not None else None
        self.seed = seed
        self.epoch = 0
        self.name = name
        self.skipped: list[SkippedVideo] = []  # filled by validate() (and in-process __getitem__ skips)
        self._set_records(list(records))

    # -- structure ----------------------------------------------------------------------------------

    def _set_records(self, records: list[VideoTextPair]) -> None:
        videos: dict[str, int] = {}
        self.videos: list[_Video] = []
        self.caption_to_video: list[int] = []
        self.caption_index: list[int] = []
        self.video_captions: list[list[int]] = []
        for i, record in enumerate(records):
            video = _Video(record.video_id, Path(record.video_path), record.start, record.end)
            j = videos.get(record.video_id)
            if j is None:
                j = videos[record.video_id] = len(self.videos)
                self.videos.append(video)
                self.video_captions.append([])
            elif self.videos[j] != video:
                raise ValueError(
                    f"{self.name}: records of video {record.video_id!r} disagree on file or clip "
                    f"({self.videos[j]} vs {video})"
                )
            self.caption_to_video.append(j)
            self.caption_index.append(len(self.video_captions[j]))
            self.video_captions[j].append(i)
        self.records = records
        self.video_keys = [video_key(v.video_id) for v in self.videos]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def video_ids(self) -> list[str]:
        """Unique video ids in first-appearance order (index = ``video_index``)."""
        return [v.video_id for v in self.videos]

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    @property
    def multi_caption(self) -> bool:
        """Whether some video has more than one caption (text-to-video then has several positives)."""
        return any(len(c) > 1 for c in self.video_captions)

    def caption_to_video_tensor(self) -> torch.Tensor:
        """int64 ``(N_captions,)``: the ``video_index`` of every caption (record)."""
        return torch.tensor(self.caption_to_video, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call before creating the epoch's DataLoader iterator)."""
        self.epoch = epoch

    # -- loading ------------------------------------------------------------------------------------

    def _tokenize(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.tokenizer or _default_tokenizer
        ids, mask = tokenizer([caption], self.max_words)
        return ids[0].to(torch.long), mask[0].to(torch.long)

    def _generator(self, key: int) -> torch.Generator | None:
        if isinstance(self.transform, ClipTransform):
            return None  # deterministic: no generator to build
        return torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, key))

    def load_video(
        self, video_index: int, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode, transform and pad one video.

        Returns:
            ``(frames, frame_mask)``: float32 ``(T, 3, S, S)`` (zeros after the last real frame) and
            int64 ``(T,)`` (1 for real frames).

        Raises:
            VideoDecodeError: whatever ``on_error`` says (callers apply the policy).
        """
        video = self.videos[video_index]
        raw, _ = read_frames(
            video.path,
            fps=self.fps,
            max_frames=self.max_frames,
            start=video.start,
            end=video.end,
            size=self.size,
            sampling=self.sampling,
        )
        clip = self.transform(raw, generator)
        n = clip.shape[0]
        frames = torch.zeros(self.max_frames, 3, self.size, self.size, dtype=torch.float32)
        frames[:n] = clip
        frame_mask = torch.zeros(self.max_frames, dtype=torch.long)
        frame_mask[:n] = 1
        return frames, frame_mask

    def _skip(self, video_index: int, error: VideoDecodeError) -> None:
        video = self.videos[video_index]
        skipped = SkippedVideo(video.video_id, str(video.path), error.cause)
        self.skipped.append(skipped)
        logger.warning("%s: skipping video %s: %s", self.name, video.video_id, error)
        if self.skip_report is not None:
            _append_report(self.skip_report, skipped)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """One sample, or ``None`` when its video was skipped (``on_error="skip"``).

        Returns:
            ``{"text_ids" (L,), "text_mask" (L,), "frames" (T, 3, S, S), "frame_mask" (T,), "video_id",
            "video_key", "video_index", "index", "caption_index"}``.
        """
        record = self.records[index]
        j = self.caption_to_video[index]
        try:
            frames, frame_mask = self.load_video(j, generator=self._generator(index))
        except VideoDecodeError as error:
            if self.on_error == "raise":
                raise
            self._skip(j, error)
            return None
        text_ids, text_mask = self._tokenize(record.caption)
        return {
            "text_ids": text_ids,
            "text_mask": text_mask,
            "frames": frames,
            "frame_mask": frame_mask,
            "video_id": record.video_id,
            "video_key": self.video_keys[j],
            "video_index": j,
            "index": index,
            "caption_index": self.caption_index[index],
        }

    # -- evaluation helpers -------------------------------------------------------------------------

    def text_view(self) -> TextView:
        """Text-only items (one per caption): no decoding."""
        return TextView(self)

    def video_view(self) -> VideoView:
        """Video-only items (one per unique video): each video decoded once."""
        return VideoView(self)

    def validate(self, *, workers: int = 0, deep: bool = False) -> list[SkippedVideo]:
        """Check every unique video up front; drop bad ones (``"skip"``) or raise (``"raise"``).

        Args:
            workers: threads used to probe videos (0: in this thread).
            deep: decode the frames the dataset would use instead of only the first one (catches
                truncated files, costs a full pass of decoding).

        Returns:
            the videos dropped by this call (also appended to :attr:`skipped` and the report file).

        Raises:
            VideoDecodeError: the first bad video, when ``on_error == "raise"``.
        """
        from diffusionret.data.check import inspect_videos

        statuses = inspect_videos(
            [(v.path, v.start, v.end) for v in self.videos],
            workers=workers,
            read_kwargs=self._read_kwargs() if deep else None,
        )
        bad = [(j, s) for j, s in enumerate(statuses) if s.error is not None]
        if not bad:
            return []
        if self.on_error == "raise":
            j, status = bad[0]
            raise VideoDecodeError(self.videos[j].path, f"{status.error} ({len(bad)} bad video(s) in {self.name})")
        dropped = []
        for j, status in bad:
            error = VideoDecodeError(self.videos[j].path, status.error or "unknown error")
            self._skip(j, error)
            dropped.append(self.skipped[-1])
        bad_ids = {self.videos[j].video_id for j, _ in bad}
        self._set_records([r for r in self.records if r.video_id not in bad_ids])
        logger.warning("%s: dropped %d bad video(s); %d records remain", self.name, len(bad), len(self.records))
        return dropped

    def _read_kwargs(self) -> dict[str, Any]:
        return {"fps": self.fps, "max_frames": self.max_frames, "size": None, "sampling": self.sampling}


def _append_report(path: Path, skipped: SkippedVideo) -> None:
    """Append one JSON line; a single small ``write`` on an ``O_APPEND`` file does not interleave
    between DataLoader workers or ranks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"video_id": skipped.video_id, "path": skipped.path, "cause": skipped.cause}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_skip_report(path: str | os.PathLike) -> list[SkippedVideo]:
    """The distinct videos listed in a skip report (missing file: none)."""
    path = Path(path)
    if not path.exists():
        return []
    seen: dict[str, SkippedVideo] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            seen.setdefault(row["video_id"], SkippedVideo(row["video_id"], row["path"], row["cause"]))
    return list(seen.values())


class TextView(Dataset):
    """Captions of a :class:`VideoTextDataset` without their videos (for encoding texts once)."""

    def __init__(self, dataset: VideoTextDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"text_ids" (L,), "text_mask" (L,), "video_id", "video_key", "video_index", "index",
        "caption_index"}``."""
        ds = self.dataset
        j = ds.caption_to_video[index]
        text_ids, text_mask = ds._tokenize(ds.records[index].caption)
        return {"text_ids": text_ids, "text_mask": text_mask, **_video_fields(ds, j), "index": index,
                "caption_index": ds.caption_index[index]}


def _video_fields(ds: "VideoTextDataset", video_index: int) -> dict[str, Any]:
    """The identity of video ``video_index`` in an item: ``video_id``, ``video_key``, ``video_index``."""
    return {"video_id": ds.videos[video_index].video_id, "video_key": ds.video_keys[video_index],
            "video_index": video_index}


class VideoView(Dataset):
    """Unique videos of a :class:`VideoTextDataset` (for encoding each video once)."""

    def __init__(self, dataset: VideoTextDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_videos

    def __getitem__(self, video_index: int) -> dict[str, Any] | None:
        """``{"frames" (T, 3, S, S), "frame_mask" (T,), "video_id", "video_key", "video_index"}``, or
        ``None`` when skipped."""
        ds = self.dataset
        try:
            # Keyed past the caption indices so a video's draw differs from any caption item's.
            generator = ds._generator(len(ds) + video_index)
            frames, frame_mask = ds.load_video(video_index, generator=generator)
        except VideoDecodeError as error:
            if ds.on_error == "raise":
                raise
            ds._skip(video_index, error)
            return None
        return {"frames": frames, "frame_mask": frame_mask, **_video_fields(ds, video_index)}


def require_complete(total: int, missing: Sequence[str], *, allow_missing: bool = False) -> int:
    """Refuse to evaluate over a test set that lost videos, unless explicitly allowed.

    Args:
        total: videos the test split should have.
        missing: ids of videos that were skipped (from :attr:`VideoTextDataset.skipped`, a skip report,
            or the ``video_index`` values that never came out of the loader).
        allow_missing: the user's explicit opt-in.

    Returns:
        the number of missing videos (0 when complete).

    Raises:
        MissingVideosError: some videos are missing and ``allow_missing`` is false.
    """
    missing = sorted(set(missing))
    if missing and not allow_missing:
        raise MissingVideosError(missing, total)
    if missing:
        logger.warning(
            "evaluating without %d of %d test videos (allowed explicitly); metrics are not comparable "
            "with the full test set", len(missing), total,
        )
    return len(missing)

