"""Evaluation at scale: the (N, N) WTI matrix and diffusion re-ranking of both directions, vs N.

What ``diffusionret eval`` does after encoding, on random features of MSR-VTT's shape: the
evaluation's own ``similarity_matrix`` (captions in length order, blocks trimmed to the real tokens
and frames, ``eval.chunk_size`` 128) and ``rerank_scores`` (top-32, 50 DDIM steps, both
directions, noise from ``eval.seed``). D 512, T 12 (every video with all 12 frames, as MSR-VTT's
clips at 1 frame per second), L 32 with caption lengths from ``--lengths`` (default: the MSR-VTT
1k-A test captions' real lengths).

    python benchmarks/bench_eval.py --threads 1                          # N = 1000
    python benchmarks/bench_eval.py --threads 1 --sizes 128 1000 2000 5000
    python benchmarks/bench_eval.py --threads 1 --lengths uniform        # lengths uniform in 5..31
    python benchmarks/bench_eval.py --threads 1 --compare 2              # + PyTorch loop vs kernel, alternating

Each size runs once (after a small warm-up). Reported: wall time of the two stages, and the CPU time
of the (single) computing thread, which other processes on the machine disturb less; both with the
load average before and after.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusionret.distributed import DistContext
from diffusionret.evaluation.evaluate import rerank_scores, similarity_matrix
from diffusionret.evaluation.features import CorpusFeatures
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.retrieval import RerankConfig

from _common import head_model, add_lengths_arg, add_thread_arg, apply_threads, caption_lengths, load_text, machine, report


def build(dim: int, steps: int) -> DiffusionRet:
    """The head and denoisers at full width on a tiny CLIP (only the head is used); the same weights every run."""
    torch.manual_seed(0)  # the model initialises from the global RNG
    model = head_model(dim, denoisers=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the 0.02 init, so x0 (and the softmax bonus) varies across candidates
        for p in list(model.diffusion_model.parameters()) + list(model.diffusion_model_v.parameters()):
            p.normal_(0, 0.05, generator=g)
    return model


def features(n: int, words: int, frames: int, dim: int, lengths: str, seed: int = 0) -> CorpusFeatures:
    g = torch.Generator().manual_seed(seed)
    tokens, video = torch.randn(n, words, dim, generator=g), torch.randn(n, frames, dim, generator=g)
    real = caption_lengths(n, lengths, words, generator=g)
    text_mask = (torch.arange(words)[None, :] < real[:, None]).long()
    return CorpusFeatures(tokens=tokens, text_mask=text_mask, cls=torch.randn(n, dim, generator=g), video=video,
                          frame_mask=torch.ones(n, frames, dtype=torch.long), caption_to_video=torch.arange(n),
                          video_ids=[str(i) for i in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000], help="N captions = N videos (default 1000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=128, help="eval.chunk_size (default 128, the config default)")
    parser.add_argument("--no-native", action="store_true",
                        help="re-rank with the PyTorch DDIM loop instead of the compiled kernel")
    parser.add_argument("--compare", type=int, default=0, metavar="R",
                        help="then re-rank R more times per size, alternating the PyTorch loop and the kernel")
    add_lengths_arg(parser)
    add_thread_arg(parser)
    args = parser.parse_args()
    apply_threads(args)
    model = build(args.dim, args.steps)
    ctx = DistContext.single("cpu")
    print(f"machine: {machine()}")

    def rerank(sim: torch.Tensor, feats: CorpusFeatures, native: bool) -> tuple[float, float, torch.Tensor]:
        """Wall and CPU seconds of re-ranking both directions, and the text->video result."""
        config = RerankConfig(steps=args.steps, top_k=args.top_k, native=native)
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        t2v, v2t = rerank_scores(model, sim, feats, rerank=config, seed=42, ctx=ctx)
        return time.perf_counter() - wall0, time.thread_time() - cpu0, torch.cat([t2v, v2t.T], dim=1)

    def run(feats: CorpusFeatures) -> tuple[float, float, float, float, torch.Tensor]:
        """Wall and CPU seconds of the two stages (CPU time of this thread: the work itself, less
        sensitive than wall time to other processes taking the cores)."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        sim = similarity_matrix(model, feats, chunk_size=args.chunk_size, ctx=ctx, progress=False)
        wall1, cpu1 = time.perf_counter(), time.thread_time()
        rerank_s, rerank_cpu_s, _ = rerank(sim, feats, not args.no_native)
        return wall1 - wall0, rerank_s, cpu1 - cpu0, rerank_cpu_s, sim

    run(features(64, args.words, args.frames, args.dim, args.lengths))  # warm-up: first-call allocations
    for n in args.sizes:
        feats = features(n, args.words, args.frames, args.dim, args.lengths)
        real = feats.text_mask.sum(1).float()
        load_before = load_text()
        wti_s, rerank_s, wti_cpu_s, rerank_cpu_s, sim = run(feats)
        report("eval", n=n, lengths=args.lengths, mean_tokens=round(real.mean().item(), 3), wti_s=wti_s,
               rerank_s=rerank_s, total_s=wti_s + rerank_s, wti_cpu_s=wti_cpu_s, rerank_cpu_s=rerank_cpu_s,
               total_cpu_s=wti_cpu_s + rerank_cpu_s, native=not args.no_native, load_before=load_before,
               load_after=load_text())
        for _ in range(args.compare):
            # Alternating in one process, so that both see the same load: the PyTorch DDIM loop (the
            # code before the compiled kernel) and the kernel, on the same WTI matrix.
            load_before = load_text()
            loop_s, loop_cpu_s, loop = rerank(sim, feats, native=False)
            kernel_s, kernel_cpu_s, fast = rerank(sim, feats, native=True)
            report("rerank_compare", n=n, pytorch_s=loop_s, pytorch_cpu_s=loop_cpu_s, native_s=kernel_s,
                   native_cpu_s=kernel_cpu_s, cpu_ratio=loop_cpu_s / kernel_cpu_s,
                   max_abs_diff=(fast - loop).abs().max().item(), load_before=load_before, load_after=load_text())


if __name__ == "__main__":
    main()
