"""GPU readiness: a ViT-B/32-sized model through training steps of both stages and an MSR-VTT-scale evaluation.

Run it through ``benchmarks/gpu.sh`` (which checks for a GPU and bounds the wall time), or directly:

    python benchmarks/gpu_bench.py                 # batch 32, T=12, L=32, 224 px, 10 timed steps
    python benchmarks/gpu_bench.py --batch 64 --steps 20

On a CUDA machine it prints, as human lines plus ``JSON {...}`` lines:

* ``gpu_train``: for stage 1 (discrimination: CLIP ViT-B/32 + 4-layer temporal transformer + WTI,
  all trainable but conv1) and stage 2 (generation: frozen backbone, both denoisers), in fp32 and
  with bf16 autocast: steps/s, samples/s and peak GPU memory of the trainer's own step function
  (:func:`diffusionret.training.loop._train_step`, as in ``bench_train.py``).
* ``gpu_eval``: an MSR-VTT-1k-A-sized evaluation (1,000 captions x 1,000 videos of 12 frames at
  224 px, L=32) with the evaluation driver (:func:`diffusionret.evaluation.evaluate.evaluate_features`:
  chunked WTI matrix, diffusion re-ranking of both directions with K=32 and 50 DDIM steps,
  metrics), after encoding the captions and videos in fp32 and in bf16 autocast: encoding
  throughput, the driver's wall time, peak GPU memory.

The model is randomly initialised (timings do not depend on the weights) and the inputs are random
tensors made on the GPU, so no download, dataset or decoder is involved. Parts that would start
after ``--budget-s`` seconds are skipped (default 420 s, so the whole run stays under 8 minutes).
Without CUDA it refuses (exit status 2): CPU numbers are what the other benchmarks measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from _common import report

REFUSAL = ("gpu_bench: no CUDA device is available to torch (torch.cuda.is_available() is False). This benchmark "
           "measures GPU throughput and memory and refuses to run on CPU; the CPU benchmarks are bench_*.py.")


def cuda_batch(batch: int, frames: int, words: int, image: int, device: torch.device, seed: int) -> dict:
    from bench_train import random_batch

    g = torch.Generator().manual_seed(seed)
    small = random_batch(batch, frames, words, 1, g)  # ids, masks and keys; frames are made on the GPU
    out = {k: v.to(device) for k, v in small.items() if k != "frames"}
    gen = torch.Generator(device=device).manual_seed(seed)
    mask = out["frame_mask"][..., None, None, None].float()
    out["frames"] = torch.randn(batch, frames, 3, image, image, device=device, generator=gen) * mask
    return out


def train_bench(args: argparse.Namespace, config, stage: str, amp: torch.dtype | None, device: torch.device) -> None:
    from diffusionret.training.loop import _train_step

    from bench_train import make_run

    precision = "bf16" if amp == torch.bfloat16 else "fp32"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run = make_run(stage, args.warmup + args.steps, config=config, device=str(device), amp_dtype=amp,
                       num_negatives=min(127, args.batch - 1))
        batch = cuda_batch(args.batch, args.frames, args.words, config.clip.image_size, device, seed=0)
        for _ in range(args.warmup):
            _train_step(run, batch)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            logs = _train_step(run, batch)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        report("gpu_train", stage=stage, precision=precision, batch=args.batch, steps=args.steps,
               steps_per_s=args.steps / seconds, samples_per_s=args.steps * args.batch / seconds,
               ms_per_step=seconds / args.steps * 1e3, peak_alloc_gib=torch.cuda.max_memory_allocated(device) / 2**30,
               peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30, loss=round(logs["loss"], 4))
    except torch.cuda.OutOfMemoryError:
        report("gpu_train", stage=stage, precision=precision, batch=args.batch, error="out of GPU memory",
               peak_alloc_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    finally:
        run = batch = None
        torch.cuda.empty_cache()


@torch.no_grad()
def eval_bench(args: argparse.Namespace, model, precision: str, device: torch.device) -> None:
    from diffusionret.evaluation.evaluate import evaluate_features
    from diffusionret.retrieval import RerankConfig
    from diffusionret.evaluation.features import CorpusFeatures, autocast_context
    from diffusionret.distributed import DistContext

    n, t, size = args.eval_size, args.frames, model.image_size
    ctx = DistContext.single(str(device))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    batch = cuda_batch(n, t, args.words, 1, device, seed=1)  # texts and masks for all n
    gen = torch.Generator(device=device).manual_seed(2)
    tokens, clss, videos = [], [], []
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast_context(device, precision):
        for lo in range(0, n, args.eval_batch):
            ids, mask = batch["text_ids"][lo:lo + args.eval_batch], batch["text_mask"][lo:lo + args.eval_batch]
            tok, cls = model.encode_text(ids, mask)
            tokens.append(tok.float())
            clss.append(cls.float())
    torch.cuda.synchronize(device)
    text_s = time.perf_counter() - start
    start = time.perf_counter()
    with autocast_context(device, precision):
        for lo in range(0, n, args.eval_batch):
            fm = batch["frame_mask"][lo:lo + args.eval_batch]
            frames = torch.randn(fm.shape[0], t, 3, size, size, device=device, generator=gen)
            videos.append(model.encode_video(frames, fm).float())
    torch.cuda.synchronize(device)
    video_s = time.perf_counter() - start
    encode_peak = torch.cuda.max_memory_allocated(device) / 2**30
    # Encoded features live on the CPU, as the driver gets them from encode_corpus or the feature cache.
    feats = CorpusFeatures(tokens=torch.cat(tokens).cpu(), text_mask=batch["text_mask"].cpu(), cls=torch.cat(clss).cpu(),
                           video=torch.cat(videos).cpu(), frame_mask=batch["frame_mask"].cpu(),
                           caption_to_video=torch.arange(n), video_ids=[str(i) for i in range(n)])
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    results = evaluate_features(model, feats, ctx=ctx, chunk_size=args.eval_chunk, rerank=RerankConfig(top_k=32),
                                seed=42, progress=False)
    torch.cuda.synchronize(device)
    driver_s = time.perf_counter() - start
    report("gpu_eval", precision=precision, captions=n, videos=n, frames=t, text_encode_s=text_s,
           video_encode_s=video_s, videos_per_s=n / video_s, frames_per_s=n * t / video_s,
           sim_rerank_metrics_s=driver_s, total_s=text_s + video_s + driver_s, encode_peak_gib=encode_peak,
           driver_peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
           rerank_t2v_R1=round(float(results["rerank"]["t2v"]["R1"]), 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="training batch (videos and captions)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-size", type=int, default=1000, help="captions = videos of the evaluation")
    parser.add_argument("--eval-batch", type=int, default=100, help="videos (and captions) per encoding batch")
    parser.add_argument("--eval-chunk", type=int, default=128, help="the driver's chunk size (eval.chunk_size)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip parts that would start after this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        return 2
    from diffusionret.models.config import ModelConfig
    from diffusionret.models.factory import build_model

    begin = time.perf_counter()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}, "
          f"TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}", flush=True)
    config = ModelConfig.vit_b32()
    plans = [(stage, amp) for stage in ("discrimination", "generation") for amp in (None, torch.bfloat16)]
    for stage, amp in plans:
        if time.perf_counter() - begin > args.budget_s:
            print(f"skipped gpu_train {stage} {amp}: over the {args.budget_s:.0f} s budget", flush=True)
            continue
        train_bench(args, config, stage, amp, device)
    model = build_model(dataclasses.replace(config, denoisers=True),
                        generator=torch.Generator().manual_seed(0)).to(device).eval()
    for precision in ("bf16", "fp32"):
        if time.perf_counter() - begin > args.budget_s:
            print(f"skipped gpu_eval {precision}: over the {args.budget_s:.0f} s budget", flush=True)
            continue
        eval_bench(args, model, precision, device)
    print(f"total {time.perf_counter() - begin:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
