"""Re-encode a folder of videos to a low frame rate and a small short side (docs/reference.md §6), with PyAV.

The reference ran ``ffmpeg -r 3`` with a scale filter that made portrait videos *narrower* than 224
(docs/reference.md §6, §8.37); here the short side is ``short_side`` for every orientation, both sides even
(yuv420p needs it), aspect ratio kept, rotation metadata applied to the pixels, audio dropped.
Output frame ``k`` (at ``k / fps`` seconds) is the input frame displayed at that time, so the output
has ``ceil(duration * fps)`` frames whatever the input frame rate.

Outputs mirror the input tree (``a/b.avi`` -> ``out/a/b.mp4``; the reference flattened it, which lets
two inputs overwrite each other). The run is resumable: each output is written to a hidden
``.<name>.partial.mp4`` beside it and renamed into place when complete, and existing outputs that
decode are skipped, so a killed run picks up where it stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from diffusionret.data.decode import _VideoSource, probe_video
from diffusionret.data.errors import VideoDecodeError
from diffusionret.data.records import VIDEO_EXTENSIONS
from diffusionret.data.sampling import to_fraction

logger = logging.getLogger(__name__)

__all__ = [
    "PreprocessReport",
    "PreprocessResult",
    "find_videos",
    "output_size",
    "preprocess_videos",
    "transcode_video",
]

PARTIAL_SUFFIX = ".partial.mp4"


@dataclass(frozen=True)
class PreprocessResult:
    """Outcome for one input: ``status`` is ``"done"``, ``"skipped"`` (valid output existed) or ``"failed"``."""

    source: str
    output: str
    status: str
    error: str | None = None
    seconds: float = 0.0


@dataclass
class PreprocessReport:
    done: list[PreprocessResult] = field(default_factory=list)
    skipped: list[PreprocessResult] = field(default_factory=list)
    failed: list[PreprocessResult] = field(default_factory=list)

    def add(self, result: PreprocessResult) -> None:
        {"done": self.done, "skipped": self.skipped, "failed": self.failed}[result.status].append(result)

    @property
    def total(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)


def output_size(width: int, height: int, short_side: int = 224) -> tuple[int, int]:
    """Output ``(width, height)``: the shorter side becomes ``short_side``, the longer one keeps the
    aspect ratio, truncated to an even number (the reference's rounding for landscape videos)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid frame size {width}x{height}")
    even_short = short_side - short_side % 2
    if width > height:
        return max(2, int(short_side * width / height / 2) * 2), even_short
    return even_short, max(2, int(short_side * height / width / 2) * 2)


def find_videos(root: str | os.PathLike, exclude: Path | None = None) -> list[Path]:
    """Video files under ``root`` (recursive, sorted; hidden files and ``exclude`` skipped)."""
    root = Path(root)
    found = []
    excluded = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != excluded)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                found.append(here / name)
    return found


# Longest stretch of output that one input frame may fill (see _frames_at_rate).
MAX_GAP_S = 10.0


