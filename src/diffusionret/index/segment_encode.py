"""Encode the segments of a video: decode once, image tower once per frame, temporal module per segment.

The image tower (a ViT per frame) is the dominant cost of indexing. Overlapping windows share most
of their frames (with the default stride of half a window, every frame belongs to two windows), so
encoding each window as a clip would run the tower about twice per frame and decode the video once
per window. Here:

1. :class:`~diffusionret.data.timeline.TimelineReader` decodes the video once, front to back, at the
   model's frame rate, and the image tower encodes each sampled frame once, in batches
   (:func:`encode_timeline`); only ``(n, D)`` features stay in memory, never the frames;
2. the segments are planned on the *decoded* duration (:mod:`diffusionret.index.segments`);
3. each segment takes up to ``max_frames`` of the timeline frames inside it, reduced uniformly as
   :func:`~diffusionret.data.sampling.subsample` does for a clip, and only the temporal module runs
   per segment (:func:`encode_segments`).

For a segment whose start lies on the ``1 / fps`` grid (``whole``, and ``fixed`` with window and
stride multiples of ``1 / fps``) the frames are those :func:`~diffusionret.data.decode.read_frames`
would sample for the segment as a clip, so its features equal per-clip encoding up to float rounding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from diffusionret.data.sampling import subsample
from diffusionret.index.segments import Segment

logger = logging.getLogger(__name__)

__all__ = ["EncodedTimeline", "encode_frame_batches", "encode_segments", "encode_timeline", "segment_frame_indices",
           "segment_thumbnail"]

# Slack when testing whether a sampling time lies inside a segment (times are k / fps in float64).
_EPS = 1e-6


@dataclass(frozen=True)
class EncodedTimeline:
    """Image-tower features of a video sampled at ``fps``.

    Attributes:
        features: ``(n, D)`` float32, CLIP image features of the frame displayed at ``times[i]``.
        times: ``(n,)`` float64 sampling times ``i / fps`` in seconds.
        fps: the sampling rate.
        duration: decoded duration in seconds (the end of the last frame).
        header_duration: what the container claimed, or ``None``.
        thumbnails: ``n`` JPEG images (one per sampled frame) when requested, else ``None``.
        width, height: decoded frame size in pixels (display orientation).
    """

    features: Tensor
    times: np.ndarray
    fps: float
    duration: float
    header_duration: float | None = None
    thumbnails: list[bytes] | None = None
    width: int | None = None
    height: int | None = None

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])


@torch.no_grad()
def encode_timeline(model: nn.Module, path: str | os.PathLike, *, fps: float, batch_size: int = 32,
                    thumbnails: bool = False, max_duration: float | None = None) -> EncodedTimeline:
    """Decode ``path`` once at ``fps`` and run the image tower once per sampled frame.

    Args:
        model: a ``DiffusionRet`` (``encode_frames``, ``image_size``); its device is used.
        path: the video.
        fps: the model's sampling rate (its input config).
        batch_size: frames per image-tower forward pass (also the decoding batch).
        thumbnails: keep a JPEG of every sampled frame (for per-segment thumbnails).
        max_duration: decode at most this many seconds (``None``: all).

    Returns:
        An :class:`EncodedTimeline`.

    Raises:
        VideoDecodeError: the file cannot be decoded (names the file).
    """
    from diffusionret.data.timeline import TimelineReader
    from diffusionret.index.decode_job import jpeg_thumbnail

    size = int(model.image_size)
    reader = TimelineReader(path, fps=fps, size=size, batch_size=batch_size, keep_originals=thumbnails,
                            max_duration=max_duration)
    times: list[np.ndarray] = []
    jpegs: list[bytes] | None = [] if thumbnails else None
    width = height = None

    def frames() -> Iterator[np.ndarray]:
        nonlocal width, height
        for batch in reader:
            times.append(batch.times)
            if batch.originals is not None and jpegs is not None:
                height, width = batch.originals[0].shape[:2]
                jpegs.extend(jpeg_thumbnail(frame) for frame in batch.originals)
            yield batch.frames

    features = encode_frame_batches(model, frames())
    assert reader.duration is not None  # set by a complete iteration
    return EncodedTimeline(features=features, times=np.concatenate(times), fps=float(fps),
                           duration=reader.duration, header_duration=reader.header_duration, thumbnails=jpegs,
                           width=width, height=height)


@torch.no_grad()
def encode_frame_batches(model: nn.Module, batches: Iterable[np.ndarray]) -> Tensor:
    """The image tower over batches of frames, one forward pass per batch.

    Args:
        model: a ``DiffusionRet`` (``encode_frames``, ``image_size``); its device is used.
        batches: uint8 ``(b, H, W, 3)`` RGB frames (short side the model's image size, or any size:
            :class:`~diffusionret.data.transforms.ClipTransform` resizes and crops).

    Returns:
        ``(n, D)`` float32 on the CPU, ``n`` the frames of all batches.

    Raises:
        ValueError: no frames at all.
    """
    from diffusionret.data.transforms import ClipTransform

    transform = ClipTransform(int(model.image_size))
    device = next(model.parameters()).device
    chunks = [model.encode_frames(transform(frames).to(device)[None])[0].float().cpu()  # (b, D)
              for frames in batches]
    if not chunks:
        raise ValueError("no frames to encode")
    return torch.cat(chunks)


def segment_frame_indices(times: np.ndarray, segment: Segment, max_frames: int, sampling: str = "uniform") -> list[int]:
    """Which timeline samples a segment uses: those in ``[start, end)``, reduced to ``max_frames``.

    A segment too short to contain a sampling time (shorter than ``1 / fps``, off the grid) takes
    the sample displayed at its middle (the last one at or before it), so every segment has at least
    one frame.

    Args:
        times: ``(n,)`` ascending sampling times (``n >= 1``).
        segment: the span.
        max_frames: ``T``.
        sampling: how to reduce (``uniform``/``head``/``tail``; ``reference`` reduces uniformly).

    Returns:
        ``1..T`` ascending indices into ``times``.
    """
    if len(times) == 0:
        raise ValueError("an empty timeline has no frames to pick")
    lo = int(np.searchsorted(times, segment.start - _EPS, side="left"))
    hi = int(np.searchsorted(times, segment.end - _EPS, side="left"))
    if hi <= lo:
        middle = (segment.start + segment.end) / 2
        return [int(min(len(times) - 1, max(0, np.searchsorted(times, middle + _EPS, side="right") - 1)))]
    return [lo + i for i in subsample(hi - lo, max_frames, "uniform" if sampling == "reference" else sampling)]


@torch.no_grad()
def encode_segments(model: nn.Module, timeline: EncodedTimeline, segments: Sequence[Segment], max_frames: int, *,
                    sampling: str = "uniform", batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Per-segment features: the temporal module over each segment's frames.

    Args:
        model: a ``DiffusionRet`` (``aggregate``).
        timeline: from :func:`encode_timeline`.
        segments: the spans to encode.
        max_frames: ``T``, frames per segment.
        sampling: frame reduction inside a segment.
        batch_size: segments per temporal-module pass.

    Returns:
        ``frames`` ``(S, T, D)`` float32 (zero where masked), ``frame_mask`` ``(S, T)`` bool; exactly what
        ``model.encode_video`` gives for the segment as a clip, up to float rounding.
    """
    device = next(model.parameters()).device
    dim = timeline.features.shape[1]
    gathered = torch.zeros(len(segments), max_frames, dim)
    mask = torch.zeros(len(segments), max_frames, dtype=torch.bool)
    for s, segment in enumerate(segments):
        picks = segment_frame_indices(timeline.times, segment, max_frames, sampling)
        gathered[s, :len(picks)] = timeline.features[picks]
        mask[s, :len(picks)] = True
    out = torch.zeros_like(gathered)
    for start in range(0, len(segments), batch_size):
        part = slice(start, start + batch_size)
        video = model.aggregate(gathered[part].to(device), mask[part].long().to(device)).float().cpu()
        out[part] = video * mask[part, :, None]
    return out, mask


def segment_thumbnail(timeline: EncodedTimeline, segment: Segment) -> bytes | None:
    """The JPEG of the frame shown at the segment's middle, inside the segment (``None`` without thumbnails)."""
    from diffusionret.index.segment_job import middle_sample

    if not timeline.thumbnails:
        return None
    return timeline.thumbnails[middle_sample(timeline.times, segment)]

