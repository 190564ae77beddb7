"""Gaussian diffusion over candidate-score vectors: q_sample, the generation loss and DDIM.

The network predicts x0 directly (``START_X``). This module never owns a network: every method
takes ``denoise_fn(x_t, t, **cond)``, called with a (B,) tensor of integer timesteps.
Coefficients are derived in float64 and cast to float32 when indexed, as in the reference.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusionret.diffusion.schedules import named_betas

DenoiseFn = Callable[..., torch.Tensor]


class GaussianDiffusion(nn.Module):
    """Stateless schedule holder (buffers only, none persistent).

    Args:
        steps: number of diffusion steps T (the reference evaluates with 50).
        schedule: ``cosine`` or ``linear``.
    """

    def __init__(self, steps: int = 50, schedule: str = "cosine") -> None:
        super().__init__()
        self.num_steps = int(steps)
        self.schedule = schedule
        betas = named_betas(schedule, steps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        }
        for name, value in tables.items():
            self.register_buffer(name, torch.from_numpy(value), persistent=False)

    def extra_repr(self) -> str:
        return f"steps={self.num_steps}, schedule={self.schedule!r}"

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as float32, shaped (B, 1, ...) to broadcast against ``like``."""
        out = table.to(t.device)[t.long()].float()
        return out.view(-1, *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"timesteps must have shape ({batch},), got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}], got [{int(t.min())}, {int(t.max())}]")

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) noise.  x0: (B, N), t: (B,)."""
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform integer timesteps (B,) from an explicit generator (not NumPy's global RNG)."""
        return torch.randint(0, self.num_steps, (batch,), generator=generator, device=device)

    def generation_loss(self, denoise_fn: DenoiseFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None, *, temp: float = 100.0, target: int = 0,
                        generator: torch.Generator | None = None, **cond: torch.Tensor) -> torch.Tensor:
        """The reference's generation ("kl") loss: CE(denoise(q_sample(x0)) * temp, target).

        Args:
            x0: (B, N) the one-hot joint distribution (positive at ``target``).
            t: (B,) timesteps; noise: (B, N) or drawn from ``generator``.
            temp: the CE temperature ``d_temp`` (reference: 100).
        Returns:
            scalar, mean over the batch.
        """
        x_t = self.q_sample(x0, t, noise, generator=generator)
        out = denoise_fn(x_t, t, **cond)  # raw prediction, not clamped, as in the reference
        labels = torch.full((x0.shape[0],), target, dtype=torch.long, device=x0.device)
        return F.cross_entropy(out * temp, labels)

    @torch.no_grad()
    def ddim_sample(self, denoise_fn: DenoiseFn, noise: torch.Tensor, *, eta: float = 0.0, clip_denoised: bool = True,
                    generator: torch.Generator | None = None, **cond: torch.Tensor) -> torch.Tensor:
        """DDIM from x_T = ``noise`` through all T steps; returns the final sample (x0 at t = 0).

        Args:
            noise: (B, N) initial x_T.
            eta: 0 gives the deterministic sampler the reference uses; > 0 draws fresh noise from
                ``generator`` at every step except the last.
            clip_denoised: clamp each predicted x0 to [-1, 1] (the reference does).
        Returns:
            (B, N).
        """
        x = noise
        batch = x.shape[0]
        coef = self.ddim_coefficients(eta, x.device)
        for step in reversed(range(self.num_steps)):
            t = torch.full((batch,), step, dtype=torch.long, device=x.device)
            x0 = denoise_fn(x, t, **cond)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            if step == 0:
                # alpha_bar_{-1} = 1 makes the update return x0 exactly; skip the arithmetic.
                x = x0
                break
            eps = (coef["sqrt_recip"][step] * x - x0) / coef["sqrt_recipm1"][step]
            x = x0 * coef["sqrt_prev"][step] + coef["dir"][step] * eps
            if eta > 0:
                x = x + coef["sigma"][step] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    def ddim_coefficients(self, eta: float, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every step's DDIM coefficients as (T,) float32 tables, computed once per sampling run.

        The same float32 operations as evaluating them per step (values are cast to float32 before
        the arithmetic, as :meth:`_at` does), so the samples are unchanged; the loop then indexes
        0-d tensors instead of gathering and recomputing ~25 small tensors per step.
        """
        a_bar = self.alphas_cumprod.to(device).float()
        a_prev = self.alphas_cumprod_prev.to(device).float()
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_prev)
        return {
            "sqrt_recip": self.sqrt_recip_alphas_cumprod.to(device).float(),
            "sqrt_recipm1": self.sqrt_recipm1_alphas_cumprod.to(device).float(),
            "sqrt_prev": torch.sqrt(a_prev),
            "dir": torch.sqrt(1 - a_prev - sigma**2),
            "sigma": sigma,
        }
