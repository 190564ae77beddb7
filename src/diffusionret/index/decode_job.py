"""The decoding half of indexing one video, as a job for a worker process (no torch here).

:class:`~diffusionret.index.encode.ModelVideoEncoder` runs :func:`decode_for_index` in
:class:`~diffusionret.data.isolate.IsolatedPool` workers, so a hostile file costs at most the
decode budget; the returned frames are uint8 (smaller to ship between processes than the
normalised float tensors the model takes, which the parent makes).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

# Thumbnails are made from the middle sampled frame; below this short side (tiny test models decode
# 32 px frames) the middle of the clip is decoded again at this size.
THUMBNAIL_SHORT_SIDE = 180


@dataclass(frozen=True)
class DecodeRequest:
    """What to decode: a file and the sampling settings of the index (see ``read_frames``)."""

    path: str
    fps: float
    max_frames: int
    size: int
    sampling: str


@dataclass(frozen=True)
class DecodedVideo:
    """The sampled frames and facts of one video.

    Attributes:
        frames: uint8 (n, H, W, 3) RGB, short side ``size``, ``1 <= n <= max_frames``.
        duration: seconds (capped by what decodes).
        width, height: display size.
        thumbnail: JPEG bytes, or ``None``.
    """

    frames: np.ndarray
    duration: float
    width: int
    height: int
    thumbnail: bytes | None


def decode_for_index(request: DecodeRequest) -> DecodedVideo:
    """Decode one video for the index; raises on any problem (the pool reports it per file)."""
    from diffusionret.data.decode import probe_video, read_frames

    info = probe_video(request.path)
    raw, _ = read_frames(request.path, fps=request.fps, max_frames=request.max_frames, size=request.size,
                         sampling=request.sampling)
    return DecodedVideo(frames=raw, duration=float(info.duration), width=int(info.width), height=int(info.height),
                        thumbnail=_thumbnail(request.path, raw, info.duration))


def _thumbnail(path: str, raw: np.ndarray, duration: float) -> bytes | None:
    from diffusionret.data.decode import read_frames
    from diffusionret.data.errors import VideoDecodeError

    frame = raw[len(raw) // 2]
    if min(frame.shape[:2]) < THUMBNAIL_SHORT_SIDE:
        try:
            again, _ = read_frames(path, fps=1.0, max_frames=1, start=duration / 2 if duration else None,
                                   size=None, sampling="head")
            frame = again[0]
        except VideoDecodeError:
            pass  # keep the small frame: a thumbnail is a convenience, not a reason to fail
    return jpeg_thumbnail(frame)


def jpeg_thumbnail(frame: np.ndarray, short_side: int = THUMBNAIL_SHORT_SIDE, quality: int = 82) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes, short side at most ``short_side`` (aspect ratio kept)."""
    from PIL import Image

    image = Image.fromarray(frame)
    scale = short_side / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
