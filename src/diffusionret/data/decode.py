"""Video decoding with PyAV: pick frames by presentation time, seeking when it pays off.

:func:`read_frames` is the one entry point the dataset uses. It works in *video time*: seconds from
the first frame of the video stream (the stream's ``start_time``), so ``start``/``end`` of an annotation
and the returned timestamps mean the same thing for every container.

For each target time the decoder returns the frame that is *displayed* at that time, i.e. the last
frame whose presentation timestamp is ``<= t`` (with a 0.5 ms tolerance for containers that round
timestamps to milliseconds). Before each target it decides whether to keep decoding forward or to
seek: it seeks when a keyframe lies between the current position and the target (from the container's
index when there is one, otherwise when the gap exceeds :data:`SEEK_GAP_S`), so a handful of frames
from a long video costs a handful of GOPs, while dense sampling decodes sequentially.

This module depends on PyAV, NumPy and Pillow only (no torch), so preprocessing workers stay light.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from diffusionret.data.errors import VideoDecodeError
from diffusionret.data.sampling import SAMPLING_MODES, reference_frame_indices, sample_times
from diffusionret.inputs import REFERENCE_INPUT

logger = logging.getLogger(__name__)

__all__ = [
    "DecodeStats",
    "VideoInfo",
    "benchmark_decode",
    "decode_all_frames",
    "probe_video",
    "read_frames",
    "resize_short_side",
]

# Without a keyframe index, seek when the next target is more than this many seconds ahead: typical
# GOPs are 0.5-10 s, and decoding 2 s of frames costs about as much as one seek + GOP restart.
SEEK_GAP_S = 2.0
# A frame whose timestamp is at most this much after a target still counts as displayed at the target:
# Matroska/WebM store millisecond timestamps rounded to the nearest millisecond.
_PTS_TOLERANCE = Fraction(1, 2000)
# A container duration more than this beyond the end of its index is checked by decoding the last
# GOP: headers can claim anything (136 years in a 5 KB file), the index lists packets that exist.
_DURATION_CHECK_SLACK_S = 30.0
# Frames above this many pixels are refused before decoding (8192 x 8192; 8K UHD is 33 Mpixels):
# a header claiming 65535 x 65535 would have the decoder allocate gigabytes per frame.
MAX_FRAME_PIXELS = 8192 * 8192


@dataclass
class DecodeStats:
    """Counters filled by :func:`read_frames` (for tests and benchmarks)."""

    frames_decoded: int = 0
    seeks: int = 0


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a video.

    Attributes:
        path: the file.
        width, height: display size in pixels (after applying ``rotation``).
        rotation: counter-clockwise rotation in degrees (multiple of 90) applied to decoded frames
            for display, from the container's display matrix.
        avg_fps: average frame rate of the video stream.
        num_frames: frame count stored in the container (0 when the container does not store one).
        duration: duration of the video stream in seconds.
        codec: name of the video codec.
        num_keyframes: keyframes in the container's index (0 when it has no index).
    """

    path: Path
    width: int
    height: int
    rotation: int
    avg_fps: float
    num_frames: int
    duration: float
    codec: str
    num_keyframes: int


@dataclass
class _Decoded:
    frame: Any  # av.VideoFrame
    time: Fraction  # video time in seconds
    end: Fraction  # when the next frame is expected (pts + frame duration)


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise VideoDecodeError(path, "file not found")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    return path


def _describe(exc: BaseException) -> str:
    """A one-line reason from a PyAV/FFmpeg exception."""
    text = getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {text}".strip()


