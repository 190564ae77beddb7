"""Re-ranking at MSR-VTT scale: diffusionret's batched, hoisted re-ranking vs a per-query baseline.

The baseline is a straightforward implementation of the reference algorithm (docs/reference.md §3.3), written
here: for each query, take its top-K candidates, run the denoiser's plain forward through all DDIM
steps, and add ``softmax(x0)`` to those K scores. Both run on the same inputs and initial noise, and
the maximum absolute difference of the two results is reported.

The per-query baseline costs 0.2-0.3 s per query and direction on one thread (1-4 s with two
threads when the 2-core machine is oversubscribed: its thousands of tiny ops each wait for the
other OpenMP thread), so by default it runs on the first ``--baseline-queries`` queries of each
direction and its time is scaled linearly to all queries (the loop is per query, so its cost is
linear in the number of queries); the difference is measured on those rows.
``--baseline-queries 1000`` runs it in full (10 minutes to an hour). Compare ratios at
``--threads 1``: with two threads on a loaded machine the baseline slows down far more than the
batched path and the ratio is inflated.

    python benchmarks/bench_rerank.py                       # 1000 x 1000, D=512, T=12, K=32, 50 steps
    python benchmarks/bench_rerank.py --reference-batched   # + the reference's 32-row batches (plain forward)
    python benchmarks/bench_rerank.py --queries 200         # quicker

Caption lengths play no part here: the denoisers see each caption's pooled sentence feature only.
Re-ranking together with the WTI matrix over MSR-VTT caption lengths (the evaluation as a whole) is
``bench_eval.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.rerank import DEFAULT_CHUNK_SIZE
from diffusionret.retrieval import RerankConfig, Reranker

from _common import head_model, parse_bench_args, machine, report


@torch.no_grad()
def baseline_rerank(model: DiffusionRet, sim: torch.Tensor, cls: torch.Tensor, video: torch.Tensor, mask: torch.Tensor,
                    k: int, noise_t2v: torch.Tensor, noise_v2t: torch.Tensor, queries: int, steps: int,
                    batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference algorithm on the first ``queries`` rows of each direction (other rows: ``sim`` unchanged).

    ``batch = 1`` is the per-query loop; ``batch = 32`` is the reference's own chunking
    (``mb = t2v_num``). Either way the denoiser's plain ``forward`` runs at every DDIM step.
    """
    t2v, v2t = sim.clone(), sim.T.clone()
    diffusion = GaussianDiffusion(steps)
    for start in range(0, queries, batch):
        rows = torch.arange(start, min(start + batch, queries))
        idx = torch.topk(sim[rows], k, dim=1).indices  # (b, K), descending
        x0 = diffusion.ddim_sample(model.denoise_t2v, noise_t2v[rows], cls=cls[rows], cand_video=video[idx],
                                   cand_mask=mask[idx])
        t2v[rows.unsqueeze(1), idx] += torch.softmax(x0, -1)
    for start in range(0, queries, batch):
        rows = torch.arange(start, min(start + batch, queries))
        idx = torch.topk(sim.T[rows], k, dim=1).indices
        x0 = diffusion.ddim_sample(model.denoise_v2t, noise_v2t[rows], cand_cls=cls[idx], video=video[rows],
                                   frame_mask=mask[rows])
        v2t[rows.unsqueeze(1), idx] += torch.softmax(x0, -1)
    return t2v, v2t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000, help="texts = videos")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--baseline-queries", type=int, default=40,
                        help="run the per-query baseline on this many queries per direction and scale its time "
                             "linearly to --queries (default 40; pass --queries' value for a full run)")
    parser.add_argument("--reference-batched", action="store_true",
                        help="also time the reference's 32-row batching with the plain forward (same subset, "
                             "rounded up to whole batches)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help=f"query rows per denoiser batch in diffusionret's re-ranking (default {DEFAULT_CHUNK_SIZE}, "
                             "the library's CPU default)")
    args = parse_bench_args(parser)
    n, d, k = args.queries, args.dim, args.top_k
    # Only the head matters here; a tiny CLIP keeps construction cheap.
    model = head_model(d, denoisers=True)
    reranker = Reranker(model, RerankConfig(steps=args.steps, top_k=args.top_k, chunk_size=args.chunk_size))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the 0.02 init, so x0 (and the softmax bonus) varies across candidates
        for p in list(model.diffusion_model.parameters()) + list(model.diffusion_model_v.parameters()):
            p.normal_(0, 0.05, generator=g)
    cls = torch.randn(n, d, generator=g)
    video = torch.randn(n, args.frames, d, generator=g)
    mask = torch.ones(n, args.frames, dtype=torch.long)
    mask[n // 2:, args.frames // 2:] = 0  # half the videos are short
    sim = torch.rand(n, n, generator=g) * 2 - 1
    noise_t2v, noise_v2t = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    print(f"machine: {machine()}")
    print(f"inputs: {n} texts x {n} videos, D={d}, T={args.frames}, K={k}, {args.steps} DDIM steps")

    # Warm-up on a few rows (first-call allocations, thread pool start), then the timed full run.
    reranker.t2v(sim[:32], cls[:32], video, mask, noise=noise_t2v[:32])
    start = time.perf_counter()
    fast_t2v, fast_v2t = reranker.both(sim, cls, video, mask, noise_t2v=noise_t2v, noise_v2t=noise_v2t)
    fast_s = time.perf_counter() - start
    report("rerank_fast", queries=n, seconds=fast_s, per_query_ms=fast_s / (2 * n) * 1e3, chunk_size=args.chunk_size)

    m = min(args.baseline_queries, n)
    start = time.perf_counter()
    base_t2v, base_v2t = baseline_rerank(model, sim, cls, video, mask, k, noise_t2v, noise_v2t, m, args.steps)
    measured = time.perf_counter() - start
    base_s = measured * n / m
    diff = max((fast_t2v[:m] - base_t2v[:m]).abs().max().item(), (fast_v2t[:m] - base_v2t[:m]).abs().max().item())
    report("rerank", queries=n, fast_s=fast_s, baseline_s=base_s, speedup=base_s / fast_s, max_abs_diff=diff,
           baseline_queries_run=m, baseline_extrapolated=m != n)

    if args.reference_batched:
        mb = 32
        m2 = min(n, -(-m // mb) * mb)
        start = time.perf_counter()
        ref_t2v, ref_v2t = baseline_rerank(model, sim, cls, video, mask, k, noise_t2v, noise_v2t, m2, args.steps, batch=mb)
        ref_s = (time.perf_counter() - start) * n / m2
        diff2 = max((fast_t2v[:m2] - ref_t2v[:m2]).abs().max().item(), (fast_v2t[:m2] - ref_v2t[:m2]).abs().max().item())
        report("rerank_reference_batched", queries=n, fast_s=fast_s, reference_batched_s=ref_s, speedup=ref_s / fast_s,
               max_abs_diff=diff2, baseline_queries_run=m2, baseline_extrapolated=m2 != n)


if __name__ == "__main__":
    main()
