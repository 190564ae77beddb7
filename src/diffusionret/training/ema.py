"""Exponential moving average of the trainable weights (the reference's ``--moment``, docs/reference.md §4.2).

The reference kept a second model built from scratch, so the EMA of its randomly initialised parts
started from *different* random values (docs/reference.md §8.16), and averaged frozen weights too. Here the
average starts from the model's own weights and covers only trainable parameters (frozen ones would
average to themselves); evaluation swaps the averaged weights in and back out.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ModelEMA:
    """``ema <- decay * ema + (1 - decay) * param`` after every optimizer step.

    Args:
        model: the (unwrapped) model whose trainable parameters are averaged.
        decay: in ``[0, 1)``; the reference uses 0.99.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # float32 shadows: averaging in half precision loses the small (1 - decay) increments.
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) - set(shadow)
        unexpected = set(shadow) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        for name, value in shadow.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (for evaluation or saving)."""
        backup: dict[str, torch.Tensor] = {}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.shadow.items():
                backup[name] = params[name].detach().clone()
                params[name].copy_(value.to(params[name].dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)
