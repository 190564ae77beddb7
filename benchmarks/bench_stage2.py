"""Stage-2 epoch time: encoding every step (``train.feature_cache: off``) vs training from the cache.

    python benchmarks/bench_stage2.py                              # ViT-B/32 shapes, CPU, 1 and 2 threads
    python benchmarks/bench_stage2.py --device cuda --online-batch 128 --threads-list 0

Shapes are the paper's: ViT-B/32 (random weights: time does not depend on them), 12 frames of
224x224, 32 tokens, global batch 128 with 127 hard negatives, a training split of ``--videos``
videos with ``--captions`` captions each (default 512 x 2). Everything timed is the trainer's own
step (:func:`diffusionret.training.loop._train_step`: objective, backward, AdamW, EMA):

* **cached step**: a batch of 128 read from a memory-mapped cache file of the whole split (written
  by the same code as ``train``'s cache), WTI mining over it, both denoisers in the factored form
  ``train`` uses from the cache (``GenerationObjective(factored=True)``); the same step with the
  reference form (the online path's denoisers) is timed too (``cached_ref``);
* **online step**: the same step from frames and token ids, reference form, as ``train`` runs it
  without the cache. At batch 128 one CPU step takes minutes, so on CPU it is timed at
  ``--online-batch`` and projected: encoding is linear in the samples, so
  ``online(128) = cached_ref(128) + (online(b) - cached_ref(b)) * 128 / b``;
* **encoding**: the one-off pass that builds the cache (every video once, every caption once),
  timed on a few videos and captions and projected linearly.

Epoch times are ``steps_per_epoch * step``; the projection to MSR-VTT 9k (9,000 videos, 180,000
captions) x 5 epochs is printed last. Resident memory while reading the cache is reported as
anonymous (must fit in RAM) and file-backed (page cache of the map, evictable) memory.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from diffusionret.distributed import DistContext, TrainSampler
from diffusionret.evaluation.features import CorpusFeatures
from diffusionret.models.config import ModelConfig
from diffusionret.training.feature_cache import CachedBatches, TrainFeatureCache
from diffusionret.training.loop import _train_step

from _common import machine, proc_status_kib, report
from bench_train import make_run, random_batch

MSRVTT_VIDEOS, MSRVTT_CAPTIONS, MSRVTT_EPOCHS = 9_000, 180_000, 5


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory_kib() -> dict[str, int]:
    return proc_status_kib("RssAnon", "RssFile")


def write_cache(path: Path, videos: int, captions: int, frames: int, words: int, dim: int) -> Path:
    """A training cache file of random features with the shapes ``train`` writes."""
    g = torch.Generator().manual_seed(0)
    n = videos * captions
    text_mask = torch.zeros(n, words, dtype=torch.long)
    lengths = torch.randint(6, words, (n,), generator=g)
    text_mask[torch.arange(words)[None, :] < lengths[:, None]] = 1
    feats = CorpusFeatures(tokens=torch.randn(n, words, dim, generator=g), text_mask=text_mask,
                           cls=torch.randn(n, dim, generator=g), video=torch.randn(videos, frames, dim, generator=g),
                           frame_mask=torch.ones(videos, frames, dtype=torch.long),
                           caption_to_video=torch.arange(n) // captions, video_ids=[f"v{i}" for i in range(videos)],
                           meta={"benchmark": True}, text_index=torch.arange(n))
    return feats.save(path)


def memory_probe(captions: int, batch: int, frames: int, words: int, dim: int) -> None:
    """Resident memory while one epoch of batches is read from a memory-mapped cache (no model)."""
    with tempfile.TemporaryDirectory(prefix="bench_stage2_mem_") as tmp:
        videos = max(1, captions // 20)
        path = write_cache(Path(tmp) / "train.safetensors", videos, captions // videos, frames, words, dim)
        samples = videos * (captions // videos)
        before = _memory_kib()
        cache = TrainFeatureCache(path, samples)
        peak = dict(before)
        for batch in CachedBatches(cache, TrainSampler(samples, batch, DistContext.single("cpu"), seed=0)):
            now = _memory_kib()
            peak = {k: max(peak.get(k, 0), v) for k, v in now.items()}
            del batch
        report("stage2_cache_memory", captions=samples, videos=videos, file_mib=path.stat().st_size / 2**20,
               anon_growth_mib=(peak["RssAnon"] - before["RssAnon"]) / 1024,
               file_backed_growth_mib=(peak["RssFile"] - before["RssFile"]) / 1024)


def time_steps(run, batches, device: str, repeat: int, cpu: dict[str, float] | None = None) -> float:
    """Mean wall seconds per step over ``repeat`` steps after one warm-up step.

    ``cpu``, when given, receives the mean process CPU seconds per step under ``"s"`` (all threads;
    less sensitive than wall time to other jobs on a shared machine).
    """
    _train_step(run, batches[0])
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(repeat):
        _train_step(run, batches[(i + 1) % len(batches)])
    _sync(device)
    if cpu is not None:
        cpu["s"] = (time.process_time() - start_cpu) / repeat
    return (time.perf_counter() - start) / repeat


@torch.no_grad()
def time_encoding(model, device: str, frames: int, words: int, image: int, videos: int, captions: int,
                  amp: torch.dtype | None) -> tuple[float, float]:
    """Seconds per video (``frames`` frames) and per caption of the frozen encoders (after a warm-up),
    under the training step's autocast."""
    with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
        return _time_encoding(model, device, frames, words, image, videos, captions)


