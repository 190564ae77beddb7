"""WTI similarity at MSR-VTT scale vs this machine's float32 matmul throughput, and its peak memory.

    python benchmarks/bench_wti.py            # 1000 texts x 1000 videos, L=32, T=12, D=512
    python benchmarks/bench_wti.py --threads 1

Runs the model's own head (``DiffusionRet.similarity``: weight MLPs in row chunks, per-chunk
normalisation, token-frame products over the real tokens and frames in length buckets). Caption
lengths: ``--lengths msrvtt`` (default; the MSR-VTT 1k-A test captions' real lengths) or ``uniform``
(5-31 tokens). FLOPs counted: the padded token-frame product ``2*Nt*L*Nv*T*D`` (``gflops``: the
padded-equivalent rate, comparable with figures from before bucketing) and the product over real
tokens and frames only (``real_gflops``); the weight MLPs, maxima and weighted sums are not counted. The matmul reference is
an n x n x n float32 product measured in the same run with the same threads.

Memory: peak resident memory above the level before the call (sampled every millisecond), for
1000 x 1000 and for twice the texts and twice the videos, next to the size of one chunk's
(A, L, B, T) score block. If the peak is bounded by the chunk size it does not grow with Nt or Nv
beyond the (Nt, Nv) output and the (Nv, T) frame weights. Each memory run is a fresh process with
``MALLOC_MMAP_THRESHOLD_=65536``, so that freed blocks go back to the system at once and the
resident size follows the live tensors (otherwise glibc keeps freed blocks below 32 MiB and a
second call reuses them unseen).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.models.similarity import default_chunk_size

from _common import (head_model, PeakRSS, add_lengths_arg, parse_bench_args, caption_lengths, machine, matmul_gflops,
                     report, timeit)


def inputs(texts: int, videos: int, words: int, frames: int, dim: int, lengths: str = "msrvtt", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens, video = torch.randn(texts, words, dim, generator=g), torch.randn(videos, frames, dim, generator=g)
    tmask = torch.zeros(texts, words, dtype=torch.long)
    real = caption_lengths(texts, lengths, words, generator=g)
    tmask[torch.arange(words)[None, :] < real[:, None]] = 1
    vmask = torch.ones(videos, frames, dtype=torch.long)
    vmask[videos // 4:videos // 2, frames // 2:] = 0  # some short videos
    return tokens, tmask, video, vmask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=None, help="texts/videos per chunk (default: from a 64 MiB budget)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the memory runs at 2x texts and 2x videos")
    parser.add_argument("--probe-memory", action="store_true", help=argparse.SUPPRESS)  # internal: one memory run
    add_lengths_arg(parser)
    args = parse_bench_args(parser)
    d, L, T = args.dim, args.words, args.frames
    model = head_model(d, denoisers=False)
    chunk = args.chunk or default_chunk_size(L, T)
    if args.probe_memory:
        return probe(model, args)
    print(f"machine: {machine()}")
    print(f"inputs: {args.texts} texts x {args.videos} videos, L={L}, T={T}, D={d}, chunk={chunk}")

    tokens, tmask, video, vmask = inputs(args.texts, args.videos, L, T, d, args.lengths)
    real_tokens = int(tmask.sum())
    with torch.no_grad():
        seconds = timeit(lambda: model.similarity(tokens, tmask, video, vmask, chunk_size=args.chunk), repeat=3)
    flops = 2 * args.texts * L * args.videos * T * d  # the padded product, as before bucketing
    real_flops = 2 * real_tokens * int(vmask.sum()) * d  # the products of real tokens and real frames
    achieved = flops / seconds / 1e9
    peak = matmul_gflops()
    report("wti", texts=args.texts, videos=args.videos, lengths=args.lengths, mean_tokens=real_tokens / args.texts,
           seconds=seconds, gflops=achieved, matmul_gflops=peak, ratio_to_matmul=achieved / peak,
           real_gflops=real_flops / seconds / 1e9, chunk=chunk)

    sizes = [(args.texts, args.videos)]
    if not args.no_scaling:
        sizes += [(2 * args.texts, args.videos), (args.texts, 2 * args.videos)]
    for nt, nv in sizes:
        peak_mib = memory_probe(args, nt, nv)
        block = min(chunk, nt) * L * min(chunk, nv) * T * 4 / 2**20
        report("wti_memory", texts=nt, videos=nv, peak_extra_mib=peak_mib, chunk_block_mib=block,
               output_mib=nt * nv * 4 / 2**20, text_features_mib=nt * L * d * 4 / 2**20,
               video_features_mib=nv * T * d * 4 / 2**20)


def memory_probe(args: argparse.Namespace, texts: int, videos: int) -> float:
    """Peak MiB above the pre-call level of one ``similarity`` call, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--probe-memory", "--texts", str(texts), "--videos", str(videos), "--lengths", args.lengths,
           "--words", str(args.words), "--frames", str(args.frames), "--dim", str(args.dim)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def probe(model: DiffusionRet, args: argparse.Namespace) -> None:
    feats = inputs(args.texts, args.videos, args.words, args.frames, args.dim, args.lengths)
    with torch.no_grad(), PeakRSS() as mem:
        model.similarity(*feats, chunk_size=args.chunk)
    print(mem.peak_mib)


if __name__ == "__main__":
    main()
