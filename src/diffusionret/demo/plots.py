"""The demo's figures: recall with and without re-ranking, both training curves, the example query."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from diffusionret.demo.corpus import Corpus
    from diffusionret.demo.pipeline import QueryAnswer

logger = logging.getLogger(__name__)

_KS = ("R1", "R5", "R10")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless
    import matplotlib.pyplot as plt

    return plt


def plot_recall(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars: R@1/5/10 of the WTI ranking vs the re-ranked one, for both directions."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    x = np.arange(len(_KS))
    sources = [("WTI (stage 1)", results)]
    if "rerank" in results:
        sources.append(("WTI + diffusion re-ranking", results["rerank"]))
    width = 0.8 / len(sources)
    for ax, direction in zip(axes, ("t2v", "v2t")):
        for i, (label, res) in enumerate(sources):
            values = [res[direction][k] for k in _KS]
            bars = ax.bar(x + (i - (len(sources) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(100.0 / max(1, results["num_videos"]), color="grey", ls=":", lw=1, label="chance R@1")
        ax.set_xticks(x, [k.replace("R", "R@") for k in _KS])
        ax.set_title({"t2v": "text -> video", "v2t": "video -> text"}[direction])
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"recall (%), {results['num_videos']} test videos")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training(out_dir: Path, path: Path) -> Path | None:
    """Stage-1 contrastive loss and stage-2 generation losses against the optimizer step."""
    from diffusionret.training.metric_log import read_metrics

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    drawn = False
    for ax, (stage, keys) in zip(axes, (("stage1", ("loss",)), ("stage2", ("gen_t2v", "gen_v2t")))):
        records = [r for r in read_metrics(out_dir / stage / "metrics.jsonl") if r.get("kind") == "train"]
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key)
                drawn = True
        ax.set_title({"stage1": "stage 1: contrastive (InfoNCE)", "stage2": "stage 2: generation"}[stage])
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path if drawn else None


def _middle_frames(video: Path, count: int = 4) -> np.ndarray:
    """``count`` evenly spaced RGB frames of ``video`` side by side: (H, count * W, 3) uint8."""
    import av

    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return np.concatenate([frames[i] for i in picks], axis=1)


def plot_query(answer: QueryAnswer, corpus: Corpus, path: Path) -> Path:
    """The query and its top-5 clips (four frames each), the target clip marked."""
    plt = _pyplot()
    hits = answer.hits
    fig, axes = plt.subplots(len(hits), 1, figsize=(6, 1.25 * len(hits) + 0.6))
    axes = np.atleast_1d(axes)
    for ax, hit in zip(axes, hits):
        name = Path(hit.video_id).name
        file = corpus.video_dir / (name if name.endswith(".mp4") else f"{name}.mp4")
        ax.imshow(_middle_frames(file), interpolation="nearest")
        mark = "  <- target" if answer.target is not None and Path(name).stem == answer.target else ""
        ax.set_title(f"#{hit.rank} {name} score {hit.score:.3f} (WTI {hit.wti_score:.3f}){mark}", fontsize=8,
                     loc="left", color="green" if mark else "black")
        ax.axis("off")
    fig.suptitle(f"query: {answer.query!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_demo(out_dir: Path, results: dict[str, Any], answer: QueryAnswer, corpus: Corpus) -> list[Path]:
    """Write every demo figure into ``out_dir/plots``; returns the files."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = [plot_recall(results, plots / "recall.png"), plot_training(out_dir, plots / "training.png"),
               plot_query(answer, corpus, plots / "query.png")]
    return [p for p in written if p is not None]