def _time_encoding(model, device: str, frames: int, words: int, image: int, videos: int,
                   captions: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    batch = random_batch(max(videos, captions), frames, words, image, g)
    v = {k: t.to(device) for k, t in batch.items()}
    model.encode_video(v["frames"][:1], v["frame_mask"][:1])
    _sync(device)
    start = time.perf_counter()
    model.encode_video(v["frames"][:videos], v["frame_mask"][:videos])
    _sync(device)
    per_video = (time.perf_counter() - start) / videos
    start = time.perf_counter()
    model.encode_text(v["text_ids"][:captions], v["text_mask"][:captions])
    _sync(device)
    return per_video, (time.perf_counter() - start) / captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=512)
    parser.add_argument("--captions", type=int, default=2, help="captions per video")
    parser.add_argument("--batch", type=int, default=128, help="global batch (127 hard negatives)")
    parser.add_argument("--online-batch", type=int, default=4,
                        help="batch of the timed online steps (projected to --batch; see the docstring)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--encode-videos", type=int, default=4, help="videos timed for the encoding pass")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--memory-captions", type=int, default=None,
                        help="only measure resident memory over one epoch read from a cache of this many captions "
                             "(20 per video, as MSR-VTT), then exit")
    parser.add_argument("--threads-list", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts to measure (0: leave torch's default)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig.vit_b32()
    image, dim = config.clip.image_size, config.clip.embed_dim
    if args.memory_captions:
        memory_probe(args.memory_captions, args.batch, args.frames, args.words, dim)
        return
    amp = torch.bfloat16 if args.device == "cuda" and torch.cuda.is_bf16_supported() else None
    samples = args.videos * args.captions
    steps_per_epoch = samples // args.batch
    tmp = Path(tempfile.mkdtemp(prefix="bench_stage2_"))
    cache_path = write_cache(tmp / "train.safetensors", args.videos, args.captions, args.frames, args.words, dim)
    print(f"machine: {machine()}")
    print(f"ViT-B/32 shapes: {image}px, T={args.frames}, L={args.words}, D={dim}; {args.videos} videos x "
          f"{args.captions} captions, global batch {args.batch} -> {steps_per_epoch} steps per epoch; "
          f"cache file {cache_path.stat().st_size / 2**20:.0f} MiB (fp32)")
    for threads in args.threads_list:
        if threads:
            torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        # Cached: the real memory-mapped cache, through the training sampler (batch 128).
        cache = TrainFeatureCache(cache_path, samples)
        sampler = TrainSampler(samples, args.batch, DistContext.single(args.device), seed=0)
        # Memory of reading one epoch from the map, one batch at a time (as training does).
        before = _memory_kib()
        peak_anon = 0
        for batch in CachedBatches(cache, sampler):
            peak_anon = max(peak_anon, _memory_kib().get("RssAnon", 0))
            del batch
        after = _memory_kib()
        cached_batches = list(CachedBatches(cache, sampler))
        run = make_run("generation", total_steps=1000, config=config, device=args.device, amp_dtype=amp,
                       num_negatives=args.batch - 1, factored=True)
        big_steps = min(args.steps, len(cached_batches) - 1) or 1
        cpu: dict[str, dict[str, float]] = {k: {} for k in ("cached", "cached_ref", "cached_small", "online_small")}
        cached_big = time_steps(run, cached_batches, args.device, big_steps, cpu["cached"])
        run.objective.factored = False  # the same step with the online path's (reference) denoisers
        cached_ref_big = time_steps(run, cached_batches, args.device, big_steps, cpu["cached_ref"])
        small = args.online_batch
        small_cached = [b for b in CachedBatches(cache, TrainSampler(samples, small, DistContext.single(args.device)))][:4]
        run_small = make_run("generation", total_steps=1000, config=config, device=args.device, amp_dtype=amp,
                             num_negatives=small - 1, factored=False)
        cached_small = time_steps(run_small, small_cached, args.device, args.steps, cpu["cached_small"])
        online_batches = [random_batch(small, args.frames, args.words, image, g) for _ in range(2)]
        online_batches = [{k: v.to(args.device) for k, v in b.items()} for b in online_batches]
        online_small = time_steps(run_small, online_batches, args.device, args.steps, cpu["online_small"])
        online_big = cached_ref_big + max(0.0, online_small - cached_small) * args.batch / small
        c = {k: v["s"] for k, v in cpu.items()}
        online_big_cpu = c["cached_ref"] + max(0.0, c["online_small"] - c["cached_small"]) * args.batch / small
        per_video, per_caption = time_encoding(run.model, args.device, args.frames, args.words, image,
                                               args.encode_videos, args.encode_videos * args.captions, amp)
        encode_once = per_video * args.videos + per_caption * samples
        epoch_online, epoch_cached = online_big * steps_per_epoch, cached_big * steps_per_epoch
        ms_steps = MSRVTT_CAPTIONS // args.batch
        ms_encode = per_video * MSRVTT_VIDEOS + per_caption * MSRVTT_CAPTIONS
        report("stage2_epoch", device=args.device, threads=torch.get_num_threads(), videos=args.videos,
               samples=samples, batch=args.batch, steps_per_epoch=steps_per_epoch,
               online_step_s_at_small_batch=online_small, cached_step_s_at_small_batch=cached_small,
               online_step_s=online_big, cached_step_s=cached_big, cached_ref_step_s=cached_ref_big,
               factored_speedup=cached_ref_big / cached_big, online_step_cpu_s=online_big_cpu,
               cached_step_cpu_s=c["cached"], cached_ref_step_cpu_s=c["cached_ref"],
               speedup_cpu=online_big_cpu / c["cached"], epoch_online_s=epoch_online,
               epoch_cached_s=epoch_cached, speedup=epoch_online / epoch_cached,
               encode_once_s=encode_once, encode_s_per_video=per_video, encode_s_per_caption=per_caption,
               epoch_read_anon_growth_mib=(peak_anon - before.get("RssAnon", 0)) / 1024,
               epoch_read_file_growth_mib=(after.get("RssFile", 0) - before.get("RssFile", 0)) / 1024)
        report("stage2_msrvtt9k_5_epochs_projected", device=args.device, threads=torch.get_num_threads(),
               online_h=MSRVTT_EPOCHS * ms_steps * online_big / 3600,
               cached_h=(ms_encode + MSRVTT_EPOCHS * ms_steps * cached_big) / 3600,
               encode_once_h=ms_encode / 3600, cached_epoch_min=ms_steps * cached_big / 60,
               cache_gib_fp32=(MSRVTT_CAPTIONS * (args.words * dim + dim + args.words * 2)
                               + MSRVTT_VIDEOS * args.frames * dim) * 4 / 2**30)
        del run, run_small, cache, cached_batches
        if not math.isfinite(epoch_online):
            raise RuntimeError("non-finite timing")


if __name__ == "__main__":
    main()
