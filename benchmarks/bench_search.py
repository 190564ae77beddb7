"""Search latency of one text query over 10k, 100k and 1M videos: the whole cascade, re-ranking included.

    python benchmarks/bench_search.py --threads 1           # 10k, 100k, 1M videos, 200 queries each
    python benchmarks/bench_search.py --sizes 10000 --queries 50
    python benchmarks/bench_search.py --first-stage exact   # no ANN (fp16 exact first stage from 100k)
    python benchmarks/bench_search.py --sizes 1000000 --first-stage ivf --recall-rescore   # IVF-Flat cascade

What runs is the real search path, :meth:`diffusionret.index.searcher.Searcher.search`: tokenise,
encode the text (a ViT-B/32-sized text tower: 12 layers, width 512, L=32 trimmed to the query's
length + 1), first stage over every video's pooled embedding (:meth:`VideoIndex.search`: exact
fp32 below 100k videos, an ANN index from 100k when FAISS is installed: PQ fast-scan with exact
re-scoring by default, ``--first-stage ivf`` for IVF-Flat), gather the top ``N=100``
videos' frame features and stored WTI frame weights, WTI on them, diffusion re-ranking of the top
``K=32`` (50 DDIM steps), top-10 hits. Model loading and index construction are not timed. The
model is randomly initialised (latency does not depend on the weights); its vision tower is
shrunk because search never runs it.

The indexes are synthetic: random frame features (T=12, D=512, fp16, some videos shorter than 12
frames), pooled first-stage embeddings computed from them with the index's own
:func:`~diffusionret.index.features.pool_frames`, and one catalogue record per video. They are
:class:`VideoIndex` objects built in memory, exactly as :meth:`VideoIndex.load` would return them,
from feature files cached in ``benchmarks/.cache/search/`` (generated on first use: 1M videos
take about 5 minutes and 14 GB of disk). Above ``--mmap-above`` videos the frame features are a
read-only memory map of the cached file, as ``VideoIndex.load`` maps them from an index's shards
(the page cache serves the 100 rows a query gathers; the pooled embeddings are in RAM, here fp32);
``bench_scale.py`` measures a real index folder loaded both ways.
The WTI frame weights an index stores are computed once with the model (``DiffusionRet.frame_weights``)
and cached next to the features; so are the ANN files (``pq-<content>.faiss``, ``ivf-<content>.faiss``,
as in an index folder; ``--rebuild-ann`` times fresh builds).

Printed per size:

* ``first_stage``: which first stage runs; for large sizes the ANN build (or load) times, and
  recall@``N`` of each first stage against the exact fp32 top ``N`` over ``--recall-queries`` real
  query embeddings, with its median time: IVF at each ``--recall-nprobe``, PQ at each
  ``--recall-rescore`` (and, built in memory, at each ``--recall-pq-m``), and fp16 exact;
  ``final_top10_agreement``: the share of the final top 10 (whole cascade) that the ANN cascade
  has in common with the exact one.
* ``search``: p50/p90/p99/mean/max latency over ``--queries`` distinct queries (after 5 warm-up
  queries), and the median time of each cascade stage over ``--stage-queries`` further queries
  (measured separately, by calling the same functions the searcher calls, in the same order).
* ``search_batch_cpu`` (with ``--batch-sizes``): CPU ms per query of a batched search of b
  queries (:meth:`Searcher.search_batch`, as ``serve`` runs concurrent requests) and of b single
  searches, for each b.
* ``search_exact``: for large sizes, the same latency with the fp16 exact first stage (no FAISS).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    CACHE_DIR,
    head_model,
    parse_bench_args,
    machine,
    percentile,
    report,
    rss_bytes,
)

from diffusionret.index.ann_build import save_ann
from diffusionret.index.catalog import VideoRecord
from diffusionret.index.features import pool_frames
from diffusionret.index.first_stage import (
    ANN_KINDS,
    DEFAULT_RESCORE,
    LARGE_INDEX_VIDEOS,
    FirstStageConfig,
    IvfFirstStage,
    PqFirstStage,
    ann_path,
    default_nlist,
    default_pq_m,
    exact_topk,
)
from diffusionret.index.identity import model_fingerprint
from diffusionret.index.searcher import SearchConfig, Searcher
from diffusionret.index.store import IndexInfo, VideoIndex
from diffusionret.models.config import DiffusionSchedule
from diffusionret.models.diffusionret import DiffusionRet

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


def search_model(dim: int, text_layers: int) -> DiffusionRet:
    """A generation-stage model with a ViT-B/32-sized text tower and a token vision tower (unused by search)."""
    return head_model(dim, denoisers=True, text_layers=text_layers, vocab_size=49408,
                      generator=torch.Generator().manual_seed(0))


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


def mapped_features(folder: Path, n: int, frames: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The files of :func:`feature_files`: frames (n, T, D) float16 and pooled (n, D) float32 memory-mapped
    (copy-on-write), mask (n, T) bool in RAM."""
    video = torch.from_file(str(folder / "frames.f16"), shared=False, size=n * frames * dim,
                            dtype=torch.float16).view(n, frames, dim)
    mask = torch.from_file(str(folder / "mask.u8"), shared=False, size=n * frames, dtype=torch.uint8)
    pooled = torch.from_file(str(folder / "pooled.f32"), shared=False, size=n * dim, dtype=torch.float32)
    return video, mask.view(n, frames).bool(), pooled.view(n, dim)


