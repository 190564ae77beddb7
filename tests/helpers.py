"""Small helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMOKE1 = ROOT / "configs" / "smoke_stage1.yaml"
SMOKE2 = ROOT / "configs" / "smoke_stage2.yaml"

_COLOURS = [(230, 30, 30), (30, 200, 40), (40, 90, 255), (250, 230, 20), (150, 40, 220), (255, 140, 0),
            (0, 225, 230), (255, 120, 200), (120, 120, 120), (105, 60, 25), (255, 255, 255), (20, 20, 20)]
_COLOUR_NAMES = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "gray", "brown", "white",
                 "black"]
_WORDS = ["red", "green", "blue", "circle", "square", "ring", "left", "right", "up", "down", "small", "large"]


@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """``cli.main`` installs its own root log handler; put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def require_faiss():
    """FAISS, which the ``test`` extra installs: the tests that need it fail, never skip, where it is missing."""
    import faiss

    return faiss


def write_smoke_corpus(root: Path) -> Path:
    """12 tiny videos (32x32, 8 frames at 4 fps) and train/val/test CSVs in the ``custom`` format.

    Train has 10 records over 8 videos (two videos have two captions, so batches can hold
    duplicates), val 2 videos, test 2 videos with 3 captions (a multi-caption video). The videos
    are lossless (libx264rgb, crf 0), so their decoded pixels do not depend on the encoder's
    version: the smoke runs' losses (tests/data/smoke_losses.json) depend only on the maths.
    """
    from diffusionret.testing.videos import write_video

    videos = root / "videos"
    for i, colour in enumerate(_COLOURS):
        frames = []
        for f in range(8):
            frame = np.zeros((32, 32, 3), dtype=np.uint8)
            frame[:] = colour
            x = (f * 3 + i) % 24
            frame[8:16, x:x + 8] = 255 - np.array(colour, dtype=np.uint8)
            frames.append(frame)
        write_video(videos / f"v{i}.mp4", frames, fps=4, codec="libx264rgb", options={"crf": "0"})
    anno = root / "annotations"
    anno.mkdir(parents=True, exist_ok=True)
    train = [(f"v{i}", f"a {_COLOUR_NAMES[i]} clip with a moving square") for i in range(8)]
    train += [("v0", f"{_COLOUR_NAMES[0]} background"), ("v3", f"{_COLOUR_NAMES[3]} background")]
    val = [(f"v{i}", f"a {_COLOUR_NAMES[i]} video") for i in (8, 9)]
    test = [("v10", "a white video"), ("v11", "a black video"), ("v11", "something dark moving")]
    for name, rows in (("train", train), ("val", val), ("test", test)):
        lines = ["video,caption"] + [f"{v},{c}" for v, c in rows]
        (anno / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return root


def make_videos(folder: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` fake video files (bytes only, for the synthetic extractor) with distinct word-based
    names, some in sub-folders."""
    paths = []
    for i in range(start, start + count):
        name = f"{_WORDS[i % 12]}_{_WORDS[(i * 5 + 3) % 12]}_{i:03d}.mp4"
        path = folder / (f"part{i % 3}" if i % 2 else "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"video {i} ".encode() * (i + 1))
        paths.append(path)
    return paths


def assert_json_error(response, status: int) -> dict:
    """``response`` (an httpx response) is the API's JSON error with ``status``: ``{"error", "detail"}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    return body


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``diffusionret ARGV`` in-process: (exit code, stdout, stderr)."""
    import io

    from diffusionret.cli import main

    out, err = io.StringIO(), io.StringIO()
    with cli_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def save_tiny_model(folder: Path) -> Path:
    """A tiny generation-stage model (seeded) saved as ``folder/tiny.safetensors``."""
    import torch

    from diffusionret.models.checkpoint import save_model
    from diffusionret.models.config import ModelConfig
    from diffusionret.models.factory import build_model

    model = build_model(ModelConfig.tiny(denoisers=True), generator=torch.Generator().manual_seed(0))
    return save_model(model, folder / "tiny.safetensors")


def run_two_ranks(rank_main, expect_errors: bool = False) -> dict[int, object]:
    """``rank_main(rank, agree)`` on two threads, as two ranks would; their results (with
    ``expect_errors``: the exception each rank raised, by rank).

    ``agree(failed)`` is a real two-party agreement (a barrier and a shared flag per round): it
    returns on both threads whether either passed ``True``, like ``distributed.any_rank``. An
    exception on either rank also aborts the barrier (so the other rank does not wait forever) and
    fails the test.
    """
    barrier = threading.Barrier(2, timeout=60)
    lock = threading.Lock()
    rounds: dict[int, bool] = {}
    results: dict[int, object] = {}
    errors: dict[int, BaseException] = {}

    def agreement() -> object:
        calls = [0]

        def agree(failed: bool) -> bool:
            calls[0] += 1
            with lock:
                rounds[calls[0]] = rounds.get(calls[0], False) or failed
            barrier.wait()
            return rounds[calls[0]]

        return agree

    def run(rank: int) -> None:
        try:
            results[rank] = rank_main(rank, agreement())
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors[rank] = exc
            if not expect_errors:
                barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if expect_errors:
        return errors  # type: ignore[return-value]
    assert not errors, errors
    return results


def wait_for(condition, what: str, timeout: float = 120.0, interval: float = 0.01) -> None:
    """Poll ``condition()`` until it is true. The timeout only keeps a broken test from hanging:
    it is generous, and no test's outcome depends on how fast the condition comes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def running_server(app, make_config=None) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the port.

    ``make_config(port) -> uvicorn.Config`` replaces the default config (e.g. to set limits, or
    ``log_config=None`` so that uvicorn's log records reach ``caplog``).
    """
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(port) if make_config else uvicorn.Config(app, host="127.0.0.1", port=port,
                                                                  log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "the server to start")
    assert thread.is_alive(), "server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=60)


# ------------------------------------------------------------------------------ index comparisons
def snapshot(root: Path) -> dict[str, tuple]:
    """Everything an index holds, keyed by path and independent of shard layout."""
    from diffusionret.index.store import VideoIndex

    index = VideoIndex.load(root)
    result = {}
    for row, r in enumerate(index.records):
        result[r.path] = (
            r.id, r.size, r.mtime_ns, r.duration, r.width, r.height, r.num_frames,
            index.frames[row].clone(), index.frame_mask[row].clone(), index.pooled[row].clone(), index.thumbnail(r.id),
        )
    return result


def assert_same_index(a: Path, b: Path) -> None:
    """Two indexes hold the same videos with the same features, metadata and thumbnails."""
    import torch

    left, right = snapshot(a), snapshot(b)
    assert sorted(left) == sorted(right)
    for path in left:
        for x, y in zip(left[path], right[path], strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), path
            else:
                assert x == y, path


def shard_consistency(root: Path) -> None:
    """Every shard file is registered, every registered live shard exists, no temp files remain."""
    from diffusionret.index import catalog
    from diffusionret.index.shards import SHARD_DIR

    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        known = catalog.shard_names(conn)
        live = catalog.live_rows(conn)
        sizes = catalog.shard_sizes(conn)
    on_disk = {p.name for p in (root / SHARD_DIR).iterdir()}
    assert on_disk == known, (on_disk, known)
    assert all(count == sizes[name] for name, count in live.items()), "dead rows left after compaction"


# ------------------------------------------------------------------------------ hostile media corpus
def segment_spans(root: Path) -> dict[str, list[tuple[float, float]]]:
    """The catalogue's segments of the index at ``root``: file name -> ``[(start_s, end_s), ...]`` in order."""
    from diffusionret.index import catalog

    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        names = {r.id: Path(r.path).name for r in catalog.list_records(conn)}
        out: dict[str, list[tuple[float, float]]] = {}
        for vid, start, end in conn.execute("SELECT video_id, start_s, end_s FROM segments ORDER BY video_id, start_s"):
            out.setdefault(names[vid], []).append((start, end))
    return out


def write_tiny_video(path, *, frames: int = 20, fps: int = 10, size: int = 32, fmt: str | None = None,
                     codec: str = "libx264", pts: list[int] | None = None):
    """A small real video (PyAV): frame ``i`` is a flat grey ``10 * i``; ``pts`` overrides the timestamps
    (in units of ``1 / fps``) to craft timelines with gaps. Returns ``path``."""
    from fractions import Fraction
    from pathlib import Path

    import av
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, fps)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), (10 * i) % 256, np.uint8), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_shot_video(path, cuts_at: list[int], num_frames: int, fps: int = 10, *, flat: bool = False):
    """Shots of flat colours that change at the frame numbers ``cuts_at``, each with a small moving white
    square (``flat``: no square). Hue, saturation and brightness all change at a cut, as PySceneDetect's
    ContentDetector weighs them. Returns ``path``."""
    import numpy as np

    from diffusionret.testing.videos import write_video

    palette = [(230, 40, 40), (20, 70, 20), (240, 240, 140), (20, 20, 110), (200, 200, 200)]
    frames = []
    shot = 0
    for i in range(num_frames):
        while shot < len(cuts_at) and i >= cuts_at[shot]:
            shot += 1
        frame = np.empty((64, 96, 3), dtype=np.uint8)
        frame[:] = palette[shot % len(palette)]
        if not flat:
            x = 5 + (i * 3) % 70
            frame[20:36, x:x + 16] = 255
        frames.append(frame)
    return write_video(path, frames, fps=fps)


def lying_duration_mkv(path, seconds: float = 4.3e9):
    """A 2-second Matroska file whose header claims ``seconds`` (default: 136 years)."""
    import struct

    write_tiny_video(path, fmt="matroska")
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89")  # the Segment Info Duration element (float, in milliseconds)
    assert at >= 0 and data[at + 2] in (0x84, 0x88), "unexpected Matroska layout"
    if data[at + 2] == 0x88:
        data[at + 3:at + 11] = struct.pack(">d", seconds * 1000)
    else:
        data[at + 3:at + 7] = struct.pack(">f", seconds * 1000)
    path.write_bytes(bytes(data))
    return path


def lying_duration_mp4(path):
    """An MP4 whose movie and media headers claim a duration of 2^32 - 16 time units."""
    import struct

    write_tiny_video(path)
    data = bytearray(path.read_bytes())
    for box in (b"mvhd", b"mdhd"):
        at = data.find(box)
        assert at >= 0 and data[at + 4] == 0, "unexpected MP4 layout"
        data[at + 20:at + 24] = struct.pack(">I", 0xFFFFFFF0)  # version 0: the 32-bit duration
    path.write_bytes(bytes(data))
    return path


def absurd_resolution_mkv(path, side: int = 16000):
    """A Motion-JPEG Matroska file whose JPEG headers claim ``side x side`` frames."""
    import struct

    write_tiny_video(path, fmt="matroska", codec="mjpeg", frames=5)
    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\xc0")
    assert at >= 0
    while at >= 0:  # SOF0: marker, length (2), precision (1), height (2), width (2)
        data[at + 5:at + 9] = struct.pack(">HH", side, side)
        at = data.find(b"\xff\xc0", at + 2)
    path.write_bytes(bytes(data))
    return path


def hostile_corpus(folder):
    """Good, lying and broken videos side by side: ``(decodable paths, broken paths)``.

    The header-lying files hold real frames (the index must trust those over the header), the
    others cannot be indexed at all.
    """
    from pathlib import Path

    folder = Path(folder)
    decodable = [write_tiny_video(folder / f"good_{i}.mp4", frames=10 + 5 * i) for i in range(3)]
    decodable += [lying_duration_mkv(folder / "lying_136_years.mkv"), lying_duration_mp4(folder / "lying_header.mp4")]
    whole = write_tiny_video(folder / ".whole.mkv", fmt="matroska", frames=60).read_bytes()
    (folder / ".whole.mkv").unlink()
    (folder / "truncated.mkv").write_bytes(whole[: len(whole) // 2])
    (folder / "zero_bytes.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is a text file, not a video\n")
    broken = [absurd_resolution_mkv(folder / "huge_frames.mkv"), folder / "truncated.mkv",
              folder / "zero_bytes.mp4", folder / "notes.mp4"]
    return decodable, broken


def worker_pid(_item):
    """The pid of the process running a job (for worker-reuse tests of the isolated pool)."""
    import os

    return os.getpid()


def paced_job(item, progress):
    """A fake decoder for the isolated pool's progress budget (runs in a worker).

    ``item = (steps, step_s, media_per_step, stall_after)``: ``steps`` times, sleep ``step_s`` and report
    ``media_per_step`` more seconds of media decoded; after ``stall_after`` steps (``None``: never) hang.
    """
    steps, step_s, media_per_step, stall_after = item
    for step in range(steps):
        if step == stall_after:
            time.sleep(600)
        time.sleep(step_s)
        progress((step + 1) * media_per_step)
    return "done"


def slowed_decode(request, progress, delay_s=0.0, stall_after=None, only=None):
    """The index's real decode job with every frame along the timeline slowed by ``delay_s`` seconds, and
    hung for good after ``stall_after`` frames (``None``: never): a slow or stuck decoder (runs in a worker).
    ``only``: slow down only the file of that name (the others decode as usual)."""
    from pathlib import Path

    from diffusionret.index.segment_job import decode_any

    if only is not None and Path(request.clip.path).name != only:
        return decode_any(request, progress)
    frames = 0

    def slow(media_s):
        nonlocal frames
        frames += 1
        if stall_after is not None and frames > stall_after:
            time.sleep(600)
        time.sleep(delay_s)
        progress(media_s)

    return decode_any(request, slow)


def padded_wti(model, tokens, tmask, video, vmask, frame_weights=None):
    """WTI over every padded position in one block (docs/reference.md §1.4 as written, vectorised): the
    computation before length bucketing. (Nt, L, D), (Nt, L), (Nv, T, D), (Nv, T) -> (Nt, Nv)."""
    import torch
    import torch.nn.functional as F

    from diffusionret.models.similarity import token_weights

    video_w = token_weights(model.video_weight_fc, video, vmask) if frame_weights is None else frame_weights
    text_w = token_weights(model.text_weight_fc, tokens, tmask)
    s = torch.einsum("ald,btd->albt", F.normalize(tokens, dim=-1), F.normalize(video, dim=-1))
    s = s * tmask[:, :, None, None] * vmask[None, None]  # padded pairs score exactly 0: the zero floor
    t2v = torch.einsum("al,alb->ab", text_w, s.amax(dim=3))
    v2t = torch.einsum("bt,abt->ab", video_w, s.amax(dim=1))
    return (t2v + v2t) / 2


def random_mask(g, rows, length, kind):
    """(rows, length) 0/1: ``prefix`` real lengths from 0 to L, or ``scattered`` valid positions anywhere;
    row 0 is forced all-padded and row 1 full when there are enough rows (the two edge cases)."""
    import torch

    if kind == "prefix":
        lengths = torch.randint(0, length + 1, (rows,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
    else:
        mask = (torch.rand(rows, length, generator=g) < torch.rand(rows, 1, generator=g)).long()
    if rows >= 3:
        mask[0] = 0
        mask[1] = 1
    return mask


def wti_problem(model, nt, nv, length, frames, text_kind, video_kind, precomputed, seed):
    """A seeded WTI problem of random D=64 features and :func:`random_mask` masks, with its
    :func:`padded_wti` scores. Returns ``(tokens, tmask, video, vmask, frame_weights or None, expected)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens, video = torch.randn(nt, length, 64, generator=g), torch.randn(nv, frames, 64, generator=g)
    tmask, vmask = random_mask(g, nt, length, text_kind), random_mask(g, nv, frames, video_kind)
    with torch.no_grad():
        fw = model.frame_weights(video, vmask) if precomputed else None
        expected = padded_wti(model, tokens, tmask, video, vmask)
    return tokens, tmask, video, vmask, fw, expected