class _VideoSource:
    """An open container plus the stream facts needed to pick frames by time."""

    def __init__(self, path: str | os.PathLike, stats: DecodeStats | None = None) -> None:
        import av

        self._av = av
        self.path = _check_file(path)
        self.stats = stats if stats is not None else DecodeStats()
        self._open()
        try:
            self._init_stream()
        except BaseException:
            self.container.close()
            raise

    def _open(self) -> None:
        av = self._av
        try:
            self.container = av.open(str(self.path), metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(self.path, f"not a readable video ({_describe(exc)})") from exc
        except (OSError, ValueError) as exc:
            raise VideoDecodeError(self.path, f"cannot open ({exc})") from exc
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams})
            self.container.close()
            if not kinds:  # e.g. an MP4 cut before its index (moov) was written
                raise VideoDecodeError(self.path, "no streams found (truncated or not a video file)")
            raise VideoDecodeError(self.path, f"no video stream (only {', '.join(kinds)}: audio-only file?)")
        self.stream = self.container.streams.video[0]
        self.at_start = True  # the demuxer has not moved yet
        width, height = self.stream.codec_context.width or 0, self.stream.codec_context.height or 0
        if width * height > MAX_FRAME_PIXELS:
            self.container.close()
            raise VideoDecodeError(self.path, f"frame size {width}x{height} is beyond the supported "
                                              f"{MAX_FRAME_PIXELS} pixels (corrupt or hostile header?)")

    def rewind(self) -> None:
        """Back to the first frame. Reopening is exact for every container; a seek to 0 is not
        (MPEG-TS seeks by estimated byte position and can land a keyframe late)."""
        if self.at_start:
            return
        self.container.close()
        self._open()

    def _init_stream(self) -> None:
        stream = self.stream
        self.time_base = stream.time_base or Fraction(1, 1_000_000)
        self.origin_pts = stream.start_time if stream.start_time is not None else 0
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.num_frames = int(stream.frames or 0)
        self.duration = self._stream_duration()
        if rate is None or rate <= 0:
            if self.duration and self.num_frames:
                rate = Fraction(self.num_frames) / self.duration
            else:
                rate = Fraction(25)
                logger.debug("%s: no frame rate in the container, assuming 25 fps", self.path)
        self.rate = Fraction(rate)
        self.tolerance = min(_PTS_TOLERANCE, Fraction(1, 4) / self.rate)
        fmt = self.container.format.name if self.container.format is not None else ""
        # AVI stores no presentation timestamps: with B-frames the pts PyAV reports are decode-order
        # stamps (shuffled for H.264, off by one for MPEG-4 ASP). AVI is constant-rate by construction,
        # so frames are timed by counting from the first frame, decoding sequentially: after a seek the
        # count is unknown (open GOPs drop their leading B-frames). Benchmark AVIs (MSVD, LSMDC) are short
        # clips, and `diffusionret preprocess` turns them into MP4s anyway.
        self.count_frames = fmt == "avi"
        self._warned_order = False
        self._init_keyframes()
        if self.duration is not None and self._end_may_be_early():
            self.duration = max(self.duration, self._tail_end())
        elif self.duration is not None and self.keyframe_ts and \
                self.duration > self.index_end + _DURATION_CHECK_SLACK_S:
            self._cap_duration_by_tail()

    def _cap_duration_by_tail(self) -> None:
        """Trust what decodes over what the header claims: cap the duration at the end of the last frame."""
        end = self._tail_end()
        if end > 0 and self.duration is not None and end + 1 < self.duration:
            logger.warning("%s: the container claims %.1f s but its frames end at %.2f s; using %.2f s",
                           self.path, float(self.duration), float(end), float(end))
            self.duration = end

    def _end_may_be_early(self) -> bool:
        """MP4 durations span *decode* timestamps; with B-frames in a variable-rate stream the last
        presentation times can lie well past that span, so the end must be measured."""
        stream = self.stream
        has_b_frames = bool(getattr(stream.codec_context, "has_b_frames", False))
        base = stream.base_rate or stream.guessed_rate
        varying = base is not None and Fraction(base) != self.rate
        return has_b_frames and varying and bool(self.keyframe_ts) and not self.count_frames

    def _tail_end(self) -> Fraction:
        """End of the last frame, found by decoding the last GOP (one seek)."""
        end = Fraction(0)
        try:
            self._seek_raw(self.keyframe_ts[-1])
            for decoded in self._decode():
                end = max(end, decoded.end)
        except VideoDecodeError:
            logger.debug("%s: could not measure the end of the stream", self.path)
        return end

    def _stream_duration(self) -> Fraction | None:
        stream, container = self.stream, self.container
        if stream.duration:
            return Fraction(stream.duration) * self.time_base
        if container.duration:
            # Container duration spans all streams from the container start; measure from ours.
            container_start = Fraction(container.start_time or 0, 1_000_000)
            own_start = Fraction(self.origin_pts) * self.time_base
            return Fraction(container.duration, 1_000_000) - max(Fraction(0), own_start - container_start)
        return None

    def _index_entries(self) -> list[Any]:
        try:
            return list(self.stream.index_entries)
        except (AttributeError, self._av.error.FFmpegError):  # older PyAV, or no index support
            return []

    def _init_keyframes(self) -> None:
        # Index entries carry decode timestamps; relative to the first entry they give keyframe times
        # (B-frame reordering shifts dts against pts by a constant for the usual encoders). Demuxers
        # seek in the presentation domain (MP4 undoes the dts shift itself), so the seek timestamp of a
        # keyframe is its time from the first entry plus the stream's start.
        self.keyframe_times: list[float] = []
        self.keyframe_ts: list[int] = []  # seek timestamps (presentation domain, stream time base)
        self.index_end = 0.0  # how far the index reaches; beyond it the gap rule decides
        entries = self._index_entries()
        fmt = self.container.format.name if self.container.format is not None else ""
        if len(entries) < 2 and "matroska" in fmt and self.duration is not None and self.duration > SEEK_GAP_S:
            # Matroska/WebM read their cues on the first seek; a seek to the start loads them.
            self._seek_raw(self.origin_pts)
            entries = self._index_entries()
        if not entries:
            return
        first = entries[0].timestamp
        tb = float(self.time_base)
        for entry in entries:
            if entry.is_keyframe:
                self.keyframe_times.append((entry.timestamp - first) * tb)
                self.keyframe_ts.append(entry.timestamp - first + self.origin_pts)
        self.index_end = (entries[-1].timestamp - first) * tb

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> _VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decoding --------------------------------------------------------------------------------------

    def _time_of(self, frame: Any, previous: _Decoded | None) -> Fraction:
        if frame.pts is None or self.count_frames:  # no (usable) timestamps: count at the average rate
            return Fraction(0) if previous is None else previous.end
        base = frame.time_base or self.time_base
        return Fraction(frame.pts) * base - Fraction(self.origin_pts) * self.time_base

    def _decode(self) -> Iterator[_Decoded]:
        """Decode forward from the current demuxer position, counting frames and wrapping errors."""
        self.at_start = False
        previous: _Decoded | None = None
        frames = self.container.decode(self.stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except self._av.error.FFmpegError as exc:
                where = f" after {float(previous.time):.2f} s" if previous is not None else ""
                raise VideoDecodeError(self.path, f"decoding failed{where} ({_describe(exc)})") from exc
            self.stats.frames_decoded += 1
            if frame.width * frame.height > MAX_FRAME_PIXELS:  # before any conversion multiplies it
                raise VideoDecodeError(self.path, f"frame size {frame.width}x{frame.height} is beyond the "
                                                  f"supported {MAX_FRAME_PIXELS} pixels")
            t = self._time_of(frame, previous)
            if previous is not None and t < previous.time and not self._warned_order:
                self._warned_order = True
                logger.warning("%s: presentation timestamps go backwards; frame choice may be off", self.path)
            step = Fraction(frame.duration) * (frame.time_base or self.time_base) if frame.duration else 0
            current = _Decoded(frame, t, t + (step or 1 / self.rate))
            previous = current
            yield current

    def _seek_raw(self, timestamp: int) -> None:
        self.at_start = False
        try:
            self.container.seek(timestamp, stream=self.stream, backward=True, any_frame=False)
        except self._av.error.FFmpegError as exc:
            seconds = float((timestamp - self.origin_pts) * self.time_base)
            raise VideoDecodeError(self.path, f"seek to {seconds:.2f} s failed ({_describe(exc)})") from exc

    def _seek_to(self, t: Fraction) -> None:
        """Seek to the keyframe at or before video time ``t`` (``t <= 0``: rewind to the first frame)."""
        self.stats.seeks += 1
        if t <= 0:
            self.rewind()
        elif self.keyframe_ts:
            j = max(0, bisect.bisect_right(self.keyframe_times, float(t) + 1e-9) - 1)
            self._seek_raw(self.keyframe_ts[j])
        else:
            self._seek_raw(math.floor(t / self.time_base) + self.origin_pts)

    def seek_and_decode(self, target: Fraction) -> Iterator[_Decoded]:
        """Seek to the keyframe at or before ``target`` and decode from there.

        Some demuxers land after the requested time (e.g. MPEG-TS, which seeks by byte position);
        then seek again, further back each time, down to a rewind to the first frame.
        """
        seek_time, backoff = target, Fraction(1)
        while True:
            self._seek_to(seek_time)
            frames = self._decode()
            first = next(frames, None)
            if first is None and seek_time <= 0:
                return iter(())
            if first is not None and (first.time <= target + self.tolerance or seek_time <= 0):
                return _prepend(first, frames)
            seek_time = max(Fraction(0), min(seek_time, first.time if first else seek_time) - backoff)
            backoff *= 2

    def should_seek(self, position: Fraction | None, target: Fraction) -> bool:
        """Whether jumping to ``target`` beats decoding forward from ``position`` (``None``: not started)."""
        here, goal = 0.0 if position is None else float(position), float(target)
        if self.count_frames:
            return False  # frames are timed by counting from the start
        if self.keyframe_times:
            # A keyframe in (here, target] means seeking skips at least the frames before it.
            j = bisect.bisect_right(self.keyframe_times, goal + 1e-9)
            if j > 0 and self.keyframe_times[j - 1] > here + 1e-9:
                return True
            if goal <= self.index_end + SEEK_GAP_S:
                return False
        # No index (or past its end, e.g. a truncated Matroska file): seek across long gaps only.
        return goal - here > SEEK_GAP_S

    def frames_at(self, times: list[Fraction], *, allow_seek: bool = True) -> list[_Decoded]:
        """The frame displayed at each of the ascending ``times`` (several times may share a frame).

        Raises:
            VideoDecodeError: no frame could be decoded, decoding failed, or the stream ends well
                before a target that its metadata says exists (a truncated file).
        """
        chosen: list[_Decoded] = []
        frames: Iterator[_Decoded] | None = None
        pending: _Decoded | None = None  # decoded, but after the current target
        prev: _Decoded | None = None  # the last frame at or before the current target
        last: _Decoded | None = None
        ended = False
        for target in times:
            if allow_seek and self.should_seek(None if last is None else last.time, target):
                frames, pending, prev, last, ended = self.seek_and_decode(target), None, None, None, False
            elif frames is None:
                self.rewind()  # probing (tail measurement, cue loading) may have moved the demuxer
                frames = self._decode()
            while not ended:
                if pending is None:
                    pending = next(frames, None)
                    if pending is None:
                        ended = True
                        break
                    last = pending
                if pending.time <= target + self.tolerance:
                    prev, pending = pending, None
                else:
                    break
            pick = prev if prev is not None else pending
            if pick is None:
                raise VideoDecodeError(self.path, "no decodable video frames")
            if ended and pick is last and target > last.end + max(Fraction(1), 4 / self.rate):
                raise VideoDecodeError(
                    self.path,
                    f"stream ends at {float(last.end):.2f} s but frames up to {float(self.duration or 0):.2f} s "
                    "were expected (truncated or corrupt file)",
                )
            chosen.append(pick)
        return chosen

    def scan_duration(self) -> Fraction:
        """Decode the whole stream to measure it (only for containers that store no duration)."""
        end: Fraction | None = None
        count = 0
        self.rewind()
        for decoded in self._decode():
            end, count = decoded.end, count + 1
        if end is None:
            raise VideoDecodeError(self.path, "no decodable video frames")
        self.rewind()
        self.num_frames = self.num_frames or count
        return end


def _prepend(first: _Decoded, rest: Iterator[_Decoded]) -> Iterator[_Decoded]:
    yield first
    yield from rest


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize so that the shorter side is ``size``, keeping the aspect ratio.

    Same output size rule and filter as ``torchvision.transforms.Resize(size, BICUBIC)`` on a PIL image,
    which the reference applies (long side ``int(size * long / short)``, truncated), so frames match
    the reference pixel for pixel given the same decoded RGB.

    Args:
        image: uint8 ``(H, W, 3)``.
        size: target length of the shorter side.

    Returns:
        uint8 ``(H', W', 3)`` with ``min(H', W') == size``.
    """
    from PIL import Image

    height, width = image.shape[:2]
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return image
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def _to_rgb(frame: Any, size: int | None, reformatter: Any = None) -> np.ndarray:
    # A reformatter shared by the frames of one read keeps its swscale context: ``to_ndarray(format=...)``
    # builds a new one per frame, which costs ~1 ms of thread set-up per frame (4x the whole decode of a
    # small clip). Same pixels either way.
    image = (reformatter.reformat(frame, format="rgb24") if reformatter is not None else frame).to_ndarray(
        format="rgb24")
    turns = _quarter_turns(getattr(frame, "rotation", 0) or 0)
    if turns:
        image = np.ascontiguousarray(np.rot90(image, k=turns))
    if size is not None:
        image = resize_short_side(image, size)
    return image


def _quarter_turns(rotation: float) -> int:
    """Counter-clockwise quarter turns for a display-matrix rotation (rounded to a multiple of 90)."""
    return int(round(rotation / 90.0)) % 4


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open a video, decode its first frame and report what it is.

    Raises:
        VideoDecodeError: the file is missing, empty, not a video, has no video stream or no
            decodable frame.
    """
    with _VideoSource(path) as src:
        src.rewind()
        first = next(src._decode(), None)
        if first is None:
            raise VideoDecodeError(src.path, "no decodable video frames")
        duration = src.duration if src.duration is not None else src.scan_duration()
        rotation = int(_quarter_turns(getattr(first.frame, "rotation", 0) or 0) * 90)
        width, height = first.frame.width, first.frame.height
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(
            path=src.path,
            width=width,
            height=height,
            rotation=rotation,
            avg_fps=float(src.rate),
            num_frames=src.num_frames,
            duration=float(duration),
            codec=src.stream.codec_context.name,
            num_keyframes=len(src.keyframe_ts),
        )


def read_frames(
    path: str | os.PathLike,
    *,
    fps: float = REFERENCE_INPUT.fps,
    max_frames: int = REFERENCE_INPUT.max_frames,
    start: float | None = None,
    end: float | None = None,
    size: int | None = REFERENCE_INPUT.size,
    sampling: str = REFERENCE_INPUT.sampling,
    seek: bool = True,
    stats: DecodeStats | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the frames of a video (clip) that the model sees.

    Args:
        path: video file.
        fps: samples per second of video time (any positive number; in ``"reference"`` mode an integer,
            the reference's ``--video_framerate``).
        max_frames: ``T``, the most frames returned.
        start, end: clip bounds in seconds of video time (from the first frame), ``None`` for the
            start/end of the video; the clip is clamped to the video.
        size: bicubic short-side resize target (the reference's ``Resize(224)``; no crop here: cropping
            and normalisation belong to :mod:`diffusionret.data.transforms`); ``None`` keeps the
            decoded size.
        sampling: ``"uniform"`` / ``"head"`` / ``"tail"``: targets ``start + k / fps`` inside the clip,
            reduced to ``T`` uniformly (floor of ``linspace``) or by taking the first/last ``T``;
            ``"reference"``: the frame indices of the reference's OpenCV reader (docs/reference.md §5.3), exact for
            constant-frame-rate videos.
        seek: allow seeking (``False`` decodes sequentially from the start; for benchmarks).
        stats: optional counters of decoded frames and seeks.

    Returns:
        ``(frames, timestamps)``: ``frames`` uint8 ``(n, H, W, 3)`` RGB in display orientation (rotation
        metadata applied), ``min(H, W) == size`` unless ``size`` is ``None``; ``timestamps`` float64
        ``(n,)``, the presentation time in seconds of each returned frame. ``1 <= n <= max_frames``; a
        frame repeats when ``fps`` exceeds the video's own frame rate.

    Raises:
        VideoDecodeError: the file is missing, empty, truncated, audio-only, not a video, the clip lies
            outside the video, or decoding fails. The message names the file and the cause.
        ValueError: invalid arguments.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLING_MODES}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 or None, got {size}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    with _VideoSource(path, stats) as src:
        duration = src.duration if src.duration is not None and src.duration > 0 else src.scan_duration()
        times = _targets(src, duration, fps=fps, max_frames=max_frames, start=start, end=end, sampling=sampling)
        picked = src.frames_at(times, allow_seek=seek)
        converted: dict[int, np.ndarray] = {}
        images = []
        from av.video.reformatter import VideoReformatter

        reformatter = VideoReformatter()
        for decoded in picked:
            key = id(decoded)
            if key not in converted:
                converted[key] = _to_rgb(decoded.frame, size, reformatter)
            images.append(converted[key])
    shapes = {image.shape for image in images}
    if len(shapes) > 1:  # resolution changes mid-stream: bring all frames to the first frame's size
        images = [_match_size(image, images[0].shape) for image in images]
    frames = np.stack(images)
    timestamps = np.array([float(decoded.time) for decoded in picked], dtype=np.float64)
    return frames, timestamps


def _targets(
    src: _VideoSource,
    duration: Fraction,
    *,
    fps: float,
    max_frames: int,
    start: float | None,
    end: float | None,
    sampling: str,
) -> list[Fraction]:
    try:
        if sampling != "reference":
            return sample_times(duration, fps=fps, max_frames=max_frames, start=start, end=end, mode=sampling)
        if fps != int(fps):
            raise ValueError(f"sampling='reference' needs an integer fps (the reference's framerate), got {fps}")
        num_frames = src.num_frames or round(float(duration * src.rate))
        indices = reference_frame_indices(
            num_frames, float(src.rate), framerate=int(fps), max_frames=max_frames, start=start, end=end
        )
    except ValueError as exc:
        if "needs an integer fps" in str(exc):
            raise
        raise VideoDecodeError(src.path, str(exc)) from exc
    if not indices:
        raise VideoDecodeError(src.path, "no frames to read (empty clip or video)")
    # Frame i of a constant-rate stream is displayed during [i / rate, (i + 1) / rate); its middle is
    # robust to timestamp rounding.
    return [(Fraction(i) + Fraction(1, 2)) / src.rate for i in indices]


def _match_size(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    if image.shape == shape:
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


def decode_all_frames(path: str | os.PathLike) -> int:
    """Decode every frame of a video (no conversion) and return how many there were.

    The baseline that :func:`benchmark_decode` compares seeking against.
    """
    with _VideoSource(path) as src:
        return sum(1 for _ in src._decode())


def benchmark_decode(
    path: str | os.PathLike, *, fps: float = REFERENCE_INPUT.fps, max_frames: int = REFERENCE_INPUT.max_frames,
    size: int | None = REFERENCE_INPUT.size, repeats: int = 3
) -> dict[str, float]:
    """Time :func:`read_frames` with seeking against decoding every frame of the same video.

    Returns:
        ``{"read_frames_s", "sequential_s", "decode_all_s", "speedup", "frames_decoded",
        "frames_decoded_sequential", "seeks"}``: best-of-``repeats`` wall times in seconds,
        ``speedup = decode_all_s / read_frames_s`` and the decoder counters of one seeking run.
    """

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    stats, seq_stats = DecodeStats(), DecodeStats()
    read_frames(path, fps=fps, max_frames=max_frames, size=size, stats=stats)
    read_frames(path, fps=fps, max_frames=max_frames, size=size, seek=False, stats=seq_stats)
    fast = best(lambda: read_frames(path, fps=fps, max_frames=max_frames, size=size))
    sequential = best(lambda: read_frames(path, fps=fps, max_frames=max_frames, size=size, seek=False))
    full = best(lambda: decode_all_frames(path))
    return {
        "read_frames_s": fast,
        "sequential_s": sequential,
        "decode_all_s": full,
        "speedup": full / fast if fast > 0 else math.inf,
        "frames_decoded": float(stats.frames_decoded),
        "frames_decoded_sequential": float(seq_stats.frames_decoded),
        "seeks": float(stats.seeks),
    }
