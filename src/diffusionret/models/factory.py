"""The one place that maps configs (and CLIP weights) to modules."""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch

from diffusionret.models import clip_backbone
from diffusionret.models.config import ModelConfig
from diffusionret.models.diffusionret import DiffusionRet


def build_model(config: ModelConfig | None = None, *, clip_state_dict: Mapping[str, torch.Tensor] | None = None,
                clip_path: str | os.PathLike | None = None, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", half: bool = False) -> DiffusionRet:
    """A fresh DiffusionRet, optionally starting from OpenAI-format CLIP weights.

    With CLIP weights the CLIP architecture is inferred from them (``config.clip`` is replaced),
    the weights are copied strictly, and the temporal module gets the reference's initialisation
    trick (text positional table and first text layers). Without, CLIP is randomly initialised
    (open_clip's init) — what the tests and the offline demo use.

    Args:
        config: head/stage settings (default: the paper's ViT-B/32 model).
        clip_state_dict / clip_path: OpenAI-format CLIP weights (TorchScript archive or state dict).
        generator: RNG for the head's random init.
        half: cast parameters to float16 (default float32).
    """
    config = config or ModelConfig()
    source = "clip state dict"
    if clip_path is not None:
        if clip_state_dict is not None:
            raise ValueError("give clip_state_dict or clip_path, not both")
        clip_state_dict = clip_backbone.read_openai_clip_file(clip_path)
        source = os.fspath(clip_path)
    if clip_state_dict is not None:
        clip_state_dict = {k: v for k, v in clip_state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        inferred = clip_backbone.infer_clip_config(clip_state_dict, source)
        config = dataclasses.replace(config, clip=dataclasses.replace(inferred, open_clip_name=config.clip.open_clip_name))
    model = DiffusionRet(config, generator=generator)
    if clip_state_dict is not None:
        clip_backbone.load_clip_weights(model.clip, clip_state_dict, source)
        model.init_temporal_from_clip()
    if half:
        model.half()
    return model.to(device).eval()


def build_model_from_open_clip(name: str, pretrained: str, config: ModelConfig | None = None, **kwargs) -> DiffusionRet:
    """A fresh DiffusionRet on an open_clip backbone: ``name`` (e.g. ``ViT-B-32``) and a pretrained
    tag found in the local open_clip cache, or a local weight file."""
    state = clip_backbone.load_open_clip_weights(name, pretrained)
    config = config or ModelConfig()
    config = dataclasses.replace(config, clip=dataclasses.replace(config.clip, open_clip_name=name))
    return build_model(config, clip_state_dict=state, **kwargs)
