"""Noise schedules (float64), as in improved/guided diffusion (docs/reference.md §2)."""

from __future__ import annotations

import math

import numpy as np


def linear_betas(steps: int) -> np.ndarray:
    """Linear betas scaled so that any number of steps spans the 1000-step range (1e-4 .. 0.02)."""
    scale = 1000.0 / steps
    if scale * 0.02 >= 1.0:
        # beta_T >= 1 would zero alpha_bar (and the DDIM coefficients would divide by zero).
        raise ValueError(f"the linear schedule needs more than 20 steps (beta_T = {scale * 0.02:.3g} for {steps} steps)")
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), betas clipped at 0.999."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                    dtype=np.float64)


def named_betas(name: str, steps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(steps)
    if name == "cosine":
        return cosine_betas(steps)
    raise ValueError(f"unknown noise schedule {name!r} (cosine or linear)")
