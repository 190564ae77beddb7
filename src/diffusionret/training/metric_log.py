"""Run metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard when installed.

Each record is ``{"kind": ..., "step": ..., "epoch": ..., "time": ..., <name>: <number>, ...}`` where
``kind`` is ``train`` (running losses), ``val`` / ``test`` (evaluation metrics, flattened as
``t2v/R1``, ``rerank/v2t/R5`` ...) or ``event`` (checkpoints, model selection). The plots in
:mod:`diffusionret.training.plots` are drawn from this file alone, so they can be redrawn for any
finished or running run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"t2v": {"R1": 40.1}}`` -> ``{"t2v/R1": 40.1}`` (nested mappings joined with ``/``)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a truncated last line from a killed run is ignored)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping an unreadable line (interrupted write?)", path)
    return records


class MetricLogger:
    """Appends metric records to ``<run_dir>/metrics.jsonl`` and, if possible, TensorBoard.

    Args:
        run_dir: the run folder.
        enabled: ``False`` on non-zero ranks (nothing is written).
        tensorboard: try to open a TensorBoard writer in ``<run_dir>/tensorboard``; silently
            skipped (one info line) when the ``tensorboard`` package is not installed.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._writer: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, kind: str, step: int, values: Mapping[str, Any], epoch: int | None = None) -> None:
        """Append one record; nested mappings are flattened, non-finite floats become ``null``."""
        if not self.enabled:
            return
        flat = flatten_metrics(values)
        record: dict[str, Any] = {"kind": kind, "step": int(step), "epoch": epoch, "time": round(time.time(), 3)}
        for key, value in flat.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self._writer is not None:
            for key, value in flat.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
