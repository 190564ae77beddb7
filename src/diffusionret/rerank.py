"""Diffusion re-ranking of each query's top-K candidates (docs/reference.md §3.3), batched over all queries.

For every query row of a similarity matrix, the K best candidates (descending score) are handed to
a denoiser, DDIM generates an x0 score vector over them, and ``alpha * softmax(temp * x0)`` is added
to their scores. Query rows run in chunks; each chunk's denoiser is prepared once
(:meth:`T2VDenoiser.prepare`: per-step logit tables, fused projections), so the DDIM steps cost
O(K * D) per query. The initial noise of all rows is drawn before the first chunk, so the result
does not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusionret.diffusion.gaussian import GaussianDiffusion

#: Query rows per chunk on CPU. A chunk's two (rows, K, 2D) step tensors are re-read at every DDIM
#: step; at 32 rows, K = 32, D = 512 they are 4 MiB each and stay in the last-level cache, which
#: measured fastest on the 2-core CPU (64 rows: 5-20 % slower, out of cache; 16: per-op overhead,
#: paid 50 times per chunk, dominates). With the compiled DDIM kernel (diffusionret.native) the steps
#: run per query and only the chunk's preparation depends on it: 32 also measured fastest there
#: (64 and 128 rows: 30-40 % slower preparation, out of cache).
DEFAULT_CHUNK_SIZE = 32
#: On accelerators the per-step kernels are launch-bound at 32 rows; larger chunks fill the device
#: (a guess, not a measurement: no accelerator was available when this was tuned).
DEFAULT_CHUNK_SIZE_ACCELERATOR = 1024


def default_chunk_size(device: torch.device | str) -> int:
    """Query rows per denoiser batch on ``device`` (see :data:`DEFAULT_CHUNK_SIZE`)."""
    return DEFAULT_CHUNK_SIZE if torch.device(device).type == "cpu" else DEFAULT_CHUNK_SIZE_ACCELERATOR


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[Denoise, torch.Tensor], torch.Tensor]


def draw_noise(rows: int, k: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Initial x_T (rows, k) on ``device``: one independent draw per candidate slot.

    With a generator, the draw happens on the generator's device (then moves), so a CPU generator
    gives the same noise whichever device re-ranks.
    """
    if generator is None:
        return torch.randn(rows, k, device=device)
    return torch.randn(rows, k, generator=generator, device=generator.device).to(device)


@torch.no_grad()
def rerank_rows(sim: torch.Tensor, prepare: Callable[[torch.Tensor, torch.Tensor], Denoise], diffusion: GaussianDiffusion,
                *, top_k: int, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                alpha: float = 1.0, temp: float = 1.0, chunk_size: int | None = None, eta: float = 0.0,
                sample: Sampler | None = None) -> torch.Tensor:
    """Re-rank every row of ``sim`` (queries x candidates).

    Args:
        sim: (Nq, Nc) base scores.
        prepare: ``prepare(rows (n,), cand_idx (n, K)) -> denoise(x_t (n, K), t (n,)) -> x0 (n, K)``:
            the prepared denoiser for a chunk of query rows and their candidates in descending order.
        noise: (Nq, K) initial x_T; when not given, all Nq rows are drawn at once from ``generator``
            (:func:`draw_noise`), so the chunk size never changes the result.
        chunk_size: query rows per denoiser batch (memory and speed only); by default
            :func:`default_chunk_size` of ``sim``'s device.
        eta: DDIM eta (0: deterministic, as the reference); > 0 draws each step's noise from ``generator``.
        sample: ``sample(denoise, x_T (n, K)) -> x0 (n, K)`` in place of ``diffusion.ddim_sample``
            (e.g. the compiled sampler, :mod:`diffusionret.native`); deterministic DDIM only, so
            ``eta`` must be 0 with it.
    Returns:
        (Nq, Nc) float32: ``sim`` with ``alpha * softmax(temp * x0)`` added on each row's top-K entries.
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (queries x candidates), got {tuple(sim.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(sim.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if sample is not None and eta != 0:
        raise ValueError(f"a custom sampler is deterministic DDIM only (eta 0), got eta={eta}")
    nq, nc = sim.shape
    k = min(top_k, nc)
    if k <= 0:
        return sim.clone()
    if noise is not None and tuple(noise.shape) != (nq, k):
        raise ValueError(f"noise must have shape ({nq}, {k}), got {tuple(noise.shape)}")
    out = sim.clone().float()
    if noise is None:
        noise = draw_noise(nq, k, generator, sim.device)
    noise = noise.to(out)
    top = torch.topk(sim, k, dim=1, largest=True, sorted=True).indices  # (Nq, K)
    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        rows = torch.arange(start, stop, device=sim.device)
        idx = top[start:stop]
        denoise = prepare(rows, idx)
        if sample is not None:
            x0 = sample(denoise, noise[start:stop])
        else:
            x0 = diffusion.ddim_sample(denoise, noise[start:stop], eta=eta, generator=generator)
        out[start:stop].scatter_add_(1, idx, alpha * torch.softmax(x0 * temp, dim=-1))
    return out
