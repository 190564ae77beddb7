"""Shot boundaries of a video with PySceneDetect (the optional ``diffusionret[scenes]`` extra).

PySceneDetect reads the file through its PyAV backend (``VideoStreamAv``), the same decoder library
the index uses, and its ``ContentDetector`` compares consecutive frames in HSV space. Detection is a
full sequential pass over the video at its native frame rate, at a downscaled size, so it costs far
less than encoding; :mod:`diffusionret.index.segments` turns the cuts into segments.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusionret.data.errors import VideoDecodeError

logger = logging.getLogger(__name__)

__all__ = ["SHOT_DETECTORS", "ShotDetectionUnavailableError", "detect_cuts", "require_scenedetect"]


class ShotDetectionUnavailableError(RuntimeError):
    """``--segments shots`` without PySceneDetect installed."""


def require_scenedetect() -> None:
    """Fail early (before any encoding) when PySceneDetect is missing."""
    import importlib.util

    if importlib.util.find_spec("scenedetect") is None:
        raise ShotDetectionUnavailableError(
            "shot segments need PySceneDetect: pip install 'diffusionret[scenes]' (or scenedetect)")


SHOT_DETECTORS: tuple[str, ...] = ("adaptive", "content")


def detect_cuts(path: str | os.PathLike, *, detector: str = "adaptive", threshold: float | None = None,
                min_scene_len: float = 0.0, progress: Callable[[float], None] | None = None,
                max_duration: float | None = None) -> list[float]:
    """Times (seconds from the first frame) where a new shot starts, ascending, ``0`` excluded.

    Args:
        path: the video.
        detector: ``adaptive`` (``AdaptiveDetector``) or ``content`` (``ContentDetector``).
        threshold: the detector's threshold (``adaptive_threshold``, default 3; ``threshold``,
            default 27); higher finds fewer cuts. ``None``: PySceneDetect's default.
        min_scene_len: seconds that must pass after a cut before the next one; short shots are
            merged again later by :func:`~diffusionret.index.segments.shot_spans`, so the default
            keeps every cut the detector sees.
        progress: called with the time (seconds) of each decoded frame (for a decode budget that
            follows progress; from PySceneDetect's decoding thread); ``None``: none.
        max_duration: stop reading after this many seconds (the timeline's cap, which then refuses the
            file); ``None``: read to the end.

    Returns:
        Cut times; empty for a single-shot video.

    Raises:
        ShotDetectionUnavailableError: PySceneDetect is not installed.
        VideoDecodeError: the file cannot be opened or decoded (names the file).
    """
    if detector not in SHOT_DETECTORS:
        raise ValueError(f"unknown shot detector {detector!r}; expected one of {SHOT_DETECTORS}")
    require_scenedetect()
    from scenedetect import AdaptiveDetector, ContentDetector, SceneManager

    path = Path(path)
    try:
        video = _open_stream(path, progress)
    except Exception as exc:  # noqa: BLE001 - PySceneDetect raises its own types and PyAV's
        raise VideoDecodeError(path, f"shot detection cannot open the video ({type(exc).__name__}: {exc})") from exc
    manager = SceneManager()
    # min_scene_len in frames: 0 lets the detector report back-to-back cuts; merging is ours.
    frames = max(0, round(min_scene_len * float(video.frame_rate)))
    if detector == "adaptive":
        options = {} if threshold is None else {"adaptive_threshold": threshold}
        manager.add_detector(AdaptiveDetector(min_scene_len=frames, **options))
    else:
        options = {} if threshold is None else {"threshold": threshold}
        manager.add_detector(ContentDetector(min_scene_len=frames, **options))
    try:
        manager.detect_scenes(video=video, show_progress=False, end_time=max_duration)
    except Exception as exc:  # noqa: BLE001 - a decode error mid-stream: the file is at fault
        raise VideoDecodeError(path, f"shot detection failed ({type(exc).__name__}: {exc})") from exc
    scenes = manager.get_scene_list(start_in_scene=True)
    cuts = [float(start.seconds) for start, _ in scenes[1:]]
    logger.debug("%s: %d shot cuts", path, len(cuts))
    return cuts


def _open_stream(path: Path, progress: Callable[[float], None] | None) -> Any:
    """PySceneDetect's PyAV stream, reporting the time of each frame it reads to ``progress``."""
    from scenedetect.backends.pyav import VideoStreamAv

    if progress is None:
        return VideoStreamAv(str(path), suppress_output=True)

    class _Reporting(VideoStreamAv):  # type: ignore[misc]  # PySceneDetect has no per-frame hook
        def read(self, *args: Any, **kwargs: Any) -> Any:
            frame = super().read(*args, **kwargs)
            if frame is not False:
                progress(float(self.position.seconds))
            return frame

    return _Reporting(str(path), suppress_output=True)
