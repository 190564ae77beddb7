"""Archive scale: resident memory and search latency of a served 1M-segment index, memory-mapped vs all in RAM.

    flock /tmp/bench.lock python benchmarks/bench_scale.py --videos 1000000 --features-cache /tmp/drbench/search
    python benchmarks/bench_scale.py --videos 20000 --queries 20 --cold-queries 5     # a quick look

The index is a real index folder (``catalog.sqlite``, safetensors shards of ``--shard-size`` rows,
the builder's default, a PQ file, the commit marker), written once into ``--cache`` from the
synthetic features of ``bench_search.py`` (random fp16 frames, T = 12, D = 512, some rows shorter,
pooled with the index's own ``pool_frames``, WTI frame weights stored). Each variant runs in its
own process, which does what ``diffusionret serve`` does before it listens: load the model (the
random ViT-B/32-sized search model of ``bench_search.py``), ``VideoIndex.load``, a ``Searcher``
with the default cascade (PQ first stage from 100k rows, N = 100, K = 32, 50 DDIM steps, 1 thread)
and the FastAPI app. Variants:

* ``mapped``: this checkout's source: frame features, masks and weights memory-mapped from the
  shards, pooled embeddings in RAM (fp16 from 100k rows);
* ``all-in-ram``: the source at ``--baseline-commit`` (default 133743d, before the maps), exported
  with ``git archive`` and put first on ``PYTHONPATH``: every row's features copied into RAM.

Per variant it prints the process's memory after load (``/proc/self/status``: VmRSS, RssAnon,
RssFile), the load time, and search latency over ``--queries`` distinct queries (after 5 warm-up
queries): wall p50/p99 and the thread CPU time p50 (``time.thread_time``, less sensitive to other
load on a shared machine); then the same with a cold page cache over ``--cold-queries`` further
queries: before each, the process drops its own mapped pages of the shard files
(``madvise(MADV_DONTNEED)``) and the kernel's cached pages of them (``posix_fadvise(DONTNEED)``), so
the gather reads from disk (major page faults per query are reported). Finally the share of
identical top-10 ids (and the largest score difference) between the variants, query by query.
Hold ``flock /tmp/bench.lock`` for 1M: the all-in-RAM variant needs ~15 GB.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import CACHE_DIR, REPO_ROOT, load_text, percentile, proc_status_kib

_MADV_DONTNEED = 4


# ------------------------------------------------------------------------------------ the index
def build_scale_index(n: int, root: Path, shard_size: int, features_cache: Path) -> Path:
    """A real index folder of ``n`` synthetic rows in ``root`` (written once; ``root/done`` marks it complete)."""
    from bench_search import feature_files, frame_weights, mapped_features, search_model

    from diffusionret.index import catalog
    from diffusionret.index.ann_build import save_ann
    from diffusionret.index.builder import WHOLE_SEGMENTS, write_commit_marker
    from diffusionret.index.catalog import VideoRecord, video_id
    from diffusionret.index.first_stage import PqFirstStage
    from diffusionret.index.identity import model_fingerprint
    from diffusionret.index.shards import SHARD_DIR, ShardEntry, new_shard_name, write_shard
    from diffusionret.index.store import index_fingerprint

    if (root / "done").exists():
        return root
    t, d = 12, 512
    torch.manual_seed(0)  # the search model of bench_search.py, seeded as its benchmarks seed it
    model = search_model(d, 12)
    model_id = model_fingerprint(model)
    folder = feature_files(n, t, d, features_cache)
    frames, mask, pooled = mapped_features(folder, n, t, d)
    weights = frame_weights(model, model_id, folder, frames, mask)
    print(f"writing a {n}-row index into {root} ({shard_size} rows per shard) ...", flush=True)
    start = time.perf_counter()
    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    conn = catalog.connect(root)
    catalog.write_info(conn, {
        "format_version": catalog.FORMAT_VERSION, "model_id": model_id, "model_config": {"synthetic": True},
        "model_path": None, "settings": {"synthetic": True}, "num_frames": t, "embed_dim": d,
        "sources": ["/synthetic/videos"], "video_root": None, "segments": WHOLE_SEGMENTS, "created_at": time.time(),
    })
    for sequence, lo in enumerate(range(0, n, shard_size)):
        hi = min(n, lo + shard_size)
        paths = [f"/synthetic/videos/{i:07d}.mp4" for i in range(lo, hi)]
        counts = mask[lo:hi].sum(dim=1).tolist()
        entries = [ShardEntry(video_id(p), p, 1_000_000, 0, 30.0, 320, 240, int(c)) for p, c in zip(paths, counts)]
        name = new_shard_name(0, sequence)
        write_shard(root / SHARD_DIR, name, model_id=model_id, entries=entries, failures=[], frames=frames[lo:hi],
                    frame_mask=mask[lo:hi], pooled=pooled[lo:hi], thumbnails=[None] * (hi - lo),
                    frame_weights=weights[lo:hi])
        records = [VideoRecord(e.id, e.path, e.size, e.mtime_ns, e.duration, e.width, e.height, e.num_frames, name, r)
                   for r, e in enumerate(entries)]
        catalog.register_shard(conn, name, time.time_ns(), records, [None] * len(records), [])
        if sequence % 500 == 0:
            print(f"  {hi} rows, {time.perf_counter() - start:.0f} s", flush=True)
    fingerprint, _ = index_fingerprint(conn)
    print("building the PQ first stage ...", flush=True)
    save_ann(PqFirstStage.build(pooled, fingerprint), root)
    write_commit_marker(conn, root)
    conn.close()
    (root / "done").write_text(f"{time.perf_counter() - start:.1f} s\n")
    return root


def disk_bytes(root: Path) -> dict[str, int]:
    """Bytes on disk of the index's shards, catalogue and ANN files."""
    shards = sum(p.stat().st_size for p in (root / "shards").iterdir())
    catalog_bytes = sum(p.stat().st_size for p in root.glob("catalog.sqlite*"))
    ann = sum(p.stat().st_size for p in root.glob("*.faiss"))
    return {"shards": shards, "catalog": catalog_bytes, "ann": ann}


