"""Search latency of one text query over 10k, 100k and 1M videos: the whole cascade, re-ranking included.

    python benchmarks/bench_search.py                       # 10k, 100k, 1M videos, 200 queries each
    python benchmarks/bench_search.py --sizes 10000 --queries 50

What runs is the real search path, :meth:`diffusionret.index.searcher.Searcher.search`: tokenise,
encode the text (a ViT-B/32-sized text tower: 12 layers, width 512, L=32), first stage over every
video's pooled embedding (:meth:`VideoIndex.search`), gather the top ``N=100`` videos' frame
features, WTI on them, diffusion re-ranking of the top ``K=32`` (50 DDIM steps), top-10 hits.
Model loading and index construction are not timed. The model is randomly initialised (latency
does not depend on the weights); its vision tower is shrunk because search never runs it.

The indexes are synthetic: random frame features (T=12, D=512, fp16, some videos shorter than 12
frames), pooled first-stage embeddings computed from them with the index's own
:func:`~diffusionret.index.features.pool_frames`, and one catalogue record per video. They are
:class:`VideoIndex` objects built in memory, exactly as :meth:`VideoIndex.load` would return them,
from feature files cached in ``benchmarks/.cache/search/`` (generated on first use: 1M videos
take about 5 minutes and 14 GB of disk). One difference at 1M: ``VideoIndex.load`` would hold
the 12 GB of frame features in RAM, which this 24 GB shared machine cannot spare, so for indexes
above ``--mmap-above`` videos the frame features are a read-only memory map of the cached file
(the page cache serves the 100 rows a query gathers; the pooled embeddings are in RAM as usual).

Printed per size: p50/p90/p99/mean/max latency over ``--queries`` distinct queries (after 5
warm-up queries), and the median time of each cascade stage over a subset of the queries
(measured separately, by calling the same functions the searcher calls, in the same order).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusionret.index.catalog import VideoRecord
from diffusionret.index.features import pool_frames
from diffusionret.index.identity import model_fingerprint
from diffusionret.index.searcher import SearchConfig, Searcher
from diffusionret.index.store import IndexInfo, VideoIndex
from diffusionret.models.config import ClipConfig, ModelConfig
from diffusionret.models.diffusionret import DiffusionRet

from _common import CACHE_DIR, add_thread_arg, apply_threads, machine, percentile, report, rss_bytes

_SUBJECTS = ["a man", "a woman", "a child", "two people", "a dog", "a cat", "a chef", "a group of friends", "a player",
             "a singer", "an old man", "a girl", "a boy", "a crowd", "a reporter", "a car", "a band", "a teacher"]
_VERBS = ["is cooking", "is playing", "is talking about", "is driving", "is singing", "is dancing with", "is showing",
          "is explaining", "is eating", "is riding", "is painting", "is fixing", "is running past", "is watching"]
_OBJECTS = ["pasta in a kitchen", "a guitar on stage", "the weather", "a red car on a highway", "a song in a studio",
            "a ball in the park", "a new phone", "a math problem", "noodles at a market", "a horse on a beach",
            "a wall outside", "a bicycle in a garage", "a football match", "a cartoon", "a tennis game"]


def queries(count: int, seed: int = 0) -> list[str]:
    """Distinct caption-like queries (MSR-VTT style)."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < count:
        out.add(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}")
    return sorted(out, key=lambda q: rng.random())


def search_model(dim: int, text_layers: int, steps: int) -> DiffusionRet:
    """A generation-stage model with a ViT-B/32-sized text tower and a token vision tower (unused by search)."""
    clip = ClipConfig(embed_dim=dim, image_size=32, vision_width=64, vision_layers=1, vision_patch_size=16,
                      text_width=dim, text_layers=text_layers)
    model = DiffusionRet(ModelConfig(clip=clip, stage="generation", temporal_layers=1, diffusion_steps=steps),
                         generator=torch.Generator().manual_seed(0))
    return model.eval()


def feature_files(n: int, frames: int, dim: int, cache: Path, seed: int = 0) -> Path:
    """Cached synthetic features of ``n`` videos: ``frames.f16`` (n, T, D), ``mask.u8`` (n, T), ``pooled.f32`` (n, D)."""
    folder = cache / f"synthetic_{n}_{frames}x{dim}_seed{seed}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating {n} synthetic videos in {folder} ...", flush=True)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    block = 16384
    with open(folder / "frames.f16", "wb") as ff, open(folder / "mask.u8", "wb") as fm, open(folder / "pooled.f32", "wb") as fp:
        for lo in range(0, n, block):
            b = min(block, n - lo)
            feats = torch.randn(b, frames, dim, generator=g).half()
            real = torch.where(torch.rand(b, generator=g) < 0.8, torch.full((b,), frames),
                               torch.randint(1, frames + 1, (b,), generator=g))
            mask = torch.arange(frames)[None, :] < real[:, None]
            feats = feats * mask[..., None]  # padded frames are zero, as the index stores them
            ff.write(feats.numpy().tobytes())
            fm.write(mask.to(torch.uint8).numpy().tobytes())
            fp.write(pool_frames(feats, mask).numpy().tobytes())
    (folder / "done").write_text(f"{time.perf_counter() - start:.1f} s\n")
    return folder