def _is_valid_output(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        probe_video(path)
    except VideoDecodeError:
        return False
    return True


def _frames_at_rate(src: _VideoSource, fps: Fraction,
                    max_gap_s: float = MAX_GAP_S) -> Iterable[tuple[int, object]]:
    """``(k, frame)`` for output frames ``k = 0, 1, ...``: the input frame displayed at ``k / fps``.

    A jump of more than ``max_gap_s`` between two frames' timestamps (or a last frame lasting
    longer) is a broken or hostile timeline, not a still image: the frame is held for ``max_gap_s``
    and the rest of the video moves earlier, so the output never fills the gap with frames.
    """
    src.rewind()  # probing (cue loading, measuring the end) may have moved the demuxer
    k, prev = 0, None
    gap = to_fraction(max_gap_s)
    shift = Fraction(0)  # how much of the timeline's jumps has been cut out so far
    for decoded in src._decode():
        if prev is not None and decoded.time - shift - prev.time > gap:
            logger.warning("%s: timestamps jump by %.1f s after %.2f s; holding the frame for %g s only",
                           src.path, float(decoded.time - shift - prev.time), float(prev.time), max_gap_s)
            shift = decoded.time - prev.time - gap
        current_time = decoded.time - shift
        while prev is not None and current_time > Fraction(k) / fps + src.tolerance:
            yield k, prev.frame
            k += 1
        prev = _Timed(decoded.frame, current_time, decoded.end - shift)
    if prev is None:
        raise VideoDecodeError(src.path, "no decodable video frames")
    end = min(prev.end, prev.time + gap)
    while Fraction(k) / fps < end or k == 0:
        yield k, prev.frame
        k += 1


@dataclass(frozen=True)
class _Timed:
    frame: object  # av.VideoFrame
    time: Fraction  # on the output timeline (jumps cut out)
    end: Fraction


def transcode_video(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fps: float = 3.0,
    short_side: int = 224,
    crf: int = 23,
    preset: str = "veryfast",
) -> int:
    """Re-encode ``source`` to ``output`` (H.264 MP4, written in place; see :func:`preprocess_videos`
    for the atomic, resumable wrapper).

    Returns:
        the number of frames written.

    Raises:
        VideoDecodeError: the source cannot be decoded.
    """
    import av

    rate = to_fraction(fps)
    frame_period = 1 / rate
    output = Path(output)
    with _VideoSource(source) as src:
        with av.open(str(output), mode="w", format="mp4") as sink:
            stream = sink.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
            stream.pix_fmt = "yuv420p"
            written = 0
            for k, frame in _frames_at_rate(src, rate):
                if written == 0:
                    turns = int(round((getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
                    display = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
                    stream.width, stream.height = output_size(*display, short_side)
                out = _convert(frame, stream.width, stream.height)
                out.pts = k
                out.time_base = frame_period  # reformat() keeps the source's time base otherwise
                sink.mux(stream.encode(out))
                written += 1
            sink.mux(stream.encode(None))
    return written


def _convert(frame, width: int, height: int):  # noqa: ANN001, ANN202 - av.VideoFrame in and out
    """Rotate for display and resize with bicubic filtering to ``width x height`` yuv420p."""
    import av

    turns = int(round((getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
    if not turns:
        return frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
    # Resize in coded orientation first (fewer pixels to rotate), then rotate the RGB array.
    coded_w, coded_h = (height, width) if turns % 2 else (width, height)
    rgb = frame.reformat(width=coded_w, height=coded_h, format="rgb24", interpolation="BICUBIC").to_ndarray()
    rotated = np.ascontiguousarray(np.rot90(rgb, k=turns))
    return av.VideoFrame.from_ndarray(rotated, format="rgb24").reformat(format="yuv420p")


@dataclass(frozen=True)
class _Task:
    source: Path
    output: Path
    fps: float
    short_side: int
    crf: int
    preset: str
    overwrite: bool


def _run_task(task: _Task) -> PreprocessResult:
    """Process one video; never raises (a failure is a result), so one bad file cannot stop the pool."""
    t0 = time.perf_counter()
    if not task.overwrite and _is_valid_output(task.output):
        return PreprocessResult(str(task.source), str(task.output), "skipped")
    partial = task.output.with_name(f".{task.output.stem}{PARTIAL_SUFFIX}")
    try:
        task.output.parent.mkdir(parents=True, exist_ok=True)
        transcode_video(task.source, partial, fps=task.fps, short_side=task.short_side, crf=task.crf,
                        preset=task.preset)
        os.replace(partial, task.output)
    except Exception as exc:  # noqa: BLE001 - reported per file in the summary
        partial.unlink(missing_ok=True)
        cause = exc.cause if isinstance(exc, VideoDecodeError) else f"{type(exc).__name__}: {exc}"
        return PreprocessResult(str(task.source), str(task.output), "failed", cause, time.perf_counter() - t0)
    return PreprocessResult(str(task.source), str(task.output), "done", None, time.perf_counter() - t0)


def preprocess_videos(
    input_root: str | os.PathLike,
    output_root: str | os.PathLike,
    *,
    fps: float = 3.0,
    short_side: int = 224,
    workers: int | None = None,
    crf: int = 23,
    preset: str = "veryfast",
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessReport:
    """Re-encode every video under ``input_root`` into ``output_root`` (same tree, ``.mp4``).

    Args:
        input_root: folder searched recursively for videos.
        output_root: destination folder (may not be ``input_root``).
        fps: output frame rate (the reference: 3).
        short_side: output short side in pixels (the reference: 224).
        workers: processes; default ``os.cpu_count()``; 1 runs in this process.
        crf, preset: x264 quality and speed.
        overwrite: re-encode even when a valid output exists.
        progress: show a tqdm progress bar.

    Returns:
        the per-file outcomes; failures carry the cause and never stop the run.
    """
    input_root, output_root = Path(input_root), Path(output_root)
    if not input_root.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_root}")
    if output_root.resolve() == input_root.resolve():
        raise ValueError(f"output folder must differ from the input folder: {output_root}")
    if fps <= 0 or short_side < 2:
        raise ValueError(f"need fps > 0 and short_side >= 2, got {fps}, {short_side}")
    report = PreprocessReport()
    tasks: list[_Task] = []
    owners: dict[Path, Path] = {}
    for source in find_videos(input_root, exclude=output_root):
        output = output_root / source.relative_to(input_root).with_suffix(".mp4")
        if output in owners:  # a.avi and a.mp4 in one folder
            report.add(PreprocessResult(str(source), str(output), "failed",
                                        f"output name collides with {owners[output]}"))
            continue
        owners[output] = source
        tasks.append(_Task(source, output, fps, short_side, crf, preset, overwrite))
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="preprocess", unit="video")
    try:
        if workers == 1:
            results: Iterable[PreprocessResult] = map(_run_task, tasks)
            _collect(results, report, bar)
        else:
            # spawn: the parent may hold threads (torch, FFmpeg) that fork would copy mid-flight.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                _collect(pool.imap_unordered(_run_task, tasks), report, bar)
    finally:
        if bar is not None:
            bar.close()
    logger.info("preprocess: %d done, %d already there, %d failed", len(report.done), len(report.skipped),
                len(report.failed))
    return report


def _collect(results: Iterable[PreprocessResult], report: PreprocessReport, bar) -> None:  # noqa: ANN001
    for result in results:
        report.add(result)
        if result.status == "failed":
            logger.warning("preprocess: %s failed: %s", result.source, result.error)
        if bar is not None:
            bar.update()
            bar.set_postfix(failed=len(report.failed), refresh=False)

