"""Decoding the frames the model sees (12 frames at 1 fps) vs decoding every frame.

    python benchmarks/bench_decode.py                  # a 30 s and a 10 min video
    python benchmarks/bench_decode.py --repeats 1      # quicker

Test videos: 320x240 (MSR-VTT's usual size), 30 fps H.264 (libx264 default preset, crf 23), a
keyframe every 250 frames (8.3 s; x264's default GOP, scene-cut detection off so the GOPs are
exact), content that moves every frame (a panning texture and a moving square), so P/B frames
carry real data. They are written once with :mod:`diffusionret.testing.videos` and cached in
``benchmarks/.cache/decode/`` (the 10 min video takes about a minute to encode).

Timed with :func:`diffusionret.data.benchmark_decode`, best of ``--repeats``:

* ``read_frames_s``: :func:`~diffusionret.data.read_frames` (``fps=1, max_frames=12, size=224``:
  12 uniformly spread targets, decoded with keyframe seeking, converted to RGB and resized),
* ``sequential_s``: the same call without seeking (decodes from the start to the last target),
* ``decode_all_s``: decoding every frame of the file, without conversion (the baseline),
* ``speedup = decode_all_s / read_frames_s``; ``frames_decoded`` and ``seeks`` of one seeking call.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from diffusionret.data import benchmark_decode, probe_video
from diffusionret.testing.videos import write_video

from _common import CACHE_DIR, load_text, report

KEYINT = 250


def moving_frames(count: int, width: int, height: int, seed: int = 0) -> Iterator[np.ndarray]:
    """RGB frames of a texture panning 2 px/frame right and 1 px every 3 frames down, plus a moving square."""
    rng = np.random.default_rng(seed)
    cell = 8
    small = rng.integers(0, 256, (height // cell + 1, width // cell + 1, 3), dtype=np.uint8)
    texture = np.kron(small, np.ones((cell, cell, 1), dtype=np.uint8))
    texture = np.tile(texture, (2, 2, 1))  # room to pan over
    span_y, span_x = texture.shape[0] - height, texture.shape[1] - width
    side = max(8, min(width, height) // 6)
    for i in range(count):
        x, y = (2 * i) % span_x, (i // 3) % span_y
        frame = texture[y:y + height, x:x + width].copy()
        cx = int((np.sin(i / 40) + 1) / 2 * (width - side))
        cy = int((np.cos(i / 55) + 1) / 2 * (height - side))
        frame[cy:cy + side, cx:cx + side] = (255, 255 - i % 256, i % 256)
        yield frame


def test_video(seconds: int, *, fps: int, width: int, height: int, cache: Path) -> Path:
    """The cached test video of ``seconds`` seconds (written on first use, atomically)."""
    path = cache / f"moving_{seconds}s_{width}x{height}_{fps}fps_k{KEYINT}.mp4"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.mp4")
    print(f"writing {path.name} ({seconds * fps} frames) ...", flush=True)
    write_video(tmp, moving_frames(seconds * fps, width, height), fps=fps,
                options={"preset": "medium", "crf": "23",
                         "x264-params": f"keyint={KEYINT}:min-keyint={KEYINT}:scenecut=0"})
    os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--durations", type=int, nargs="+", default=[30, 600], help="video lengths in seconds")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of the test videos")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--sample-fps", type=float, default=1.0, help="read_frames' fps")
    parser.add_argument("--max-frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=224, help="short-side resize of the returned frames")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR / "decode")
    args = parser.parse_args()
    print(f"load average: {load_text()}")
    for seconds in args.durations:
        path = test_video(seconds, fps=args.fps, width=args.width, height=args.height, cache=args.cache)
        info = probe_video(path)
        result = benchmark_decode(path, fps=args.sample_fps, max_frames=args.max_frames, size=args.size,
                                  repeats=args.repeats)
        report("decode", video_s=round(info.duration, 2), frames=info.num_frames, keyframes=info.num_keyframes,
               resolution=f"{info.width}x{info.height}", read_frames_s=result["read_frames_s"],
               sequential_s=result["sequential_s"], decode_all_s=result["decode_all_s"], speedup=result["speedup"],
               frames_decoded=int(result["frames_decoded"]), seeks=int(result["seeks"]))


if __name__ == "__main__":
    main()
