"""Training-step throughput of the tiny config, both stages, through the trainer's own step function.

    python benchmarks/bench_train.py                         # batch 32, T=12 frames, L=32 tokens
    python benchmarks/bench_train.py --batch 8 --steps 10

Each step is :func:`diffusionret.training.loop._train_step`, the function ``diffusionret train``
calls per batch: the stage objective's forward (stage 1: text + video towers, WTI, symmetric
InfoNCE; stage 2: frozen features, WTI hard-negative mining over the batch, both denoisers'
generation loss), backward, gradient clipping, AdamW, LR schedule, logit-scale clamp and EMA.
Its run state is assembled here from the trainer's own pieces (``ModelConfig.tiny()``,
``prepare_stage{1,2}_model``, the objectives, ``build_optimizer`` / ``build_scheduler``,
``ModelEMA``) instead of from a dataset, so data loading and video decoding are not timed
(``bench_decode.py`` times those). Batches are random tensors of the loader's shapes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusionret.config import DiffusionConfig, OptimConfig
from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.tokenizer import EOT_ID, SOT_ID
from diffusionret.training.checkpoint import TrainProgress
from diffusionret.distributed import DistContext
from diffusionret.training.ema import ModelEMA
from diffusionret.training.loop import _Run, _train_step
from diffusionret.training.optim import build_optimizer, build_scheduler
from diffusionret.training.stage1_contrastive import ContrastiveObjective, prepare_stage1_model
from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.training.stage2_diffusion import GenerationObjective, prepare_stage2_model

from _common import parse_bench_args, machine, report


def random_batch(batch: int, frames: int, words: int, image: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch with the collate function's fields and shapes (distinct videos; some texts and videos short)."""
    lengths = torch.randint(6, words - 1, (batch,), generator=g)
    ids = torch.randint(1, 49000, (batch, words), generator=g)
    ids[:, 0] = SOT_ID
    pos = torch.arange(words)[None, :]
    ids = torch.where(pos == lengths[:, None], torch.full_like(ids, EOT_ID), ids)
    ids = torch.where(pos > lengths[:, None], torch.zeros_like(ids), ids)
    frame_mask = torch.ones(batch, frames, dtype=torch.long)
    frame_mask[batch // 2:, frames * 2 // 3:] = 0
    return {
        "text_ids": ids,
        "text_mask": (pos <= lengths[:, None]).long(),
        "frames": torch.randn(batch, frames, 3, image, image, generator=g) * frame_mask[..., None, None, None],
        "frame_mask": frame_mask,
        "video_key": torch.arange(batch),
    }


def make_run(stage: str, total_steps: int, *, config: ModelConfig | None = None, device: str = "cpu",
             amp_dtype: torch.dtype | None = None, num_negatives: int | None = None, seed: int = 0,
             factored: bool = False) -> _Run:
    """The trainer's run state for ``stage`` (default: the tiny model on CPU, fp32), without a dataset.

    ``amp_dtype`` is the autocast dtype ``_train_step`` uses (``None``: fp32), as
    :func:`diffusionret.training.loop.resolve_amp_dtype` would set it from ``train.precision``.
    ``factored``: the generation objective's denoiser form (on when ``train`` reads the feature cache).
    """
    ctx = DistContext.single(device)
    optim = OptimConfig()
    gen = torch.Generator().manual_seed(seed)
    model = build_model(config or ModelConfig.tiny(), generator=gen)
    if stage == "discrimination":
        model = prepare_stage1_model(model).to(ctx.device)
        objective: torch.nn.Module = ContrastiveObjective(model, ctx)
        generators: dict[str, torch.Generator] = {}
    else:
        # Stage 2 starts from a stage-1 model (random here: throughput does not depend on the weights).
        model = prepare_stage2_model(model, generator=gen).to(ctx.device)
        d = DiffusionConfig()
        stage2 = torch.Generator(device=ctx.device).manual_seed(seed + 1)
        objective = GenerationObjective(model, ctx, num_negatives=num_negatives or d.num_negatives,
                                        negative_label=d.negative_label, loss_temp=d.loss_temp, generator=stage2,
                                        diffusion=GaussianDiffusion(d.steps, d.schedule).to(ctx.device),
                                        factored=factored)
        generators = {"stage2": stage2}
    objective.train()
    optimizer = build_optimizer(model, lr=optim.lr, clip_lr_scale=optim.clip_lr_scale, weight_decay=optim.weight_decay,
                                betas=optim.betas, eps=optim.eps)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_proportion=optim.warmup_proportion)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    cfg = argparse.Namespace(optim=optim, stage=stage)
    return _Run(cfg=cfg, ctx=ctx, run_dir=Path(tempfile.gettempdir()), model=model, objective=objective,
                optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ModelEMA(model, 0.99),
                generators=generators, sampler=None, loader=None, train_set=None, total_steps=total_steps,
                amp_dtype=amp_dtype, progress=TrainProgress(), metrics=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parse_bench_args(parser)
    image = ModelConfig.tiny().clip.image_size
    print(f"machine: {machine()}")
    print(f"tiny config: {image}px frames, batch {args.batch}, T={args.frames}, L={args.words}")
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(args.batch, args.frames, args.words, image, g) for _ in range(4)]
    for stage in ("discrimination", "generation"):
        # The batch offers batch - 1 negatives per query (the reference asks for 127 of a 128 batch).
        run = make_run(stage, total_steps=args.warmup + args.steps, num_negatives=min(127, args.batch - 1))
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        for i in range(args.warmup):
            _train_step(run, batches[i % len(batches)])
        start = time.perf_counter()
        for i in range(args.steps):
            logs = _train_step(run, batches[i % len(batches)])
        seconds = time.perf_counter() - start
        report(f"train_{stage}", batch=args.batch, steps=args.steps, steps_per_s=args.steps / seconds,
               samples_per_s=args.steps * args.batch / seconds, ms_per_step=seconds / args.steps * 1e3,
               trainable_params=trainable, loss=round(logs["loss"], 4))


if __name__ == "__main__":
    main()