def synthetic_index(n: int, frames: int, dim: int, model: DiffusionRet, model_id: str, cache: Path,
                    mmap_above: int) -> VideoIndex:
    """A :class:`VideoIndex` of ``n`` synthetic videos with stored frame weights.

    The frame features are memory-mapped above ``mmap_above`` videos.
    """
    folder = feature_files(n, frames, dim, cache)
    mapped, mask, pooled = mapped_features(folder, n, frames, dim)
    video = mapped if n > mmap_above else mapped.clone()
    info = IndexInfo(model_id=model_id, model_config={"synthetic": True}, model_path=None, settings={"synthetic": True},
                     num_frames=frames, embed_dim=dim)
    records = [VideoRecord(id=f"{i:016x}", path=f"/synthetic/videos/{i:07d}.mp4", size=1_000_000, mtime_ns=0,
                           duration=30.0, width=320, height=240, num_frames=frames, shard="synthetic.safetensors", row=i)
               for i in range(n)]
    weights = frame_weights(model, model_id, folder, video, mask)
    return VideoIndex(folder, info, records, video, mask, pooled.clone(), frame_weights=weights)


def frame_weights(model: DiffusionRet, model_id: str, folder: Path, video: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """The WTI frame weights an index would store (``DiffusionRet.frame_weights``), cached per model."""
    path = folder / f"frame_weights_{model_id[:16]}.f32"
    n, t = mask.shape
    if not path.exists():
        print(f"computing the frame weights of {n} videos ...", flush=True)
        start = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle, torch.no_grad():
            for lo in range(0, n, 16384):
                handle.write(model.frame_weights(video[lo:lo + 16384], mask[lo:lo + 16384].long()).numpy().tobytes())
        tmp.rename(path)
        print(f"  {time.perf_counter() - start:.1f} s", flush=True)
    return torch.from_file(str(path), shared=False, size=n * t, dtype=torch.float32).view(n, t).clone()


def ann_stage(index: VideoIndex, kind: str, rebuild: bool,
              pq_m: int | None = None) -> tuple[IvfFirstStage | PqFirstStage, dict[str, object]]:
    """The ``kind`` ANN first stage of a synthetic index: loaded from its cached file, or built (timed) and saved."""
    fingerprint = index.content_fingerprint
    path = ann_path(index.root, kind, fingerprint)
    timing_file = path.with_suffix(".build_s")
    start = time.perf_counter()
    stage: IvfFirstStage | PqFirstStage | None = None
    if not rebuild:
        stage = (PqFirstStage.load(index.root, fingerprint, pooled=index.pooled) if kind == "pq" else
                 IvfFirstStage.load(index.root, fingerprint, expected_rows=len(index), embed_dim=index.info.embed_dim))
    if stage is not None and (kind != "pq" or stage.index.M == (pq_m or default_pq_m(index.info.embed_dim))):
        return stage, {f"{kind}_load_s": time.perf_counter() - start,
                       f"{kind}_build_s": float(timing_file.read_text()) if timing_file.exists() else float("nan"),
                       f"{kind}_build_cached": True}
    detail = f"nlist {default_nlist(len(index))}" if kind == "ivf" else f"M {pq_m or default_pq_m(index.info.embed_dim)}"
    print(f"building the {kind.upper()} index over {len(index)} videos ({detail}) ...", flush=True)
    start = time.perf_counter()
    stage = (PqFirstStage.build(index.pooled, fingerprint, m=pq_m) if kind == "pq"
             else IvfFirstStage.build(index.pooled, fingerprint))
    build_s = time.perf_counter() - start
    save_ann(stage, index.root)
    timing_file.write_text(f"{build_s:.3f}\n")
    return stage, {f"{kind}_build_s": build_s, f"{kind}_build_cached": False}


def _recall(stage: object, queries: torch.Tensor, truth_sets: list[set[int]], n_cand: int) -> tuple[float, float]:
    """Mean recall@``n_cand`` of ``stage.search`` one query at a time, and its median ms."""
    found, times = [], []
    for q, expected in zip(queries, truth_sets, strict=True):
        t0 = time.perf_counter()
        _, rows = stage.search(q[None], n_cand)
        times.append((time.perf_counter() - t0) * 1e3)
        found.append(len(expected & set(rows[0].tolist())) / n_cand)
    return sum(found) / len(found), percentile(times, 50)


def recall_report(searcher: Searcher, texts: list[str], kinds: set[str], nprobes: list[int], rescores: list[int],
                  extra_pq_m: list[int]) -> dict[str, object]:
    """Recall@N of the first stages against the exact fp32 top N (and their median ms); ``kinds``: ANN indexes loaded."""
    index, n_cand = searcher.index, searcher.config.candidates
    with torch.no_grad():
        cls = torch.cat([searcher.encode_queries([t])[2] for t in texts])
    queries = F.normalize(cls.float(), dim=-1)
    _, truth = exact_topk(queries, index.pooled, n_cand)
    truth_sets = [set(r.tolist()) for r in truth]
    out: dict[str, object] = {}
    configs = [(f"ivf_nprobe{p}", FirstStageConfig(method="ivf", nprobe=p)) for p in nprobes if "ivf" in kinds]
    configs += [(f"pq_rescore{r}", FirstStageConfig(method="pq", rescore=r)) for r in rescores if "pq" in kinds]
    configs.append(("exact_fp16", FirstStageConfig(method="exact", precision="float16")))
    for name, config in configs:
        stage = index.open_first_stage(config)
        out[f"recall@{n_cand}_{name}"], out[f"first_stage_ms_{name}"] = _recall(stage, queries, truth_sets, n_cand)
    for m in extra_pq_m:  # other PQ sizes, built in memory only (not saved, not used by the cascade)
        start = time.perf_counter()
        stage = PqFirstStage.build(index.pooled, index.content_fingerprint, m=m)
        out[f"pq_m{m}_build_s"] = time.perf_counter() - start
        for r in rescores:
            stage.rescore = r
            name = f"pq_m{m}_rescore{r}"
            out[f"recall@{n_cand}_{name}"], out[f"first_stage_ms_{name}"] = _recall(stage, queries, truth_sets, n_cand)
        del stage
    return out


def final_agreement(searcher: Searcher, exact: SearchConfig, texts: list[str], k: int) -> float:
    """Share of the final top ``k`` hits of ``searcher`` that a cascade with an exact first stage also returns."""
    index = searcher.index
    approx = [[h.id for h in searcher.search(t, k=k)] for t in texts]
    reference = Searcher(searcher.model, index, exact, model_id=index.model_id,
                         diffusion=DiffusionSchedule(searcher.reranker.config.steps) if searcher.reranker else None)
    same = [len(set(a) & {h.id for h in reference.search(t, k=k)}) / k for a, t in zip(approx, texts, strict=True)]
    return sum(same) / len(same)


def stage_times(searcher: Searcher, texts: list[str], k: int) -> dict[str, float]:
    """Median ms of each cascade stage, calling what ``Searcher.search`` calls, in its order."""
    cfg, model, index = searcher.config, searcher.model, searcher.index
    parts: dict[str, list[float]] = {"encode_text": [], "first_stage": [], "gather": [], "wti": [], "rerank": []}
    with torch.no_grad():
        for text in texts:
            t0 = time.perf_counter()
            tokens, mask, cls = searcher.encode_queries([text])
            t1 = time.perf_counter()
            _, rows = index.search(F.normalize(cls.float(), dim=-1).cpu(), max(cfg.candidates, k),
                                   stage=searcher.first_stage)
            t2 = time.perf_counter()
            video, frame_mask = index.gather(rows[0])
            weights = index.gather_weights(rows[0])
            t3 = time.perf_counter()
            wti = model.similarity(tokens, mask, video, frame_mask, frame_weights=weights)
            t4 = time.perf_counter()
            generator = torch.Generator().manual_seed(cfg.seed)
            if searcher.reranker is not None:
                searcher.reranker.t2v(wti, cls, video, frame_mask, generator=generator)
            t5 = time.perf_counter()
            for name, a, b in (("encode_text", t0, t1), ("first_stage", t1, t2), ("gather", t2, t3), ("wti", t3, t4),
                               ("rerank", t4, t5)):
                parts[name].append((b - a) * 1e3)
    return {f"{name}_ms": percentile(values, 50) for name, values in parts.items()}


def latency(searcher: Searcher, texts: list[str], k: int, warmup: int = 5) -> dict[str, float]:
    """p50/p90/p99/mean/max ms of ``Searcher.search`` over ``texts[warmup:]`` (after ``texts[:warmup]``)."""
    for text in texts[:warmup]:  # warm-up: thread pools, first touch of the embeddings, tokenizer load
        searcher.search(text, k=k)
    latencies = []
    for text in texts[warmup:]:
        t0 = time.perf_counter()
        hits = searcher.search(text, k=k)
        latencies.append((time.perf_counter() - t0) * 1e3)
        assert len(hits) == min(k, len(searcher.index)) and "rerank" in hits[0].stage_scores
    return {"queries": len(latencies), "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
            "p99_ms": percentile(latencies, 99), "mean_ms": sum(latencies) / len(latencies), "max_ms": max(latencies)}


def batch_cpu(searcher: Searcher, texts: list[str], sizes: list[int], k: int, rounds: int = 3) -> dict[str, float]:
    """CPU ms per query (``time.process_time``, so other load on the machine counts less than in
    wall time) of ``search_batch`` over b queries, against b single searches, for each b in ``sizes``;
    the median of ``rounds`` rounds, each on fresh queries."""
    out: dict[str, float] = {}
    for b in sizes:
        single, batched = [], []
        for r in range(rounds):
            chunk = texts[(r * b) % len(texts):][:b] or texts[:b]
            t0 = time.process_time()
            alone = [searcher.search(t, k=k) for t in chunk]
            t1 = time.process_time()
            together = searcher.search_batch(chunk, k)
            t2 = time.process_time()
            single.append((t1 - t0) * 1e3 / len(chunk))
            batched.append((t2 - t1) * 1e3 / len(chunk))
            assert [[h.id for h in hits] for hits in together] == [[h.id for h in hits] for hits in alone]
        out[f"cpu_ms_per_query_single_b{b}"] = percentile(single, 50)
        out[f"cpu_ms_per_query_batch_b{b}"] = percentile(batched, 50)
    return out


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
    parser.add_argument("--first-stage", choices=("auto", "exact", "ivf", "pq"), default="auto",
                        help="as `diffusionret search --first-stage` (auto: PQ from 100k videos)")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists scanned per query")
    parser.add_argument("--rescore", type=int, default=DEFAULT_RESCORE,
                        help="PQ: rescore x N shortlisted videos re-scored exactly")
    parser.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantisers (default: D/2)")
    parser.add_argument("--recall-queries", type=int, default=100, help="queries for recall (0: skip)")
    parser.add_argument("--recall-nprobe", type=int, nargs="*", default=[],
                        help="IVF nprobe values whose recall is measured (loads the 2 GB IVF file at 1M)")
    parser.add_argument("--recall-rescore", type=int, nargs="*", default=[5, 10, 20, 30],
                        help="PQ rescore factors whose recall is measured")
    parser.add_argument("--recall-pq-m", type=int, nargs="*", default=[],
                        help="other PQ sub-quantiser counts, built in memory, whose recall is measured")
    parser.add_argument("--agreement-queries", type=int, default=30,
                        help="queries for the final top-10 agreement of ANN vs exact cascades (0: skip)")
    parser.add_argument("--exact-queries", type=int, default=50,
                        help="timed queries with the fp16 exact first stage at large sizes (0: skip)")
    parser.add_argument("--rebuild-ann", "--rebuild-ivf", dest="rebuild_ann", action="store_true",
                        help="build (and time) the ANN indexes even if cached")
    parser.add_argument("--mmap-above", type=int, default=200_000,
                        help="memory-map the frame features of larger indexes instead of loading them")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                        help="also report the CPU ms per query of Searcher.search_batch at these batch sizes "
                             "against single searches (e.g. 1 4 8 16)")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR / "search")
    args = parse_bench_args(parser)
    model = search_model(args.dim, args.text_layers)
    diffusion = DiffusionSchedule(args.steps)  # the re-ranking's DDIM steps
    model_id = model_fingerprint(model)
    config = SearchConfig(candidates=args.candidates, rerank_top_k=args.rerank_top_k,
                          first_stage=FirstStageConfig(method=args.first_stage, nprobe=args.nprobe,
                                                       rescore=args.rescore))
    exact = dataclasses.replace(config, first_stage=FirstStageConfig(method="exact"))  # fp16 from 100k videos
    exact_fp32 = dataclasses.replace(config, first_stage=FirstStageConfig(method="exact", precision="float32"))
    texts = queries(args.queries + args.stage_queries + args.recall_queries + 5)
    timed, staged = texts[:args.queries + 5], texts[args.queries + 5:args.queries + 5 + args.stage_queries]
    recall_texts = texts[len(texts) - args.recall_queries:] if args.recall_queries else []
    print(f"machine: {machine()}")
    print(f"cascade: text tower {args.text_layers}x{args.dim}, N={args.candidates}, K={args.rerank_top_k}, "
          f"{args.steps} DDIM steps, T={args.frames}, D={args.dim}, top {args.k}")
    for n in args.sizes:
        start = time.perf_counter()
        index = synthetic_index(n, args.frames, args.dim, model, model_id, args.cache, args.mmap_above)
        setup_s = time.perf_counter() - start
        first: dict[str, object] = {}
        large = n >= LARGE_INDEX_VIDEOS
        kinds = set()
        if faiss_installed() and (large or args.first_stage in ANN_KINDS):
            kinds |= {"pq"} if args.first_stage in ("auto", "pq") else {args.first_stage} - {"exact"}
            if large and recall_texts:
                kinds |= ({"ivf"} if args.recall_nprobe else set()) | ({"pq"} if args.recall_rescore else set())
        for kind in sorted(kinds):
            stage, built = ann_stage(index, kind, args.rebuild_ann, pq_m=args.pq_m)
            first.update(built)
            index.configure_first_stage(config.first_stage, ann=stage)
        searcher = Searcher(model, index, config, model_id=model_id, diffusion=diffusion)
        first["first_stage"] = searcher.first_stage.describe()
        if recall_texts and large and faiss_installed():
            first.update(recall_report(searcher, recall_texts, kinds, args.recall_nprobe, args.recall_rescore,
                                       args.recall_pq_m))
        if args.agreement_queries and large and searcher.first_stage.name != "exact":
            first["final_top10_agreement"] = final_agreement(searcher, exact_fp32,
                                                             recall_texts[:args.agreement_queries], args.k)
        report("first_stage", videos=n, **first)
        measured = latency(searcher, timed, args.k)
        stages = stage_times(searcher, staged, args.k)
        report("search", videos=n, **measured, **stages, frames_memory_mapped=n > args.mmap_above, setup_s=setup_s,
               rss_gib=rss_bytes() / 2**30)
        if args.batch_sizes:
            report("search_batch_cpu", videos=n, **batch_cpu(searcher, timed, args.batch_sizes, args.k))
        if args.exact_queries and large and searcher.first_stage.name != "exact":
            exact_searcher = Searcher(model, index, exact, model_id=model_id, diffusion=diffusion)
            report("search_exact", videos=n, first_stage=exact_searcher.first_stage.describe(),
                   **latency(exact_searcher, timed[:5 + args.exact_queries], args.k),
                   first_stage_ms=stage_times(exact_searcher, staged[:10], args.k)["first_stage_ms"])
        del searcher, index


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
