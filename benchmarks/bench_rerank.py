"""Re-ranking at MSR-VTT scale: diffusionret's batched, hoisted re-ranking vs a per-query baseline.

The baseline is a straightforward implementation of the reference algorithm (SPEC.md 3.3): for each
query, take its top-K candidates, run the denoiser's plain forward through all DDIM steps, and add
``softmax(x0)`` to those K scores. Both run on the same inputs and initial noise.

    python benchmarks/bench_rerank.py                 # 1000 x 1000, D=512, T=12, K=32, 50 steps
    python benchmarks/bench_rerank.py --queries 200   # quicker
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import machine, report
from diffusionret.models.config import ClipConfig, ModelConfig
from diffusionret.models.diffusionret import DiffusionRet


def baseline_rerank(model: DiffusionRet, sim, cls, video, mask, k, noise_t2v, noise_v2t):
    """Per-query loops, plain denoiser forward at every DDIM step (the reference's algorithm)."""
    t2v, v2t = sim.clone(), sim.T.clone()
    diffusion = model.diffusion
    for i in range(sim.shape[0]):
        idx = torch.topk(sim[i], k).indices
        x0 = diffusion.ddim_sample(model.denoise_t2v, noise_t2v[i:i + 1], cls=cls[i:i + 1], cand_video=video[idx][None],
                                   cand_mask=mask[idx][None])
        t2v[i, idx] += torch.softmax(x0[0], -1)
    for j in range(sim.shape[1]):
        idx = torch.topk(sim.T[j], k).indices
        x0 = diffusion.ddim_sample(model.denoise_v2t, noise_v2t[j:j + 1], cand_cls=cls[idx][None], video=video[j:j + 1],
                                   frame_mask=mask[j:j + 1])
        v2t[j, idx] += torch.softmax(x0[0], -1)
    return t2v, v2t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000, help="texts = videos")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--baseline-queries", type=int, default=None,
                        help="time the baseline on this many queries per direction and scale linearly (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, d = args.queries, args.dim
    # Only the head matters here; a tiny CLIP keeps construction cheap.
    clip = ClipConfig(embed_dim=d, image_size=32, vision_width=64, vision_layers=1, vision_patch_size=16, text_width=d,
                      text_layers=1, vocab_size=1000)
    model = DiffusionRet(ModelConfig(clip=clip, stage="generation", temporal_layers=1, diffusion_steps=args.steps))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in list(model.diffusion_model.parameters()) + list(model.diffusion_model_v.parameters()):
            p.normal_(0, 0.05, generator=g)
    cls = torch.randn(n, d, generator=g)
    video = torch.randn(n, args.frames, d, generator=g)
    mask = torch.ones(n, args.frames, dtype=torch.long)
    mask[n // 2:, args.frames // 2:] = 0
    sim = torch.rand(n, n, generator=g) * 2 - 1
    noise_t2v, noise_v2t = torch.randn(n, args.top_k, generator=g), torch.randn(n, args.top_k, generator=g)
    print(f"machine: {machine()}")
    print(f"inputs: {n} texts x {n} videos, D={d}, T={args.frames}, K={args.top_k}, {args.steps} DDIM steps")

    start = time.perf_counter()
    fast_t2v, fast_v2t = model.rerank(sim, None, None, cls, video, mask, top_k=args.top_k, noise_t2v=noise_t2v, noise_v2t=noise_v2t)
    fast_s = time.perf_counter() - start

    m = args.baseline_queries or n
    start = time.perf_counter()
    with torch.no_grad():
        base_t2v, base_v2t = baseline_rerank(model, sim[:m, :], cls[:m], video, mask, args.top_k, noise_t2v[:m], noise_v2t[:m]) \
            if m == n else _partial_baseline(model, sim, cls, video, mask, args.top_k, noise_t2v, noise_v2t, m)
    base_s = (time.perf_counter() - start) * (n / m)
    diff = max((fast_t2v[:m] - base_t2v[:m]).abs().max().item(), (fast_v2t[:m] - base_v2t[:m]).abs().max().item())
    report("rerank", queries=n, fast_s=fast_s, baseline_s=base_s, speedup=base_s / fast_s, max_abs_diff=diff,
           baseline_extrapolated=m != n)


def _partial_baseline(model, sim, cls, video, mask, k, noise_t2v, noise_v2t, m):
    """Baseline on the first ``m`` queries of each direction (rows beyond ``m`` are not compared)."""
    t2v, v2t = sim.clone(), sim.T.clone()
    for i in range(m):
        idx = torch.topk(sim[i], k).indices
        x0 = model.diffusion.ddim_sample(model.denoise_t2v, noise_t2v[i:i + 1], cls=cls[i:i + 1], cand_video=video[idx][None],
                                         cand_mask=mask[idx][None])
        t2v[i, idx] += torch.softmax(x0[0], -1)
    for j in range(m):
        idx = torch.topk(sim.T[j], k).indices
        x0 = model.diffusion.ddim_sample(model.denoise_v2t, noise_v2t[j:j + 1], cand_cls=cls[idx][None], video=video[j:j + 1],
                                         frame_mask=mask[j:j + 1])
        v2t[j, idx] += torch.softmax(x0[0], -1)
    return t2v, v2t


if __name__ == "__main__":
    main()