def synthetic_index(n: int, frames: int, dim: int, model_id: str, cache: Path, mmap_above: int) -> VideoIndex:
    """A :class:`VideoIndex` of ``n`` synthetic videos (frame features memory-mapped above ``mmap_above``)."""
    folder = feature_files(n, frames, dim, cache)
    mapped = torch.from_file(str(folder / "frames.f16"), shared=False, size=n * frames * dim,
                             dtype=torch.float16).view(n, frames, dim)
    video = mapped if n > mmap_above else mapped.clone()
    mask = torch.from_file(str(folder / "mask.u8"), shared=False, size=n * frames, dtype=torch.uint8)
    pooled = torch.from_file(str(folder / "pooled.f32"), shared=False, size=n * dim, dtype=torch.float32)
    info = IndexInfo(model_id=model_id, model_config={"synthetic": True}, model_path=None, settings={"synthetic": True},
                     num_frames=frames, embed_dim=dim)
    records = [VideoRecord(id=f"{i:016x}", path=f"/synthetic/videos/{i:07d}.mp4", size=1_000_000, mtime_ns=0,
                           duration=30.0, width=320, height=240, num_frames=frames, shard="synthetic.safetensors", row=i)
               for i in range(n)]
    return VideoIndex(folder, info, records, video, mask.view(n, frames).bool().clone(), pooled.view(n, dim).clone())


def stage_times(searcher: Searcher, texts: list[str], k: int) -> dict[str, float]:
    """Median ms of each cascade stage, calling what ``Searcher.search`` calls, in its order."""
    cfg, model, index = searcher.config, searcher.model, searcher.index
    parts: dict[str, list[float]] = {"encode_text": [], "first_stage": [], "gather": [], "wti": [], "rerank": []}
    with torch.no_grad():
        for text in texts:
            t0 = time.perf_counter()
            tokens, mask, cls = searcher.encode_queries([text])
            t1 = time.perf_counter()
            _, rows = index.search(F.normalize(cls.float(), dim=-1).cpu(), max(cfg.candidates, k))
            t2 = time.perf_counter()
            video, frame_mask = index.gather(rows[0])
            t3 = time.perf_counter()
            wti = model.similarity(tokens, mask, video, frame_mask)
            t4 = time.perf_counter()
            generator = torch.Generator().manual_seed(cfg.seed)
            model.rerank_t2v(wti, cls, video, frame_mask, top_k=min(cfg.rerank_top_k, wti.shape[1]), generator=generator)
            t5 = time.perf_counter()
            for name, a, b in (("encode_text", t0, t1), ("first_stage", t1, t2), ("gather", t2, t3), ("wti", t3, t4),
                               ("rerank", t4, t5)):
                parts[name].append((b - a) * 1e3)
    return {f"{name}_ms": percentile(values, 50) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200, help="timed queries per index size")
    parser.add_argument("--stage-queries", type=int, default=30, help="queries for the per-stage breakdown")
    parser.add_argument("--candidates", type=int, default=100, help="N, first-stage candidates scored by WTI")
    parser.add_argument("--rerank-top-k", type=int, default=32, help="K, WTI candidates re-ranked")
    parser.add_argument("--k", type=int, default=10, help="hits returned")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the re-ranking")
    parser.add_argument("--mmap-above", type=int, default=200_000,
                        help="memory-map the frame features of larger indexes instead of loading them")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR / "search")
    add_thread_arg(parser)
    args = parser.parse_args()
    apply_threads(args)
    torch.manual_seed(0)
    model = search_model(args.dim, args.text_layers, args.steps)
    model_id = model_fingerprint(model)
    config = SearchConfig(candidates=args.candidates, rerank_top_k=args.rerank_top_k)
    texts = queries(args.queries + args.stage_queries + 5)
    print(f"machine: {machine()}")
    print(f"cascade: text tower {args.text_layers}x{args.dim}, N={args.candidates}, K={args.rerank_top_k}, "
          f"{args.steps} DDIM steps, T={args.frames}, D={args.dim}, top {args.k}")
    for n in args.sizes:
        start = time.perf_counter()
        index = synthetic_index(n, args.frames, args.dim, model_id, args.cache, args.mmap_above)
        searcher = Searcher(model, index, config, model_id=model_id)
        setup_s = time.perf_counter() - start
        for text in texts[:5]:  # warm-up: thread pools, first-touch of the pooled matrix, tokenizer load
            searcher.search(text, k=args.k)
        latencies = []
        for text in texts[5:5 + args.queries]:
            t0 = time.perf_counter()
            hits = searcher.search(text, k=args.k)
            latencies.append((time.perf_counter() - t0) * 1e3)
            assert len(hits) == min(args.k, n) and "rerank" in hits[0].stage_scores
        stages = stage_times(searcher, texts[5 + args.queries:], args.k)
        report("search", videos=n, queries=len(latencies), p50_ms=percentile(latencies, 50),
               p90_ms=percentile(latencies, 90), p99_ms=percentile(latencies, 99),
               mean_ms=sum(latencies) / len(latencies), max_ms=max(latencies), **stages,
               frames_memory_mapped=n > args.mmap_above, setup_s=setup_s, rss_gib=rss_bytes() / 2**30)
        del searcher, index


if __name__ == "__main__":
    main()
