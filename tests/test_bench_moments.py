"""benchmarks/bench_moments.py on a small version: 3 long videos of 3 clips, a tiny model."""

from __future__ import annotations

import csv
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

from diffusionret.demo.corpus import write_mp4
from diffusionret.inputs import InputConfig
from diffusionret.models.checkpoint import save_model
from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_moments  # noqa: E402


def _fake_demo(root: Path, clips: int = 9) -> Path:
    """A demo-shaped folder: stage2/model.safetensors (tiny, with its input config), test clips and captions."""
    model = build_model(ModelConfig.tiny(denoisers=True), generator=torch.Generator().manual_seed(0))
    (root / "stage2").mkdir(parents=True)
    save_model(model, root / "stage2" / "model.safetensors",
               input_config=InputConfig(max_frames=4, fps=4.0, size=32, max_words=16))
    videos = root / "corpus" / "videos"
    videos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        colour = rng.integers(0, 255, size=3)
        frames = np.empty((4, 32, 32, 3), dtype=np.uint8)
        frames[:] = colour
        frames[:, 8 + i % 3 * 4:20 + i % 3 * 4, 10:22] = 255 - colour
        write_mp4(videos / f"test_{i:04d}.mp4", frames, fps=4)
        rows.append({"video": f"test_{i:04d}.mp4", "caption": f"clip number {i} in colour {colour.tolist()}"})
    with open(root / "corpus" / "test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_small_moment_benchmark(tmp_path: Path) -> None:
    demo = _fake_demo(tmp_path / "demo")
    results = bench_moments.run(demo, tmp_path / "out", num_videos=3, clips_per_video=3, modes=["whole", "fixed"],
                                rerank_top_k=4, speedup_videos=1)
    assert results["queries"] == 9 and results["settings"]["span_s"] == 1.0
    long_videos = sorted((tmp_path / "out" / "long").glob("*.mp4"))
    assert len(long_videos) == 3
    assert results["whole"]["segments"] == 3
    # 3 s videos, 1 s windows every 0.5 s: starts 0, 0.5, ..., 2.0.
    assert results["fixed"]["segments"] == 3 * 5
    for mode in ("whole", "fixed"):
        for name in ("wti", "rerank"):
            row = results[mode][name]
            assert set(row) == {"video_R1", "video_R5", "mean_IoU_top1", "moment_R1@0.5", "moment_R5@0.5",
                                "moment_R1@0.7", "moment_R5@0.7"}
            assert 0 <= row["moment_R1@0.7"] <= row["moment_R1@0.5"] <= row["video_R1"] <= row["video_R5"] <= 100
            assert 0 <= row["mean_IoU_top1"] <= 1
        assert results[mode]["throughput_video_s_per_cpu_s"] > 0
    # A whole 3 s video never overlaps a 1 s clip by IoU 0.5: only segments can find the moment.
    assert results["whole"]["wti"]["moment_R5@0.5"] == 0
    assert results["whole"]["wti"]["mean_IoU_top1"] <= 1 / 3 + 1e-9
    speed = results["speedup"]
    assert speed["windows"] == 5 and speed["max_abs_feature_diff"] < 1e-4


def test_moment_metrics_on_known_moments() -> None:
    def moment(video: str, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(video_id=video, start=start, end=end)

    results = [[moment("a", 0, 2), moment("b", 0, 2)],     # exact
               [moment("a", 1, 3)],                        # right video, IoU 1/3
               [moment("b", 2, 4), moment("a", 1, 3)]]     # right video second, IoU 1/3
    metrics = bench_moments.moment_metrics(results, [("a", 0.0, 2.0)] * 3)
    assert metrics["video_R1"] == round(200 / 3, 2) and metrics["video_R5"] == 100.0
    assert metrics["moment_R1@0.5"] == metrics["moment_R5@0.5"] == round(100 / 3, 2)
    assert metrics["mean_IoU_top1"] == round((1 + 1 / 3 + 0) / 3, 4)
