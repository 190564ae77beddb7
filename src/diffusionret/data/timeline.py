"""Decode a whole video once at a fixed sampling rate, streaming (for segment-level indexing).

:func:`read_frames` picks up to ``T`` frames of *one* clip; indexing a long video as overlapping
segments would call it once per segment and decode (and encode) most frames twice. A
:class:`TimelineReader` instead walks the stream once, front to back, and yields the frames displayed
at the times ``k / fps`` (``k = 0, 1, ...``), in batches, so memory holds one batch, never the whole
video. The frame displayed at time ``t`` is chosen exactly as :func:`read_frames` chooses it (the last
frame whose presentation time is ``<= t``, with the same tolerance), and frames are converted with
the same resize, so a segment built from timeline frames sees the pixels ``read_frames`` would give
for that segment when its start lies on the ``1 / fps`` grid.

The timeline ends where the decoded stream ends (the end of the last frame), not where the header
says: files whose duration header disagrees with their frames are common (cut downloads, muxer
bugs), and the stream is the truth. :attr:`TimelineReader.duration` is set once the iteration ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from diffusionret.data.decode import DecodeStats
# The decoder's stream handling (time origin, AVI frame counting, timestamp tolerance) and its RGB
# conversion, shared rather than duplicated so that timeline frames are read_frames' frames.
from diffusionret.data.decode import _match_size, _to_rgb, _VideoSource  # noqa: PLC2701
from diffusionret.data.errors import VideoDecodeError
from diffusionret.data.sampling import to_fraction

logger = logging.getLogger(__name__)

__all__ = ["TimelineBatch", "TimelineReader"]

# Warn when the decoded stream and the header disagree by more than this (seconds, and fraction).
_HEADER_SLACK_S = 1.0
_HEADER_SLACK_FRACTION = 0.05


@dataclass(frozen=True)
class TimelineBatch:
    """Consecutive timeline frames.

    Attributes:
        frames: uint8 ``(b, H, W, 3)`` RGB, short side resized to ``size`` (display orientation).
        times: float64 ``(b,)``, the sampling times ``k / fps`` (seconds) the frames are displayed at.
        first: ``k`` of the first frame (its index in the whole timeline).
        originals: ``b`` uint8 ``(H0, W0, 3)`` frames at the decoded size when the reader keeps them
            (for thumbnails), else ``None``.
    """

    frames: np.ndarray
    times: np.ndarray
    first: int
    originals: list[np.ndarray] | None = None


class TimelineReader:
    """Iterate over the frames displayed at ``0, 1/fps, 2/fps, ...`` until the stream ends.

    Args:
        path: the video.
        fps: sampling rate (samples per second of video time).
        size: short-side resize of the yielded frames (``None``: decoded size).
        batch_size: frames per yielded :class:`TimelineBatch`.
        keep_originals: also yield each frame at its decoded size (for thumbnails).
        max_duration: stop after this many seconds (a guard against corrupt timestamps that jump
            hours ahead); ``None``: no limit.
        progress: called with the presentation time (seconds) of each decoded frame, before the
            samples it shows are made (for a decode budget that follows progress); ``None``: none.

    After a complete iteration, :attr:`duration` (seconds, the end of the last decoded frame),
    :attr:`header_duration` (what the container said, or ``None``), :attr:`num_samples` and
    :attr:`capped` (whether ``max_duration`` stopped it with more of the stream to come) are set.

    Raises (while iterating):
        VideoDecodeError: the file cannot be opened, has no decodable frame, or decoding fails.
    """

    def __init__(self, path: str | os.PathLike, *, fps: float, size: int | None, batch_size: int = 32,
                 keep_originals: bool = False, max_duration: float | None = None,
                 stats: DecodeStats | None = None, progress: Callable[[float], None] | None = None) -> None:
        if fps <= 0 or batch_size <= 0:
            raise ValueError(f"fps and batch_size must be positive, got {fps}, {batch_size}")
        self.path = path
        self.rate = to_fraction(fps)
        self.size = size
        self.batch_size = batch_size
        self.keep_originals = keep_originals
        self.max_duration = max_duration
        self.stats = stats
        self.progress = progress
        self.duration: float | None = None
        self.header_duration: float | None = None
        self.num_samples = 0
        self.capped = False

    def __iter__(self) -> Iterator[TimelineBatch]:
        from av.video.reformatter import VideoReformatter

        reformatter = VideoReformatter()
        frames: list[np.ndarray] = []
        originals: list[np.ndarray] = []
        times: list[float] = []
        first = 0
        k = 0
        # (decoded, frame, original): holds the decoded object itself; an id() could be reused once it is freed
        converted: tuple[Any, np.ndarray, np.ndarray | None] | None = None

        def emit(decoded: Any) -> None:
            nonlocal converted
            if converted is None or converted[0] is not decoded:
                image = _to_rgb(decoded.frame, self.size, reformatter)
                original = _to_rgb(decoded.frame, None, reformatter) if self.keep_originals else None
                converted = (decoded, image, original)
            frames.append(converted[1])
            if self.keep_originals:
                originals.append(converted[2])  # type: ignore[arg-type]
            times.append(float(Fraction(k) / self.rate))

        def flush() -> TimelineBatch:
            nonlocal frames, originals, times, first
            shapes = {f.shape for f in frames}
            stacked = np.stack(frames) if len(shapes) == 1 else np.stack([_match_size(f, frames[0].shape) for f in frames])
            batch = TimelineBatch(stacked, np.asarray(times, dtype=np.float64), first,
                                  list(originals) if self.keep_originals else None)
            first += len(frames)
            frames, originals, times = [], [], []
            return batch

        limit = None if self.max_duration is None else to_fraction(self.max_duration)
        with _VideoSource(self.path, self.stats) as src:
            self.header_duration = float(src.duration) if src.duration else None
            src.rewind()
            previous = None
            capped = False  # stopped at max_duration with more stream to come
            for decoded in src._decode():
                if self.progress is not None:
                    self.progress(float(decoded.time))
                holder = previous if previous is not None else decoded  # targets before the first frame
                # Target k belongs to the last frame shown at or before it (read_frames' rule).
                while Fraction(k) / self.rate + src.tolerance < decoded.time and not _past(k, self.rate, limit):
                    emit(holder)
                    k += 1
                    if len(frames) >= self.batch_size:
                        yield flush()
                previous = decoded
                if _past(k, self.rate, limit):
                    capped = True
                    break
            if previous is None:
                raise VideoDecodeError(src.path, "no decodable video frames")
            end = limit if capped else previous.end
            if limit is not None:
                end = min(end, limit)
            while Fraction(k) / self.rate < end or k == 0:
                emit(previous)
                k += 1
                if len(frames) >= self.batch_size:
                    yield flush()
            if frames:
                yield flush()
            self.duration = float(end)
            self.num_samples = k
            self.capped = capped
            if not capped:
                self._check_header(src.path)

    def _check_header(self, path: Any) -> None:
        header, decoded = self.header_duration, self.duration
        if header is None or decoded is None:
            return
        if abs(header - decoded) > max(_HEADER_SLACK_S, _HEADER_SLACK_FRACTION * decoded):
            logger.warning("%s: the header says %.2f s but the frames decode to %.2f s; using %.2f s",
                           path, header, decoded, decoded)


def _past(k: int, rate: Fraction, limit: Fraction | None) -> bool:
    return limit is not None and Fraction(k) / rate >= limit
