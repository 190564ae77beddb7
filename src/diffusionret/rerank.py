"""Diffusion re-ranking of each query's top-K candidates (SPEC.md 3.3), batched over all queries.

For every query row of a similarity matrix, the K best candidates (descending score) are handed to
a denoiser, DDIM generates an x0 score vector over them, and ``alpha * softmax(temp * x0)`` is added
to their scores. All queries of a chunk run as one batch; the denoiser's time-independent products
are computed once per query (:meth:`T2VDenoiser.prepare`), so the 50 steps are cheap.
"""

from __future__ import annotations

from typing import Callable

import torch

from diffusionret.diffusion.gaussian import GaussianDiffusion


def draw_noise(rows: int, k: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Initial x_T (rows, k): one independent draw per candidate slot."""
    return torch.randn(rows, k, generator=generator, device=device)


@torch.no_grad()
def rerank_rows(sim: torch.Tensor, prepare: Callable[[torch.Tensor, torch.Tensor], Callable], diffusion: GaussianDiffusion,
                *, top_k: int, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                alpha: float = 1.0, temp: float = 1.0, chunk_size: int = 256) -> torch.Tensor:
    """Re-rank every row of ``sim`` (queries x candidates).

    Args:
        sim: (Nq, Nc) base scores.
        prepare: ``prepare(rows (n,), cand_idx (n, K)) -> denoise(x_t, t)``: the prepared denoiser
            for a chunk of query rows and their candidates in descending order.
        noise: (Nq, K) initial x_T, or drawn from ``generator`` chunk by chunk.
    Returns:
        (Nq, Nc): ``sim`` with ``alpha * softmax(temp * x0)`` added on each row's top-K entries.
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (queries x candidates), got {tuple(sim.shape)}")
    nq, nc = sim.shape
    k = min(top_k, nc)
    if k <= 0:
        return sim.clone()
    if noise is not None and tuple(noise.shape) != (nq, k):
        raise ValueError(f"noise must have shape ({nq}, {k}), got {tuple(noise.shape)}")
    out = sim.clone().float()
    top = torch.topk(sim, k, dim=1, largest=True, sorted=True).indices  # (Nq, K)
    for start in range(0, nq, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, nq), device=sim.device)
        idx = top[rows]
        x_t = noise[rows].to(out) if noise is not None else draw_noise(len(rows), k, generator, sim.device)
        denoise = prepare(rows, idx)
        x0 = diffusion.ddim_sample(lambda x, t: denoise(x, t), x_t)
        bonus = alpha * torch.softmax(x0 * temp, dim=-1)
        out[rows.unsqueeze(1), idx] += bonus
    return out
