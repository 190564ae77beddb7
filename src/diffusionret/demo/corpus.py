"""Synthetic text-video corpus for the offline demo: moving coloured shapes with varied captions.

Every clip shows one shape on a plain background. A clip is described by five attributes (shape
colour, shape, size, motion, background colour); its caption names all five in one of several
phrasings with synonyms. The corpus is written in the user-data format that ``diffusionret train``
reads: a folder of H.264 mp4 files plus one CSV per split with the columns ``video,caption``.

Test clips get pairwise-distinct attribute tuples, so no two test videos are described by the
same facts (R@1 would otherwise be capped by indistinguishable duplicates). Training clips draw
their attributes independently, so most test combinations are unseen as a whole: the model has
to compose the attributes, not memorise clips.

What the demo's tiny model (trained from random weights for two minutes) picks up: colour and
background almost perfectly, size mostly, shape and motion direction only partly. Motion is the
hardest: a 32-pixel, 2-layer ViT must first learn to encode where the shape is in each frame before
the temporal module can compare frames. The eight background colours are there so that a test clip
shares its easy attributes with only a few others.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# RGB values chosen to stay apart from each other and from every background after yuv420p encoding.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 90, 255),
    "yellow": (250, 230, 20),
    "purple": (150, 40, 220),
    "orange": (255, 140, 0),
    "cyan": (0, 225, 230),
    "pink": (255, 120, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (120, 120, 120),
    "brown": (105, 60, 25),
    "navy": (15, 25, 85),
    "olive": (95, 100, 20),
    "maroon": (90, 10, 35),
    "teal": (0, 95, 95),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still", "orbit")
SIZES: tuple[str, ...] = ("small", "large")

# Radius of each size as a fraction of the frame side.
_RADIUS = {"small": 0.15, "large": 0.26}

# Words and phrases; the first entry of every list is the canonical name.
_COLOUR_WORDS = {
    "red": ["red", "scarlet"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "purple": ["purple", "violet"],
    "orange": ["orange"],
    "cyan": ["cyan", "turquoise"],
    "pink": ["pink"],
}
_BACKGROUND_WORDS = {
    "black": ["black", "dark"],
    "white": ["white"],
    "gray": ["gray", "grey"],
    "brown": ["brown"],
    "navy": ["navy"],
    "olive": ["olive"],
    "maroon": ["maroon"],
    "teal": ["teal"],
}
_SHAPE_WORDS = {
    "circle": ["circle", "disc", "ball", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "cross": ["cross", "plus sign"],
    "ring": ["ring", "hoop", "donut"],
}
_SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
# (verb phrase after a subject, adjective before a noun)
_MOTION_VERBS = {
    "left": ["moves to the left", "slides left", "travels leftward", "drifts to the left", "goes left"],
    "right": ["moves to the right", "slides right", "travels rightward", "drifts to the right", "goes right"],
    "up": ["moves up", "rises", "floats upward", "climbs", "goes up"],
    "down": ["moves down", "falls", "sinks", "drops downward", "goes down"],
    "still": ["stays still", "does not move", "sits motionless", "stays in place", "remains static"],
    "orbit": ["moves in a circle", "circles around", "goes round in a loop", "orbits the centre"],
}
_MOTION_ADJECTIVES = {
    "left": ["left-moving", "leftward-moving"],
    "right": ["right-moving", "rightward-moving"],
    "up": ["rising", "upward-moving"],
    "down": ["falling", "downward-moving"],
    "still": ["motionless", "static", "stationary"],
    "orbit": ["circling", "orbiting"],
}
_TEMPLATES = (
    "a {size} {colour} {shape} {verb} on a {bg} background",
    "{adj} {size} {colour} {shape} on a {bg} background",
    "a {bg} background with a {size} {colour} {shape} that {verb}",
    "on a {bg} backdrop a {size} {colour} {shape} {verb}",
    "the {size} {shape} is {colour} and {verb} over a {bg} background",
    "video of a {size} {colour} {shape} that {verb}, the background is {bg}",
    "a {colour} {shape}, {size} and {adj}, in front of a {bg} background",
)


@dataclass(frozen=True)
class ClipSpec:
    """The facts shown in one synthetic clip (what a caption must describe).

    Attributes:
        video_id: file stem of the clip, e.g. ``"test_0007"``.
        colour: shape colour, a key of :data:`SHAPE_COLOURS`.
        shape: one of :data:`SHAPES`.
        size: one of :data:`SIZES`.
        motion: one of :data:`MOTIONS`.
        background: a key of :data:`BACKGROUNDS`.
    """

    video_id: str
    colour: str
    shape: str
    size: str
    motion: str
    background: str

    @property
    def attributes(self) -> tuple[str, str, str, str, str]:
        """The attribute tuple ``(colour, shape, size, motion, background)``."""
        return (self.colour, self.shape, self.size, self.motion, self.background)


@dataclass(frozen=True)
class CorpusConfig:
    """Size and rendering of the synthetic corpus.

    Attributes:
        num_train: training clips.
        num_test: held-out test clips (one caption each, pairwise-distinct attribute tuples).
        max_train_captions: each training clip gets between 1 and this many captions.
        frame_size: frame side in pixels (even, as yuv420p needs).
        num_frames: frames per clip.
        fps: frame rate of the written mp4 files.
        crf: libx264 constant rate factor (lower = closer to the rendered pixels).
    """

    num_train: int = 750
    num_test: int = 250
    max_train_captions: int = 2
    frame_size: int = 32
    num_frames: int = 8
    fps: int = 4
    crf: int = 18

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"num_train and num_test must be positive, got {self.num_train}, {self.num_test}")
        if self.num_test > num_attribute_tuples():
            raise ValueError(f"num_test must be at most {num_attribute_tuples()} (distinct tuples), got {self.num_test}")
        if self.frame_size < 16 or self.frame_size % 2:
            raise ValueError(f"frame_size must be even and >= 16, got {self.frame_size}")
        if self.num_frames < 2 or self.fps < 1 or self.max_train_captions < 1:
            raise ValueError("num_frames must be >= 2, fps >= 1 and max_train_captions >= 1")

    @property
    def duration_s(self) -> float:
        """Length of every clip in seconds."""
        return self.num_frames / self.fps


@dataclass(frozen=True)
class Corpus:
    """Where a written corpus lives.

    Attributes:
        root: corpus folder.
        video_dir: folder holding the mp4 files (the ``video`` column is relative to it).
        train_csv: training annotations, columns ``video,caption``.
        test_csv: test annotations, columns ``video,caption`` (one row per test clip).
        train: training clip facts.
        test: test clip facts, in the order of ``test_csv``.
        test_captions: the caption of each test clip, in the same order.
    """

    root: Path
    video_dir: Path
    train_csv: Path
    test_csv: Path
    train: tuple[ClipSpec, ...]
    test: tuple[ClipSpec, ...]
    test_captions: tuple[str, ...]


def num_attribute_tuples() -> int:
    """How many distinct ``(colour, shape, size, motion, background)`` tuples exist."""
    return len(SHAPE_COLOURS) * len(SHAPES) * len(SIZES) * len(MOTIONS) * len(BACKGROUNDS)


def _tuple_from_index(index: int) -> tuple[str, str, str, str, str]:
    colours, backgrounds = list(SHAPE_COLOURS), list(BACKGROUNDS)
    index, c = divmod(index, len(colours))
    index, s = divmod(index, len(SHAPES))
    index, z = divmod(index, len(SIZES))
    index, m = divmod(index, len(MOTIONS))
    b = index % len(backgrounds)
    return colours[c], SHAPES[s], SIZES[z], MOTIONS[m], backgrounds[b]


def sample_clips(num: int, rng: np.random.Generator, *, prefix: str, distinct: bool) -> list[ClipSpec]:
    """Draw the facts of ``num`` clips.

    Args:
        num: number of clips.
        rng: source of randomness.
        prefix: video id prefix (``"train"`` or ``"test"``); ids are ``f"{prefix}_{i:04d}"``.
        distinct: draw attribute tuples without replacement (no two clips share all facts).

    Returns:
        ``num`` clip specs.
    """
    total = num_attribute_tuples()
    if distinct:
        indices = rng.choice(total, size=num, replace=False)
    else:
        indices = rng.integers(0, total, size=num)
    return [ClipSpec(f"{prefix}_{i:04d}", *_tuple_from_index(int(k))) for i, k in enumerate(indices)]


def caption(spec: ClipSpec, rng: np.random.Generator) -> str:
    """One caption for ``spec``: a random template filled with random synonyms of every attribute."""

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    text = pick(_TEMPLATES).format(
        size=pick(_SIZE_WORDS[spec.size]),
        colour=pick(_COLOUR_WORDS[spec.colour]),
        shape=pick(_SHAPE_WORDS[spec.shape]),
        verb=pick(_MOTION_VERBS[spec.motion]),
        adj=pick(_MOTION_ADJECTIVES[spec.motion]),
        bg=pick(_BACKGROUND_WORDS[spec.background]),
    )
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)
    return text[0].upper() + text[1:]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean coverage of ``shape`` centred at the origin; ``dx``/``dy`` are pixel offsets (y down)."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= radius**2) & (d2 >= (0.5 * radius) ** 2)
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "cross":
        arm = 0.32 * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    if shape == "triangle":
        # Upward equilateral triangle inscribed in the circle: apex (0, -r), base at y = r / 2.
        half_width = radius * math.sqrt(3) / 2
        return (dy <= radius / 2) & (np.abs(dx) <= half_width * (dy + radius) / (1.5 * radius))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _trajectory(motion: str, num_frames: int, size: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Centre of the shape in every frame, (T, 2) pixel coordinates ``(x, y)``."""
    margin = radius + 1.0
    lo, hi = margin, size - margin
    s = np.linspace(0.0, 1.0, num_frames)
    if motion == "still":
        centre = rng.uniform(lo + 0.15 * size, hi - 0.15 * size, size=2)
        return np.repeat(centre[None], num_frames, axis=0)
    if motion == "orbit":
        orbit = 0.2 * size
        centre = size / 2 + rng.uniform(-0.05, 0.05, size=2) * size
        phase = rng.uniform(0, 2 * math.pi)
        angle = phase + 2 * math.pi * s * rng.choice([-1.0, 1.0])
        return np.stack([centre[0] + orbit * np.cos(angle), centre[1] + orbit * np.sin(angle)], axis=1)
    travel = rng.uniform(0.8, 1.0) * (hi - lo)
    start = rng.uniform(lo + travel, hi)
    along = start - travel * s  # decreasing coordinate, stays within [lo, hi]
    across = np.full(num_frames, rng.uniform(lo + 0.1 * size, hi - 0.1 * size))
    if motion == "left":
        return np.stack([along, across], axis=1)
    if motion == "right":
        return np.stack([size - along, across], axis=1)
    if motion == "up":  # y grows downwards, so "up" means decreasing y
        return np.stack([across, along], axis=1)
    if motion == "down":
        return np.stack([across, size - along], axis=1)
    raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")


