"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule.

The reference's BertAdam (docs/reference.md §4.3) is replaced by ``torch.optim.AdamW`` (decoupled weight decay,
bias-corrected moments), keeping its hyperparameters and its parameter grouping:

* CLIP parameters (names starting with ``clip.``) train at ``lr * clip_lr_scale`` (reference:
  1e-4 * 1e-3); ``transformerClip`` (the temporal module) is not CLIP and trains at ``lr``.
* No weight decay on biases, norm weights and other 0-/1-D tensors (``logit_scale``, CLIP's
  ``class_embedding``). The reference meant to exempt LayerNorms but matched ``LayerNorm.`` names
  that CLIP does not use (its norms are ``ln_*``), so only biases escaped decay (docs/reference.md §4.3).

The schedule is a pure function of the step, over the *real* number of optimizer steps (the
reference hard-coded 5 epochs, docs/reference.md §8.9), with a non-zero first step (§8.10) and a cosine that
starts at 1 where warm-up ends (§8.10).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

CLIP_PREFIX = "clip."


def is_clip_parameter(name: str) -> bool:
    """True for parameters of the CLIP towers (``clip.*``; DDP/compile prefixes removed first)."""
    return name.startswith(CLIP_PREFIX)


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices and embeddings decay; biases, norm weights and scalars do not."""
    return param.ndim >= 2 and not name.endswith(".bias")


def build_param_groups(model: nn.Module, lr: float, clip_lr_scale: float,
                       weight_decay: float) -> list[dict[str, Any]]:
    """The four reference groups, over trainable parameters only.

    Args:
        model: the unwrapped model (parameter names without ``module.``).
        lr: base learning rate (non-CLIP parameters).
        clip_lr_scale: CLIP learning rate = ``lr * clip_lr_scale`` (reference ``coef_lr``).
        weight_decay: decoupled decay for matrices.

    Returns:
        Non-empty groups with keys ``params``, ``lr``, ``weight_decay``, ``name`` (for logging).
    """
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (is_clip_parameter(name), wants_weight_decay(name, param))
        buckets.setdefault(key, []).append(param)
    groups = []
    for (clip, decay), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "lr": lr * clip_lr_scale if clip else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{'clip' if clip else 'other'}_{'decay' if decay else 'no_decay'}",
        })
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for group in groups:
        logger.debug("param group %s: %d tensors, lr=%g, wd=%g", group["name"], len(group["params"]),
                     group["lr"], group["weight_decay"])
    return groups


def build_optimizer(model: nn.Module, *, lr: float, clip_lr_scale: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` (reference betas 0.9/0.98, eps 1e-6)."""
    groups = build_param_groups(model, lr, clip_lr_scale, weight_decay)
    # foreach=False: identical numerics on every device type keeps CPU resume tests bit-exact.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (so the first
    update is not wasted), then ``0.5 * (1 + cos(pi * p))`` with ``p`` the progress through the
    remaining steps, reaching 0 at ``total_steps``; constant 0 afterwards.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int,
                    warmup_proportion: float) -> LambdaLR:
    """``LambdaLR`` with :func:`warmup_cosine`; warm-up is ``round(warmup_proportion * total_steps)``."""
    warmup = int(round(warmup_proportion * total_steps))
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total_steps))


def clamp_logit_scale(model: nn.Module, max_value: float = math.log(100.0)) -> None:
    """Clamp CLIP's learned log-temperature to ``<= max_value`` after each step (docs/reference.md §1.5)."""
    for name, param in model.named_parameters():
        if name.endswith("logit_scale"):
            with torch.no_grad():
                param.clamp_(max=max_value)
