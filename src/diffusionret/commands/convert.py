"""``diffusionret convert``: an official DiffusionRet checkpoint -> this project's safetensors format."""

from __future__ import annotations

import argparse
import logging

from diffusionret.commands._common import emit

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert an official DiffusionRet checkpoint to safetensors",
                                   description="Convert an official DiffusionRet checkpoint (best.pth) into this project's "
                                               "format: safetensors weights + the architecture config as JSON metadata.")
    parser.add_argument("src", help="official checkpoint (state dict, .pth)")
    parser.add_argument("dst", help="output .safetensors path")
    parser.add_argument("--diffusion-steps", type=int, default=50, help="sampler steps to record (reference eval: 50)")
    parser.add_argument("--noise-schedule", choices=("cosine", "linear"), default="cosine")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusionret.models.checkpoint import convert_official, load_model

    path = convert_official(args.src, args.dst, diffusion_steps=args.diffusion_steps, noise_schedule=args.noise_schedule)
    model = load_model(path)
    cfg = model.config
    emit(f"wrote {path}: {cfg.stage} stage, {cfg.agg_module} ({cfg.temporal_layers} layers), CLIP ViT "
          f"{cfg.clip.vision_width}w/{cfg.clip.vision_layers}l/{cfg.clip.vision_patch_size}p @ {cfg.clip.image_size}px, "
          f"embed {cfg.embed_dim}, sampler {cfg.diffusion_steps} {cfg.noise_schedule} steps")
    return 0
