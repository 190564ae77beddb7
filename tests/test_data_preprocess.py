"""``diffusionret preprocess`` end to end: frame rate, sizes (portrait too), failures, resume after a kill."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusionret.cli import main
from diffusionret.data import probe_video, read_frames
from diffusionret.data.preprocess import PARTIAL_SUFFIX, output_size, preprocess_videos
from diffusionret.testing.videos import read_index, write_index_video, write_video
from helpers import wait_for


@pytest.mark.parametrize(
    ("size", "short", "expected"),
    [
        ((640, 360), 224, (398, 224)),  # landscape: height 224, even width (as the reference)
        ((360, 640), 224, (224, 398)),  # portrait: width 224 (the reference made it 224 x 126)
        ((480, 480), 224, (224, 224)),
        ((64, 48), 48, (64, 48)),
        ((65, 49), 30, (38, 30)),
        ((100, 30), 3, (10, 2)),  # odd short side -> even
    ],
)
def test_output_size(size, short, expected):
    assert output_size(*size, short) == expected


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    write_index_video(src / "land.mp4", 25, fps=10)  # 64x48, 2.5 s
    write_index_video(src / "nested" / "port.mov", 25, fps=10, width=48, height=64)
    write_index_video(src / "nested" / "rot.mkv", 25, fps=10, width=48, height=64, rotation=90)
    write_index_video(src / "big.avi", 7, fps=7, width=128, height=96)
    (src / "broken.mp4").write_text("not a video")
    (src / "readme.txt").write_text("ignored: not a video extension")
    return src


def test_preprocess_end_to_end(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["preprocess", str(inputs), str(out), "--fps", "3", "--short-side", "48", "--workers", "2",
                 "--no-progress"])
    assert code == 1  # one input failed
    printed = capsys.readouterr().out
    assert "5 videos: 4 encoded, 0 already done, 1 failed" in printed and "broken.mp4" in printed
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert made == ["big.mp4", "land.mp4", "nested/port.mp4", "nested/rot.mp4"]  # tree mirrored, .mp4
    for name, size in (("land", (64, 48)), ("nested/port", (48, 64)), ("nested/rot", (48, 64)), ("big", (64, 48))):
        info = probe_video(out / f"{name}.mp4")
        assert (info.width, info.height) == size and info.rotation == 0 and info.avg_fps == pytest.approx(3)
    # Frame k of the output is the input frame displayed at k / 3 s: index floor(10 k / 3); 2.5 s -> 8 frames.
    for name in ("land", "nested/port", "nested/rot"):
        frames, times = read_frames(out / f"{name}.mp4", fps=3, max_frames=100, size=None)
        assert [read_index(f) for f in frames] == [10 * k // 3 for k in range(math.ceil(2.5 * 3))]
        np.testing.assert_allclose(times, np.arange(8) / 3, atol=1e-3)
    assert probe_video(out / "big.mp4").num_frames == 3  # 1 s at 3 fps
    # Running again skips everything that is done and still reports the failure.
    assert main(["preprocess", str(inputs), str(out), "--short-side", "48", "--workers", "1", "--no-progress"]) == 1
    assert "0 encoded, 4 already done, 1 failed" in capsys.readouterr().out


def test_invalid_existing_output_is_redone(inputs, tmp_path):
    out = tmp_path / "out"
    (inputs / "broken.mp4").unlink()
    out.mkdir()
    (out / "land.mp4").write_bytes(b"")  # e.g. a file from an old run that died mid-copy
    report = preprocess_videos(inputs, out, short_side=48, workers=1, progress=False)
    assert len(report.done) == 4 and not report.skipped and not report.failed
    assert probe_video(out / "land.mp4").num_frames == 8


def test_name_collision_and_bad_arguments(tmp_path):
    src = tmp_path / "in"
    write_index_video(src / "a.mp4", 3, fps=10)
    shutil.copy(src / "a.mp4", src / "a.mkv")
    report = preprocess_videos(src, tmp_path / "out", short_side=48, workers=1, progress=False)
    assert len(report.done) == 1 and "collides" in report.failed[0].error
    with pytest.raises(ValueError, match="must differ"):
        preprocess_videos(src, src, workers=1, progress=False)
    with pytest.raises(FileNotFoundError):
        preprocess_videos(tmp_path / "nowhere", tmp_path / "out", workers=1, progress=False)


# ``diffusionret preprocess`` that, at the 5th frame of its 3rd video, says so through a marker file
# and blocks: the test's SIGKILL then lands inside a transcode, whatever the machine's load.
_PREPROCESS_SCRIPT = """
import sys, threading
from pathlib import Path
from diffusionret.cli import main
from diffusionret.data import preprocess
real_transcode, real_convert = preprocess.transcode_video, preprocess._convert
state = {"videos": 0, "frames": 0}
def transcode(*args, **kwargs):
    state["videos"] += 1
    state["frames"] = 0
    return real_transcode(*args, **kwargs)
def convert(*args, **kwargs):
    state["frames"] += 1
    if state["videos"] == 3 and state["frames"] == 5:
        Path(sys.argv[3]).write_text("inside the 3rd video")
        threading.Event().wait()
    return real_convert(*args, **kwargs)
preprocess.transcode_video, preprocess._convert = transcode, convert
sys.exit(main(["preprocess", sys.argv[1], sys.argv[2], "--workers", "1", "--no-progress"]))
"""


def test_resume_after_killed_run(tmp_path):
    src, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "inside-clip2"
    # Eight copies of a 6 s, 30 fps, 320x240 clip.
    frames = (np.full((240, 320, 3), (k * 7) % 256, np.uint8) for k in range(180))
    first = write_video(src / "clip0.mp4", frames, fps=30, options={"preset": "ultrafast"})
    for k in range(1, 8):
        shutil.copy(first, src / f"clip{k}.mp4")
    proc = subprocess.Popen([sys.executable, "-c", _PREPROCESS_SCRIPT, str(src), str(out), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, "preprocess to reach its 3rd video")
        assert proc.poll() is None, "preprocess ended before it could be killed"
    finally:
        proc.kill()  # SIGKILL: no cleanup handlers run
        proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("clip*.mp4")}
    assert sorted(finished) == ["clip0.mp4", "clip1.mp4"]  # clip2 was being written
    for name in finished:  # what was renamed into place is complete
        assert probe_video(out / name).num_frames == 18
    report = preprocess_videos(src, out, workers=2, progress=False)
    assert sorted(Path(r.output).name for r in report.skipped) == sorted(finished)
    assert len(report.done) == 8 - len(finished) and not report.failed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("clip*.mp4") if p.name in finished} == finished
    assert sorted(p.name for p in out.iterdir()) == [f"clip{k}.mp4" for k in range(8)]  # no partial files left
    assert not list(out.glob(f"*{PARTIAL_SUFFIX}"))
    for k in range(8):
        info = probe_video(out / f"clip{k}.mp4")
        assert info.num_frames == 18 and (info.width, info.height) == (298, 224)
    assert os.path.getsize(out / "clip0.mp4") > 0