def render_clip(spec: ClipSpec, config: CorpusConfig, rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """Render the frames of one clip.

    Args:
        spec: what the clip shows.
        config: frame size and count.
        rng: randomness for position, speed and direction of rotation.
        supersample: anti-aliasing factor (coverage is averaged over ``supersample**2`` points per pixel).

    Returns:
        (T, H, W, 3) uint8 RGB frames.
    """
    size, num_frames = config.frame_size, config.num_frames
    radius = _RADIUS[spec.size] * size * rng.uniform(0.95, 1.05)
    centres = _trajectory(spec.motion, num_frames, size, radius, rng)
    # Sample points at the centre of each sub-pixel cell.
    grid = (np.arange(size * supersample) + 0.5) / supersample
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    background = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    colour = np.asarray(SHAPE_COLOURS[spec.colour], dtype=np.float32)
    # Faint per-clip noise so that identical facts never give byte-identical frames.
    noise = rng.normal(0.0, 3.0, size=(num_frames, size, size, 1)).astype(np.float32)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t, (cx, cy) in enumerate(centres):
        mask = _shape_mask(spec.shape, gx - cx, gy - cy, radius).astype(np.float32)
        cover = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
        frame = background * (1.0 - cover) + colour * cover + noise[t]
        frames[t] = np.clip(frame, 0, 255).round().astype(np.uint8)
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, crf: int = 18) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames as an H.264 (yuv420p) mp4 with PyAV.

    Raises:
        ValueError: when the frame sides are odd (yuv420p needs even sizes).
    """
    import av  # imported here: only the writer needs the encoder

    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread: many tiny files; threads would only add start-up cost. No lookahead and no
        # macroblock tree: on frames this small, x264's lookahead made the output depend on the
        # process (the same frames encoded in two processes gave different pixels in ~15 % of the
        # clips), so one seed did not give one corpus, and the demo's metrics moved between runs.
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1",
                          "x264-params": "threads=1:rc-lookahead=0:mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)


def write_corpus(root: str | Path, config: CorpusConfig, rng: np.random.Generator) -> Corpus:
    """Render, encode and annotate the whole corpus under ``root``.

    Layout: ``root/videos/<id>.mp4``, ``root/train.csv``, ``root/test.csv`` (columns ``video,caption``;
    ``video`` is the file name relative to ``root/videos``) and ``root/clips.jsonl`` (the facts of every
    clip, for inspection).

    Args:
        root: output folder (created).
        config: corpus size and rendering.
        rng: the only source of randomness; the same seed gives the same corpus.

    Returns:
        The written :class:`Corpus`.
    """
    root = Path(root)
    video_dir = root / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    test = sample_clips(config.num_test, rng, prefix="test", distinct=True)
    train = sample_clips(config.num_train, rng, prefix="train", distinct=False)
    train_rows: list[tuple[str, str]] = []
    for spec in train:
        for _ in range(int(rng.integers(1, config.max_train_captions + 1))):
            train_rows.append((f"{spec.video_id}.mp4", caption(spec, rng)))
    test_captions = [caption(spec, rng) for spec in test]
    for spec in [*train, *test]:
        write_mp4(video_dir / f"{spec.video_id}.mp4", render_clip(spec, config, rng), config.fps, config.crf)
    _write_csv(root / "train.csv", train_rows)
    _write_csv(root / "test.csv", [(f"{s.video_id}.mp4", c) for s, c in zip(test, test_captions)])
    with open(root / "clips.jsonl", "w", encoding="utf-8") as f:
        for split, specs in (("train", train), ("test", test)):
            for spec in specs:
                f.write(json.dumps({"split": split, **asdict(spec)}) + "\n")
    logger.info(
        "wrote %d train clips (%d captions) and %d test clips to %s",
        len(train), len(train_rows), len(test), root,
    )
    return Corpus(
        root=root,
        video_dir=video_dir,
        train_csv=root / "train.csv",
        test_csv=root / "test.csv",
        train=tuple(train),
        test=tuple(test),
        test_captions=tuple(test_captions),
    )
