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
    parser.add_argument("--diffusion-steps", type=int, default=50,
                        help="diffusion steps the denoisers were trained with, to record (reference: 50)")
    parser.add_argument("--noise-schedule", choices=("cosine", "linear"), default="cosine")
    parser.add_argument("--frames", type=int, default=None, help="frames per video to record (reference: 12)")
    parser.add_argument("--fps", type=float, default=None, help="frame sampling rate to record (reference: 1)")
    parser.add_argument("--sampling", choices=("uniform", "head", "tail", "reference"), default=None,
                        help="frame sampling to record (reference: uniform)")
    parser.add_argument("--max-words", type=int, default=None, help="caption length in tokens to record (reference: 32)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusionret.models.checkpoint import convert_official, load_checkpoint
    from diffusionret.models.config import DiffusionSchedule

    source = load_checkpoint(args.src)
    input_config = source.input.replace(max_frames=args.frames, fps=args.fps, sampling=args.sampling,
                                        max_words=args.max_words)
    path = convert_official(args.src, args.dst, input_config=input_config,
                            diffusion=DiffusionSchedule(steps=args.diffusion_steps, schedule=args.noise_schedule))
    loaded = load_checkpoint(path)
    cfg, inp, diff = loaded.model.config, loaded.input, loaded.diffusion
    emit(f"wrote {path}: {'with' if cfg.denoisers else 'no'} denoisers, {cfg.agg_module} ({cfg.temporal_layers} layers), "
         f"CLIP ViT {cfg.clip.vision_width}w/{cfg.clip.vision_layers}l/{cfg.clip.vision_patch_size}p @ "
         f"{cfg.clip.image_size}px, embed {cfg.embed_dim}, diffusion {diff.steps} {diff.schedule} steps, input "
         f"{inp.max_frames} frames @ {inp.fps:g} fps ({inp.sampling}), {inp.max_words} words")
    return 0
