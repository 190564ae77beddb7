"""The decoding half of indexing one video in segments, as a job for an isolated worker (no torch here).

Segmenting a video decodes all of it (:class:`~diffusionret.data.timeline.TimelineReader`, one frame
per ``1 / fps``) and, in ``shots`` mode, runs PySceneDetect over it: a hostile file can hang or
exhaust memory there as easily as in :func:`~diffusionret.index.decode_job.decode_for_index`, so
:class:`~diffusionret.index.encode.ModelVideoEncoder` runs :func:`decode_for_segments` in the same
:class:`~diffusionret.data.isolate.IsolatedPool` workers, under the same memory budget and a time
budget that follows its progress (below).

A long video's frames are too many to send back through a pipe in one reply (and to hold in a
worker under its memory limit), so the worker streams them into a scratch folder the parent chose
(``frames.u8``: raw uint8 frames, each stored once even when shown at several sampling times) and
returns only the layout, the times, the planned segments and their thumbnails. The parent encodes
the frames from that file (:func:`stored_batches`) and deletes the folder. A job that fails or is
killed leaves at most a partial file there, which the parent deletes without reading it.

Decoding a whole recording takes time in proportion to its length, so a flat time budget would fail
long videos: the timeline job reports the media it has decoded (:class:`MediaMeter`) and the pool
judges it by its progress (:class:`~diffusionret.data.isolate.JobWatch`). The checks of a clip decode
that come first report nothing, so they must finish within the timeout, as a clip must. A clip decode
(short videos in ``auto`` mode) reports nothing and keeps the flat budget.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from diffusionret.index.decode_job import DecodedVideo, DecodeRequest, decode_for_index, jpeg_thumbnail
from diffusionret.index.segments import AUTO_WHOLE_FACTOR, Segment, SegmentConfig, plan_segments

logger = logging.getLogger(__name__)

__all__ = ["MAX_TIMELINE_S", "DecodedTimeline", "MediaMeter", "SegmentRequest", "decode_any", "decode_for_segments",
           "middle_sample", "square_crop", "stored_batches"]

# A video whose frames run past this many seconds is refused rather than indexed: real recordings
# that long are rare, and a timestamp that jumps years ahead (a corrupt or hostile file) would
# otherwise make the timeline repeat one frame for every 1 / fps of the gap.
MAX_TIMELINE_S = 24 * 3600.0
FRAMES_NAME = "frames.u8"
THUMBS_NAME = "thumbs.jpg"
# Slack when locating a segment's middle among sampling times (times are k / fps in float64).
_EPS = 1e-6
# Media seconds one decoded frame may earn the speed floor: a frame's timestamp that jumps ahead is no
# media decoded (else a file claiming a day-long gap would earn a day of decoding time). Real frames
# last far less; a slideshow's long frames still earn this much each, and cost next to nothing to decode.
MAX_FRAME_CREDIT_S = 10.0

Progress = Callable[[float], None]


class MediaMeter:
    """Seconds of media decoded, over one or more passes through a video, for a progress budget.

    Call it with the time of each decoded frame (seconds into the video); it adds the step from the
    furthest time reached in the current pass, at most :data:`MAX_FRAME_CREDIT_S` (times that go back
    earn nothing) and hands the running total to ``report``. Times past ``limit_s`` (the timeline's
    cap) earn nothing either, so a pass earns at most that. :meth:`next_pass` starts another pass
    from time 0 (shot detection and the timeline each read the whole file: both count).
    """

    def __init__(self, report: Progress | None, max_step_s: float = MAX_FRAME_CREDIT_S,
                 limit_s: float = MAX_TIMELINE_S) -> None:
        self._report = report
        self._max_step_s = max_step_s
        self._limit_s = limit_s
        self.total = 0.0
        self._reached = 0.0

    def __call__(self, time_s: float) -> None:
        time_s = min(time_s, self._limit_s)
        if time_s > self._reached:
            self.total += min(time_s - self._reached, self._max_step_s)
            self._reached = time_s
            if self._report is not None:
                self._report(self.total)

    def next_pass(self) -> None:
        self._reached = 0.0


@dataclass(frozen=True)
class SegmentRequest:
    """What to decode for one video indexed in segments.

    Attributes:
        clip: the file and the index's sampling settings (frames per segment, fps, image size).
        config: a resolved segmentation (:meth:`SegmentConfig.resolved`).
        workdir: a folder the worker may create and fill (the parent deletes it).
        batch_size: timeline frames per batch (the parent's image-tower batch).
        max_duration: refuse a video whose frames run past this many seconds.
    """

    clip: DecodeRequest
    config: SegmentConfig
    workdir: str
    batch_size: int = 32
    max_duration: float = MAX_TIMELINE_S


@dataclass(frozen=True)
class _StoredTimeline:
    """The timeline frames a worker stored in its scratch folder.

    Attributes:
        frames_path: raw uint8 frames, one after the other, each ``(H, W, 3)`` of ``shapes[i]``.
        shapes: ``(H, W)`` of each stored frame, in file order.
        rows: ``(n,)`` int64, the stored frame shown at sampling time ``times[k]``.
        times: ``(n,)`` float64 sampling times ``k / fps`` (seconds).
        duration: decoded duration in seconds (the end of the last frame; the segments end there).
        header_duration: what the container claimed, or ``None``.
    """

    frames_path: str
    shapes: list[tuple[int, int]]
    rows: np.ndarray
    times: np.ndarray
    duration: float
    header_duration: float | None


@dataclass(frozen=True)
class DecodedTimeline(_StoredTimeline):
    """A video decoded along its timeline, with its segments planned (the worker's reply).

    Attributes (besides the stored frames' of :class:`_StoredTimeline`):
        spans: the planned segments ``(start, end)`` in seconds.
        thumbnails: one JPEG per span (the frame shown at its middle).
        width, height: display size of the video.
        batch_size: timeline frames per batch; every batch's frames share one size.
    """

    spans: list[tuple[float, float]]
    thumbnails: list[bytes | None]
    width: int
    height: int
    batch_size: int

    @property
    def num_samples(self) -> int:
        return len(self.times)


def decode_for_segments(request: SegmentRequest, progress: Progress | None = None) -> DecodedVideo | DecodedTimeline:
    """Decode one video for segment indexing; raises on any problem (the pool reports it per file).

    In ``auto`` mode a video no longer than :data:`AUTO_WHOLE_FACTOR` windows (by
    :func:`~diffusionret.data.decode.probe_video`'s duration) is decoded as one clip, exactly as
    :func:`decode_for_index` decodes it (a :class:`DecodedVideo`); every other video is decoded along
    its timeline into ``request.workdir`` (a :class:`DecodedTimeline`), after passing the checks of a
    clip decode (so a file indexed whole and one indexed in segments fail alike, e.g. a truncated one).

    ``progress`` (a :class:`~diffusionret.data.isolate.ProgressReporter`) is told the seconds of media
    decoded along the timeline (and by shot detection), never during a clip decode.
    """
    from diffusionret.data.decode import probe_video, read_frames

    config = request.config
    if config.window is None:
        raise ValueError("resolve the segment config against the model's trained span first")
    info = probe_video(request.clip.path)
    if config.mode == "auto" and info.duration <= AUTO_WHOLE_FACTOR * config.window:
        return decode_for_index(request.clip)
    clip = request.clip
    read_frames(clip.path, fps=clip.fps, max_frames=clip.max_frames, size=clip.size, sampling=clip.sampling)
    meter = MediaMeter(progress, limit_s=request.max_duration)
    cuts = None
    if config.mode == "shots":
        from diffusionret.index.shots import detect_cuts

        cuts = detect_cuts(request.clip.path, detector=config.shot_detector, threshold=config.shot_threshold,
                           progress=meter, max_duration=request.max_duration)
        meter.next_pass()
    timeline = _write_timeline(request, meter)
    spans = plan_segments(timeline.duration, config, cuts)
    stored = {f.name: getattr(timeline, f.name) for f in fields(_StoredTimeline)}
    return DecodedTimeline(
        **stored, spans=[(s.start, s.end) for s in spans], thumbnails=timeline.thumbnails(spans),
        width=int(info.width), height=int(info.height), batch_size=request.batch_size)


@dataclass(frozen=True)
class _Written(_StoredTimeline):
    """What :func:`_write_timeline` leaves in the scratch folder: the frames, and a JPEG per shown frame."""

    thumbs_path: str
    thumb_spans: list[tuple[int, int]]  # (offset, length) in the thumbnail file of each sample's JPEG

    def thumbnails(self, spans: list[Segment]) -> list[bytes | None]:
        with open(self.thumbs_path, "rb") as handle:
            out: list[bytes | None] = []
            for segment in spans:
                offset, length = self.thumb_spans[middle_sample(self.times, segment)]
                handle.seek(offset)
                out.append(handle.read(length))
        return out


def _write_timeline(request: SegmentRequest, progress: Progress | None = None) -> _Written:
    """Stream the timeline frames (square-cropped, each distinct frame once) and a JPEG per distinct
    shown frame into ``request.workdir``."""
    from diffusionret.data.errors import VideoDecodeError
    from diffusionret.data.timeline import TimelineReader

    path, size = request.clip.path, request.clip.size
    workdir = Path(request.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    frames_path, thumbs_path = workdir / FRAMES_NAME, workdir / THUMBS_NAME
    reader = TimelineReader(path, fps=request.clip.fps, size=size, batch_size=request.batch_size,
                            keep_originals=True, max_duration=request.max_duration, progress=progress)
    shapes: list[tuple[int, int]] = []
    rows: list[int] = []
    times: list[np.ndarray] = []
    thumb_spans: list[tuple[int, int]] = []
    last_frame: np.ndarray | None = None
    last_original: np.ndarray | None = None
    offset = 0
    with open(frames_path, "wb") as frames_out, open(thumbs_path, "wb") as thumbs_out:
        for batch in reader:
            frames = square_crop(batch.frames, size)
            assert batch.originals is not None
            for frame, original in zip(frames, batch.originals, strict=True):
                # Samples in a gap between decoded frames show the same frame: stored once, so a file
                # whose timestamps jump costs an index entry per sample, not a frame.
                if last_frame is None or not _same(frame, last_frame):
                    frames_out.write(np.ascontiguousarray(frame).tobytes())
                    shapes.append((int(frame.shape[0]), int(frame.shape[1])))
                    last_frame = frame
                rows.append(len(shapes) - 1)
                if last_original is None or not _same(original, last_original):
                    jpeg = jpeg_thumbnail(original)
                    thumbs_out.write(jpeg)
                    thumb_spans.append((offset, len(jpeg)))
                    offset += len(jpeg)
                    last_original = original
                else:
                    thumb_spans.append(thumb_spans[-1])
            times.append(batch.times)
    assert reader.duration is not None  # set by a complete iteration
    if reader.capped:
        limit = (f"{request.max_duration / 3600:g} h" if request.max_duration >= 3600
                 else f"{request.max_duration:g} s")
        raise VideoDecodeError(path, f"its frames run past {limit} (a timestamp that jumps ahead, or a recording "
                                     "too long to index in one piece); not indexed")
    return _Written(str(frames_path), shapes, np.asarray(rows, dtype=np.int64), np.concatenate(times),
                    float(reader.duration), reader.header_duration, str(thumbs_path), thumb_spans)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a is b or (a.shape == b.shape and np.array_equal(a, b))


def square_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size x size`` crop that :class:`~diffusionret.data.transforms.ClipTransform` takes.

    For frames whose short side is already ``size`` (what the timeline reader yields) the transform
    does not resize and crops at ``round((side - size) / 2)``; cropping here first keeps only the
    pixels the model sees (less to store) and leaves the transform's output unchanged. Frames of
    another size are returned as they are (the transform resizes them).

    Args:
        frames: uint8 ``(b, H, W, 3)``.
    """
    height, width = frames.shape[1:3]
    if min(height, width) != size:
        return frames
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return frames[:, top:top + size, left:left + size]


def middle_sample(times: np.ndarray, segment: Segment) -> int:
    """The sample shown at the segment's middle (the last one at or before it), clamped to ``times``."""
    middle = (segment.start + segment.end) / 2
    i = int(np.searchsorted(times, middle + _EPS, side="right")) - 1
    return min(max(i, 0), len(times) - 1)


def stored_batches(decoded: DecodedTimeline) -> Iterator[np.ndarray]:
    """The timeline frames back from the worker's file, in the worker's batches.

    Yields:
        uint8 ``(b, H, W, 3)``, ``b <= decoded.batch_size``, one per batch of sampling times.

    Raises:
        ValueError: the file does not hold exactly the frames the layout describes.
    """
    sizes = [h * w * 3 for h, w in decoded.shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    actual = os.path.getsize(decoded.frames_path)
    if actual != int(offsets[-1]):
        raise ValueError(f"the timeline frames file holds {actual} bytes, not the {int(offsets[-1])} described")
    if len(decoded.rows) != decoded.num_samples or len(decoded.rows) == 0 or \
            int(decoded.rows.min()) < 0 or int(decoded.rows.max()) >= len(sizes):
        raise ValueError("the timeline's sample rows do not match its stored frames")
    if actual == 0:
        return
    data = np.memmap(decoded.frames_path, dtype=np.uint8, mode="r")
    try:
        for start in range(0, decoded.num_samples, decoded.batch_size):
            picks = decoded.rows[start:start + decoded.batch_size]
            yield np.stack([np.asarray(data[offsets[r]:offsets[r + 1]]).reshape(*decoded.shapes[r], 3)
                            for r in picks.tolist()])
    finally:
        del data


def decode_any(request: DecodeRequest | SegmentRequest,
               progress: Progress | None = None) -> DecodedVideo | DecodedTimeline:
    """The index's decode job: a clip (:func:`decode_for_index`, flat budget: no progress reported) or
    a segmented video (:func:`decode_for_segments`), so one pool of workers serves both."""
    if isinstance(request, SegmentRequest):
        return decode_for_segments(request, progress)
    return decode_for_index(request)
