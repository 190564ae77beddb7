"""Write small synthetic videos with PyAV: for tests, smoke runs and benchmarks.

:func:`index_frame` draws a frame whose number is written in big black/white blocks (one bit per
16x16 block), so it survives lossy compression and can be read back with :func:`read_index`; tests
use it to check which frame a sampler picked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

BLOCK = 16  # pixels per bit: big flat blocks survive yuv420p chroma subsampling and x264 quantisation
_LOW, _HIGH = 16, 235  # video-range levels, so no clipping in the RGB <-> YUV round trip


def index_frame(index: int, width: int = 64, height: int = 48) -> np.ndarray:
    """An RGB frame encoding ``index`` in its pixels.

    Bits are laid out row-major in a grid of ``(height // 16) x (width // 16)`` blocks, most significant
    first; the remaining border is mid-grey.

    Returns:
        uint8 array ``(height, width, 3)``.
    """
    rows, cols = height // BLOCK, width // BLOCK
    bits = rows * cols
    if bits < 1 or index < 0 or index >= 2**bits:
        raise ValueError(f"a {width}x{height} frame holds indices below {2 ** max(bits, 0)}, got {index}")
    frame = np.full((height, width, 3), 128, dtype=np.uint8)
    for bit in range(bits):
        r, c = divmod(bit, cols)
        on = (index >> (bits - 1 - bit)) & 1
        frame[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = _HIGH if on else _LOW
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index written by :func:`index_frame` into ``frame`` (uint8 ``(H, W, 3)``, display orientation)."""
    height, width = frame.shape[:2]
    rows, cols = height // BLOCK, width // BLOCK
    bits = rows * cols
    value = 0
    q = BLOCK // 4  # read the block centre, away from edge ringing
    for bit in range(bits):
        r, c = divmod(bit, cols)
        centre = frame[r * BLOCK + q : (r + 1) * BLOCK - q, c * BLOCK + q : (c + 1) * BLOCK - q]
        value = (value << 1) | int(centre.mean() > 128)
    return value


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    *,
    fps: float | Fraction = 10,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode RGB frames into a video file with PyAV.

    Args:
        path: output file; the container format follows the extension.
        frames: uint8 ``(H, W, 3)`` RGB arrays, all the same size.
        fps: nominal frame rate (frame ``i`` gets ``pts = i`` in ``1 / fps`` units unless ``pts`` is given).
        codec: ``"libx264"`` (lossy, yuv420p, even sizes), ``"libx264rgb"`` (lossless with
            ``options={"crf": "0"}``, any size), ``"mpeg4"``, ``"ffv1"``...
        pix_fmt: pixel format; defaults to ``rgb24`` for libx264rgb and ``yuv420p`` otherwise.
        pts: explicit presentation timestamps in ``time_base`` units, for variable-frame-rate videos.
        time_base: time base of ``pts`` (required with ``pts``).
        rotation: display rotation in degrees counter-clockwise, stored as container metadata (what a
            phone does); the coded frames stay as given.
        options: encoder options, e.g. ``{"crf": "0"}`` or ``{"x264-params": "keyint=20:scenecut=0"}``.
        container_options: muxer options, e.g. ``{"movflags": "faststart"}``.

    Returns:
        ``path``.
    """
    import av  # local: keep the module importable for listing helpers without PyAV

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pts is not None and time_base is None:
        raise ValueError("explicit pts need a time_base")
    rate = Fraction(fps).limit_denominator(1_000_000) if not isinstance(fps, Fraction) else fps
    with av.open(str(path), mode="w", container_options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=dict(options or {}))
        stream.pix_fmt = pix_fmt or ("rgb24" if codec == "libx264rgb" else "yuv420p")
        if time_base is not None:
            # Both the stream and the encoder must use it, or explicit pts get rounded to 1/fps ticks.
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        count = 0
        for i, array in enumerate(frames):
            if count == 0:
                stream.height, stream.width = array.shape[:2]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            if pts is not None:
                frame.pts = int(pts[i])
                frame.time_base = time_base
            container.mux(stream.encode(frame))
            count += 1
        if count == 0:
            raise ValueError(f"{path}: no frames to write")
        container.mux(stream.encode(None))
    return path


def write_index_video(
    path: str | os.PathLike,
    num_frames: int,
    *,
    fps: float | Fraction = 10,
    width: int = 64,
    height: int = 48,
    lossless: bool = False,
    keyint: int | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """A video whose frame ``i`` shows :func:`index_frame` ``(i)`` (in display orientation).

    Args:
        num_frames: number of frames.
        fps, pts, time_base, container_options: as in :func:`write_video`.
        width, height: display size of the frames.
        lossless: libx264rgb with ``crf=0`` (exact pixels, any size) instead of lossy yuv420p libx264.
        keyint: keyframe interval in frames (scene-cut detection off, so keyframes are exactly every
            ``keyint`` frames); ``None`` keeps x264's default.
        rotation: display rotation (counter-clockwise degrees, a multiple of 90); the coded frames are
            rotated the other way so that a decoder honouring the metadata shows :func:`index_frame`.
    """
    codec = "libx264rgb" if lossless else "libx264"
    options: dict[str, str] = {"crf": "0"} if lossless else {"crf": "18"}
    params = ["scenecut=0"] if keyint is None else [f"keyint={keyint}", f"min-keyint={keyint}", "scenecut=0"]
    options["x264-params"] = ":".join(params)
    k = 0 if not rotation else (rotation // 90) % 4

    def frames() -> Iterable[np.ndarray]:
        for i in range(num_frames):
            # Undo the display rotation: the player rotates counter-clockwise by `rotation`.
            yield np.ascontiguousarray(np.rot90(index_frame(i, width, height), k=-k))

    return write_video(
        path,
        frames(),
        fps=fps,
        codec=codec,
        pts=pts,
        time_base=time_base,
        rotation=rotation,
        options=options,
        container_options=container_options,
    )
