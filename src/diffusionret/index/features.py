"""What an index stores per video, and the contract of the component that computes it.

The index does not decode or encode anything itself: a :class:`FeatureExtractor` turns paths into
:class:`VideoFeatures`. :class:`diffusionret.index.encode.ModelVideoEncoder` is the real one (PyAV +
the DiffusionRet video tower); tests substitute a deterministic fake, so the storage, resume and
search logic are tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced (or may query) an index.

    Attributes:
        model_id: sha256 hex digest over the architecture config and every weight tensor
            (see :func:`diffusionret.index.identity.model_identity`).
        config: the architecture config as a plain dict (recorded for humans and for ``index info``).
        path: the checkpoint the model was loaded from, if known; ``search``/``serve`` reload it by
            default.
    """

    model_id: str
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


@dataclass(frozen=True)
class VideoFeatures:
    """Features and facts for one video.

    Attributes:
        frames: (T, D) per-frame features after the temporal module (any float dtype; stored fp16).
        frame_mask: (T,) bool, True for real frames (short videos are padded to T).
        duration: seconds, or ``None`` when the container does not say.
        thumbnail: a JPEG image, or ``None``.
        width, height: frame size in pixels, when known.
    """

    frames: Tensor
    frame_mask: Tensor
    duration: float | None = None
    thumbnail: bytes | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class SegmentedFeatures:
    """Features and facts of one video indexed in segments (one feature row per segment).

    Attributes:
        spans: S ``(start, end)`` in seconds, ascending by start.
        frames: (S, T, D) per-frame features of each segment after the temporal module.
        frame_mask: (S, T) bool, True for real frames.
        duration: seconds (the decoded duration the segments were planned on).
        thumbnails: S JPEG images (or ``None`` entries).
        width, height: frame size in pixels, when known.
    """

    spans: list[tuple[float, float]]
    frames: Tensor
    frame_mask: Tensor
    duration: float | None = None
    thumbnails: list[bytes | None] = field(default_factory=list)
    width: int | None = None
    height: int | None = None

    def rows(self) -> list[VideoFeatures]:
        """One :class:`VideoFeatures` per segment (what a shard stores per row)."""
        thumbs = self.thumbnails or [None] * len(self.spans)
        return [VideoFeatures(frames=self.frames[s], frame_mask=self.frame_mask[s], duration=self.duration,
                              thumbnail=thumbs[s], width=self.width, height=self.height)
                for s in range(len(self.spans))]


@dataclass(frozen=True)
class ExtractionFailure:
    """A video that could not be decoded; recorded so that unchanged broken files are not retried."""

    error: str


class FeatureExtractor(Protocol):
    """Turns video files into :class:`VideoFeatures`.

    ``identity`` names the model; ``settings`` are the decoding parameters (frames, fps, image size,
    ...), recorded in the index so that an update encodes new files exactly like the old ones;
    ``num_frames`` and ``embed_dim`` fix the stored tensor shapes (T, D).

    An extractor may also define ``frame_weights(frames (N, T, D) float16, frame_mask (N, T) bool)
    -> (N, T) float32 | None``: the WTI head's video-side weights of the *stored* features, kept in
    the index so that queries skip the weight MLP (see :func:`extractor_frame_weights`).

    To index videos in segments (``index build --segments``), an extractor also defines
    ``extract_segments(paths, config: SegmentConfig) -> Iterator[SegmentedFeatures | VideoFeatures |
    ExtractionFailure]`` (one result per path, in order; a :class:`VideoFeatures` is stored as one
    whole-video row, as ``auto`` does for short files).
    """

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def settings(self) -> dict[str, Any]: ...

    @property
    def num_frames(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    def extract(self, paths: Sequence[Path]) -> Iterator[VideoFeatures | ExtractionFailure]:
        """One result per path, in order (lazily, so the caller can show progress)."""
        ...


def pool_frames(frames: Tensor, frame_mask: Tensor) -> Tensor:
    """The first-stage video embedding: the masked mean of L2-normalised frames, re-normalised.

    The WTI head compares *normalised* word and frame features (docs/reference.md §1.4), so averaging the
    normalised frames keeps every frame's vote equal, and the cosine between this vector and the
    normalised text ``cls`` is a cheap, monotone-ish proxy for the full token interaction.

    Args:
        frames: (N, T, D) frame features.
        frame_mask: (N, T) bool or 0/1, True for real frames.

    Returns:
        (N, D) float32, unit norm (all-zero rows stay zero: a video without a real frame never wins).
    """
    frames = F.normalize(frames.float(), dim=-1)
    weights = frame_mask.to(frames.dtype).unsqueeze(-1)  # (N, T, 1)
    summed = (frames * weights).sum(dim=1)
    return F.normalize(summed, dim=-1)


def stack_features(items: Sequence[VideoFeatures], num_frames: int, embed_dim: int) -> tuple[Tensor, Tensor]:
    """Stack per-video features into ``(frames (N, T, D) fp16, frame_mask (N, T) bool)``.

    Raises:
        ValueError: a video's features do not have shape (T, D) / (T,).
    """
    frames = torch.zeros(len(items), num_frames, embed_dim, dtype=torch.float16)
    mask = torch.zeros(len(items), num_frames, dtype=torch.bool)
    for row, item in enumerate(items):
        if tuple(item.frames.shape) != (num_frames, embed_dim) or tuple(item.frame_mask.shape) != (num_frames,):
            raise ValueError(
                f"features of shape {tuple(item.frames.shape)} / mask {tuple(item.frame_mask.shape)}; "
                f"the index stores ({num_frames}, {embed_dim}) / ({num_frames},)"
            )
        frames[row] = item.frames.detach().to("cpu", torch.float16)
        mask[row] = item.frame_mask.detach().to("cpu", torch.bool)
    return frames, mask


def extractor_frame_weights(extractor: Any, frames: Tensor, frame_mask: Tensor) -> Tensor | None:
    """The extractor's frame weights for stored features, or ``None`` when it does not provide them.

    Args:
        frames: (N, T, D) float16, as stored; frame_mask: (N, T) bool.

    Returns:
        (N, T) float32 on the CPU, or ``None``.

    Raises:
        ValueError: the extractor returned weights of the wrong shape.
    """
    compute = getattr(extractor, "frame_weights", None)
    if compute is None or frames.shape[0] == 0:
        return None
    weights = compute(frames, frame_mask)
    if weights is None:
        return None
    if tuple(weights.shape) != tuple(frame_mask.shape):
        raise ValueError(f"frame weights of shape {tuple(weights.shape)} for a frame mask {tuple(frame_mask.shape)}")
    return weights.detach().to("cpu", torch.float32)
