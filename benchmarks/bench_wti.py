"""WTI similarity at MSR-VTT scale vs this machine's float32 matmul throughput.

    python benchmarks/bench_wti.py            # 1000 texts x 1000 videos, L=32, T=12, D=512

FLOPs counted: the token-frame product 2*Nt*L*Nv*T*D (the maxima and weighted sums are O(Nt*L*Nv*T)).
Peak memory is the largest extra allocation measured with tracemalloc-free accounting: the (A, L, B, T)
block of one chunk, which bounds the working set whatever Nt and Nv are.
"""

from __future__ import annotations

import argparse
import resource

import torch
from torch import nn

from _common import machine, matmul_gflops, report, timeit
from diffusionret.models.similarity import default_chunk_size, wti_similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=None, help="texts/videos per chunk (default: from a 64 MiB budget)")
    args = parser.parse_args()
    torch.manual_seed(0)
    d = args.dim
    text_fc = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, 1))
    video_fc = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, 1))
    tokens, video = torch.randn(args.texts, args.words, d), torch.randn(args.videos, args.frames, d)
    tmask = torch.ones(args.texts, args.words, dtype=torch.long)
    tmask[:, 12:] = 0  # typical caption length
    vmask = torch.ones(args.videos, args.frames, dtype=torch.long)
    chunk = args.chunk or default_chunk_size(args.words, args.frames)
    print(f"machine: {machine()}")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        seconds = timeit(lambda: wti_similarity(text_fc, video_fc, tokens, tmask, video, vmask, chunk), repeat=3)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = 2 * args.texts * args.words * args.videos * args.frames * d
    achieved = flops / seconds / 1e9
    peak = matmul_gflops()
    block_mib = min(chunk, args.texts) * args.words * min(chunk, args.videos) * args.frames * 4 / 2**20
    report("wti", texts=args.texts, videos=args.videos, seconds=seconds, gflops=achieved, matmul_gflops=peak,
           ratio_to_matmul=achieved / peak, chunk=chunk, chunk_block_mib=block_mib, rss_growth_mib=(rss1 - rss0) / 1024)


if __name__ == "__main__":
    main()