# ------------------------------------------------------------------------------ the serving child
def memory() -> dict[str, float]:
    """GiB of this process: VmRSS, RssAnon, RssFile (``/proc/self/status``)."""
    return {key: kib / 2**20 for key, kib in proc_status_kib("VmRSS", "RssAnon", "RssFile").items()}


def drop_cache(root: Path) -> None:
    """Evict the shard files' pages: this process's mappings of them, then the kernel's page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    shard_dir = str((root / "shards").resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(shard_dir):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if libc.madvise(lo, hi - lo, _MADV_DONTNEED) != 0:
                raise OSError(ctypes.get_errno(), f"madvise failed on {parts[5]}")
    for path in (root / "shards").iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(args: argparse.Namespace) -> None:
    """Load and serve-prepare the index like ``diffusionret serve``, then time searches; prints one JSON line."""
    from bench_search import queries, search_model

    from diffusionret.index.first_stage import FirstStageConfig
    from diffusionret.index.identity import model_fingerprint
    from diffusionret.index.searcher import SearchConfig, Searcher
    from diffusionret.index.store import VideoIndex
    from diffusionret.models.config import DiffusionSchedule
    from diffusionret.serve.app import ServeConfig, create_app

    torch.set_num_threads(1)  # as `diffusionret serve --threads 1`
    torch.manual_seed(0)
    model = search_model(512, 12)
    model_id = model_fingerprint(model)
    before = memory()
    start = time.perf_counter()
    index = VideoIndex.load(args.index, model_id=model_id)
    searcher = Searcher(model, index, SearchConfig(first_stage=FirstStageConfig(method="auto")), model_id=model_id,
                        diffusion=DiffusionSchedule(50))
    create_app(searcher, ServeConfig())
    load_s = time.perf_counter() - start
    after_load = memory()
    # queries() orders a set, whose order follows the per-process string hash seed: fix it here so
    # that both variants run the same queries in the same order.
    texts = sorted(queries(5 + args.queries + args.cold_queries))
    random.Random(0).shuffle(texts)
    results: list[dict[str, object]] = []

    def run(text: str) -> tuple[float, float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        t0, c0 = time.perf_counter(), time.thread_time()
        hits = searcher.search(text, k=10)
        wall, cpu = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
        results.append({"query": text, "ids": [h.id for h in hits], "scores": [h.score for h in hits]})
        return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults

    for text in texts[:5]:
        run(text)
    warm = [run(text) for text in texts[5:5 + args.queries]]
    after_warm = memory()
    cold = []
    for text in texts[5 + args.queries:]:
        drop_cache(args.index)
        cold.append(run(text))
    out = {
        "variant": args.child, "source": str(Path(sys.modules["diffusionret"].__file__).parent),
        "rows": len(index), "first_stage": searcher.first_stage.describe(), "load_s": load_s,
        "model_anon_gib": before["RssAnon"], "after_load": after_load, "after_warm": after_warm,
        "warm": {"queries": len(warm), "p50_ms": percentile([w for w, _, _ in warm], 50),
                 "p99_ms": percentile([w for w, _, _ in warm], 99),
                 "cpu_p50_ms": percentile([c for _, c, _ in warm], 50)},
        "cold": {"queries": len(cold), "p50_ms": percentile([w for w, _, _ in cold], 50),
                 "p99_ms": percentile([w for w, _, _ in cold], 99),
                 "cpu_p50_ms": percentile([c for _, c, _ in cold], 50),
                 "major_faults_per_query": sum(f for _, _, f in cold) / max(1, len(cold))},
        "load_average": load_text(), "results": results,
    }
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------- the driver
def baseline_source(commit: str, cache: Path) -> Path:
    """``src`` of ``commit`` exported with ``git archive`` (once) into ``cache``."""
    target = cache / f"src-{commit}"
    if not (target / "diffusionret" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit, "src/diffusionret"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(target)], input=archive, check=True)
    return target


def run_variant(variant: str, args: argparse.Namespace, index: Path, source: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), str(Path(__file__).parent)]))
    command = [sys.executable, __file__, "--child", variant, "--index", str(index), "--queries", str(args.queries),
               "--cold-queries", str(args.cold_queries)]
    print(f"running {variant} ({source}) ...", flush=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def agreement(a: dict, b: dict) -> tuple[float, float, int]:
    """Share of queries with identical top-10 ids, the largest |score difference| where ids agree, and the count."""
    theirs = {r["query"]: r for r in b["results"]}
    same, worst, count = 0, 0.0, 0
    for x in a["results"]:
        y = theirs.get(x["query"])
        if y is None:
            continue
        count += 1
        if x["ids"] == y["ids"]:
            same += 1
            worst = max([worst] + [abs(p - q) for p, q in zip(x["scores"], y["scores"], strict=True)])
    return same / max(1, count), worst, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1_000_000, help="rows (segments) of the synthetic index")
    parser.add_argument("--shard-size", type=int, default=256, help="rows per shard (the builder's default)")
    parser.add_argument("--queries", type=int, default=100, help="timed warm queries per variant")
    parser.add_argument("--cold-queries", type=int, default=30, help="timed queries with a cold page cache")
    parser.add_argument("--variants", nargs="+", default=["mapped", "all-in-ram"], choices=["mapped", "all-in-ram"])
    parser.add_argument("--baseline-commit", default="133743d", help="source of the all-in-RAM variant")
    parser.add_argument("--features-cache", type=Path, default=CACHE_DIR / "search",
                        help="bench_search.py's synthetic feature cache")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR / "scale", help="where the index folder is written")
    parser.add_argument("--child", choices=["mapped", "all-in-ram"], help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    index = build_scale_index(args.videos, args.cache / f"index_{args.videos}_s{args.shard_size}", args.shard_size,
                              args.features_cache)
    sizes = disk_bytes(index)
    print(f"index {index}: {args.videos} rows, shards {sizes['shards'] / 2**30:.2f} GiB, catalogue "
          f"{sizes['catalog'] / 2**20:.0f} MiB, ANN {sizes['ann'] / 2**20:.0f} MiB "
          f"({sum(sizes.values()) / args.videos:.0f} bytes per row on disk)")
    sources = {"mapped": REPO_ROOT / "src", "all-in-ram": baseline_source(args.baseline_commit, args.cache)}
    runs = {v: run_variant(v, args, index, sources[v]) for v in args.variants}
    print(f"\n{'variant':<11} {'load s':>7} {'RSS GiB':>8} {'anon':>6} {'file':>6} {'RSS warm':>9} "
          f"{'warm p50':>9} {'p99':>7} {'cpu p50':>8} {'cold p50':>9} {'p99':>7} {'majflt/q':>9}  load avg")
    for v, r in runs.items():
        m, w, c = r["after_load"], r["warm"], r["cold"]
        print(f"{v:<11} {r['load_s']:>7.1f} {m['VmRSS']:>8.2f} {m['RssAnon']:>6.2f} {m['RssFile']:>6.2f} "
              f"{r['after_warm']['VmRSS']:>9.2f} {w['p50_ms']:>9.1f} {w['p99_ms']:>7.1f} {w['cpu_p50_ms']:>8.1f} "
              f"{c['p50_ms']:>9.1f} {c['p99_ms']:>7.1f} {c['major_faults_per_query']:>9.1f}  {r['load_average']}")
        per_row = (m["RssAnon"] - r["model_anon_gib"]) * 2**30 / max(1, r["rows"])
        print(f"{'':<11} first stage {r['first_stage'].get('method')}, ~{per_row:.0f} anonymous bytes per row "
              f"beyond the model")
    if len(runs) == 2:
        share, worst, count = agreement(runs["mapped"], runs["all-in-ram"])
        ratio = runs["mapped"]["after_load"]["VmRSS"] / runs["all-in-ram"]["after_load"]["VmRSS"]
        p50 = runs["mapped"]["warm"]["p50_ms"] / runs["all-in-ram"]["warm"]["p50_ms"]
        cpu = runs["mapped"]["warm"]["cpu_p50_ms"] / runs["all-in-ram"]["warm"]["cpu_p50_ms"]
        print(f"\nRSS after load mapped / all-in-RAM: {ratio:.3f} (target <= 0.25); warm p50 {p50:.3f}x wall, "
              f"{cpu:.3f}x CPU (target <= 1.2)")
        print(f"identical top-10 ids: {share:.1%} of {count} queries; largest score "
              f"difference where identical: {worst:.2e}")
    print("JSON " + json.dumps({v: {k: x for k, x in r.items() if k != "results"} for v, r in runs.items()}))


if __name__ == "__main__":
    main()
