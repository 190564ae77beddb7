"""Trainer checkpoints: everything needed to continue a killed run exactly where it stopped.

One ``torch.save`` file (read back with ``weights_only=True``; no pickled code) holding

* ``model``: the unwrapped model's ``state_dict`` (no ``module.`` prefix) and ``model_config``
  (so the file alone rebuilds the network, and ``diffusionret eval`` can read it);
* ``optimizer``, ``scheduler``, ``scaler`` (fp16 loss scaling), ``ema`` (or ``None``);
* ``rng``: one entry per rank (Python, NumPy, torch CPU/CUDA and the stage's own generators);
* ``progress``: optimizer steps done, epoch, steps done inside that epoch, best validation score;
* ``run_config``: the resolved run config as a plain dict.

Files are written to a temporary name in the same folder and renamed, so a kill during the write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from diffusionret.config_utils import atomic_path
from diffusionret.models.checkpoint import (TRAINER_FORMAT, TRAINER_FORMAT_VERSION, is_trainer_checkpoint,
                                            model_from_trainer_checkpoint)
from diffusionret.models.safe_load import torch_load_weights

logger = logging.getLogger(__name__)

# Reading a trainer checkpoint's *model* is the model loader's job (diffusionret.models.checkpoint,
# which reads every format); this module writes checkpoints and restores the training state.
__all__ = ["TRAINER_FORMAT", "TRAINER_FORMAT_VERSION", "TrainProgress", "atomic_torch_save", "capture_rng_state",
           "is_trainer_checkpoint", "load_trainer_checkpoint", "model_from_trainer_checkpoint", "restore_rng_state",
           "save_trainer_checkpoint", "unwrap_model"]


@dataclass
class TrainProgress:
    """Where a run stands. ``epoch`` is the epoch in progress; ``step_in_epoch`` its finished steps;
    ``validation_pending``: the checkpoint was written at the end of an epoch, before its validation
    (a resumed run validates first)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    best_source: str | None = None
    validation_pending: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainProgress":
        return cls(**dict(data))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's random-number state (Python, NumPy, torch CPU and CUDA, named generators)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray; stored as a list so weights_only loading accepts it.
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; generators are restored in place."""
    version, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state((version, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    for name, gen in (generators or {}).items():
        saved = state["generators"].get(name)
        if saved is None:
            raise KeyError(f"checkpoint has no state for generator {name!r}")
        gen.set_state(saved)


def _as_tuple(value: Any) -> Any:
    # random.setstate needs tuples; a round trip through some serialisers yields lists.
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the destination folder, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_trainer_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: Any, scaler: Any | None, ema: Any | None, rng: list[dict[str, Any]],
                            progress: TrainProgress, run_config: Mapping[str, Any]) -> Path:
    """Write a complete trainer checkpoint atomically (call on rank 0 only).

    Args:
        model: the model (wrappers are removed here).
        rng: one :func:`capture_rng_state` per rank, in rank order.
    """
    from diffusionret.config_utils import to_dict

    bare = unwrap_model(model)
    payload = {
        "format": TRAINER_FORMAT,
        "format_version": TRAINER_FORMAT_VERSION,
        "model_config": to_dict(bare.config),
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng,
        "progress": progress.to_dict(),
        "run_config": dict(run_config),
    }
    out = atomic_torch_save(payload, path)
    logger.info("checkpoint written: %s (step %d)", out, progress.step)
    return out


def load_trainer_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a trainer checkpoint (on CPU) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch_load_weights(path)
    if not is_trainer_checkpoint(payload):
        raise ValueError(f"{path}: not a diffusionret trainer checkpoint")
    if payload["format_version"] != TRAINER_FORMAT_VERSION:
        raise ValueError(f"{path}: trainer checkpoint version {payload['format_version']} is not supported "
                         f"(expected {TRAINER_FORMAT_VERSION})")
    return payload
