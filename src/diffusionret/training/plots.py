"""PNG plots of a run, drawn from its ``metrics.jsonl`` (matplotlib, headless Agg backend).

* ``loss.png``: training losses against the optimizer step (stage 1: the contrastive loss; stage 2:
  the generation loss per direction, and the frozen contrastive loss for reference).
* ``recall.png``: recall@K of every validation/test evaluation against the epoch, for the
  discriminative (WTI) ranking and, when present, the diffusion re-ranked one, in both directions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from diffusionret.training.metric_log import read_metrics

logger = logging.getLogger(__name__)

_LOSS_KEYS = ("loss", "disc_loss", "gen_t2v", "gen_v2t")
_RECALLS = ("R1", "R5", "R10")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Loss curves of the ``train`` records; ``None`` when there is nothing to draw."""
    train = [r for r in records if r.get("kind") == "train"]
    series = {k: [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))] for k in _LOSS_KEYS}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, marker="." if len(xs) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.9)  # fixed: tight_layout is slow
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recalls(records: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Recall@K per evaluation; ``None`` if there was no evaluation.

    Colour = K, line style = ranking (solid: WTI, dashed: diffusion re-ranked), marker = split
    (circles: validation epochs, stars: the final test of the selected model).
    """
    evals = [r for r in records if r.get("kind") in ("val", "test")]
    if not evals:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colours = dict(zip(_RECALLS, ("tab:blue", "tab:orange", "tab:green")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction in zip(axes, ("t2v", "v2t")):
        for prefix, style in (("", "-"), ("rerank/", "--")):
            for k in _RECALLS:
                key = f"{prefix}{direction}/{k}"
                for kind, marker, size in (("val", "o", 5), ("test", "*", 12)):
                    points = [(r["epoch"] if r.get("epoch") is not None else r["step"], r[key])
                              for r in evals if r["kind"] == kind and isinstance(r.get(key), (int, float))]
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, linestyle=style if kind == "val" else "none", marker=marker,
                                markersize=size, color=colours[k])
        ax.set_title({"t2v": "text -> video", "v2t": "video -> text"}[direction])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    handles = [Line2D([], [], color=c, label=k.replace("R", "R@")) for k, c in colours.items()]
    handles += [Line2D([], [], color="gray", linestyle="-", label="WTI"),
                Line2D([], [], color="gray", linestyle="--", label="re-ranked"),
                Line2D([], [], color="gray", linestyle="none", marker="o", label="validation"),
                Line2D([], [], color="gray", linestyle="none", marker="*", markersize=10, label="test (selected)")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small", frameon=False)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.22, top=0.9, wspace=0.08)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Redraw every plot of a run folder into ``<run_dir>/plots``; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [p for p in (plot_losses(records, out_dir / "loss.png"), plot_recalls(records, out_dir / "recall.png"))
               if p is not None]
    logger.debug("plots written: %s", [str(p) for p in written])
    return written
