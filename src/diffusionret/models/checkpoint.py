"""Loading and saving models.

Two formats:

* **Official DiffusionRet checkpoints** (``best.pth``: a plain ``state_dict`` of the reference
  model, docs/reference.md §7): stage 1 or 2, with or without ``module.`` prefixes, fp16 or fp32 tensors. The
  architecture is rebuilt from the tensors alone; the duplicated ``pe`` buffers are derived and
  ignored. Unlike the reference (``strict=False``), any missing or unexpected key and any shape
  mismatch is an error that lists them.
* **This project's format**: one ``.safetensors`` file whose metadata holds the architecture
  config as JSON (``diffusionret_config``), so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from diffusionret.config_utils import atomic_path, from_dict, to_dict
from diffusionret.models import clip_backbone
from diffusionret.models.config import ModelConfig
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.models.safe_load import UnsafeTorchError, torch_load_weights

logger = logging.getLogger(__name__)

FORMAT_NAME = "diffusionret"
FORMAT_VERSION = "1"
_PE_SUFFIX = "sequence_pos_encoder.pe"
_CLIP_EXTRA = ("clip.input_resolution", "clip.context_length", "clip.vocab_size")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not describe a DiffusionRet model."""


# ---------------------------------------------------------------------------------------------- official
def normalize_official_state_dict(state: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Strip ``module.`` prefixes, unwrap ``{"state_dict": ...}``, drop derived ``pe`` buffers."""
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], Mapping) and not isinstance(state.get("clip.logit_scale"), torch.Tensor):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: not a state dict (got {type(state).__name__})")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor ({type(value).__name__})")
        while key.startswith("module."):
            key = key[len("module."):]
        if key.endswith(_PE_SUFFIX) or key in _CLIP_EXTRA:
            continue
        out[key] = value
    if not any(k.startswith("clip.") for k in out):
        sample = ", ".join(list(out)[:5])
        raise CheckpointError(f"{source}: not a DiffusionRet checkpoint (no 'clip.*' keys; first keys: {sample})")
    return out


def infer_model_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint", *, diffusion_steps: int = 50,
                       noise_schedule: str = "cosine", denoiser_temp: float = 1.0) -> ModelConfig:
    """Rebuild the architecture of an official checkpoint from its tensors alone."""
    clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    try:
        clip_cfg = clip_backbone.infer_clip_config(clip_state, source)
    except clip_backbone.ClipFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    if any(k.startswith("transformerClip.") for k in state):
        agg = "seqTransf"
        layers = len({k.split(".")[2] for k in state if k.startswith("transformerClip.resblocks.")})
    elif any(k.startswith("lstm_visual.") for k in state):
        agg, layers = "seqLSTM", 4
    else:
        agg, layers = "meanP", 4
    max_pos = state["frame_position_embeddings.weight"].shape[0] if "frame_position_embeddings.weight" in state else 77
    stage = "generation" if any(k.startswith("diffusion_model.") for k in state) else "discrimination"
    return ModelConfig(clip=clip_cfg, agg_module=agg, temporal_layers=layers, max_position=int(max_pos), stage=stage,
                       denoiser_temp=denoiser_temp, diffusion_steps=diffusion_steps, noise_schedule=noise_schedule)


def model_from_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> DiffusionRet:
    """Build ``config``'s model and copy ``state`` into it strictly (dtype converted on copy)."""
    model = DiffusionRet(config)
    own = model.state_dict()
    try:
        clip_backbone.check_state_dict(model, state, source)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model


# ---------------------------------------------------------------------------------------------- own format
def save_model(model: DiffusionRet, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as safetensors with its architecture config in the metadata, atomically.

    Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "diffusionret_config": json.dumps(to_dict(model.config))}
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of one of our safetensors checkpoints."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _load_own(path: Path, device: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = read_metadata(path)
        tensors = load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT_NAME or "diffusionret_config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without a diffusionret config in its metadata "
                              f"(format={meta.get('format')!r}); convert official checkpoints with `diffusionret convert`")
    try:
        config = from_dict(ModelConfig, json.loads(meta["diffusionret_config"]))
    except (ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid architecture config in metadata: {exc}") from exc
    return tensors, config


# ---------------------------------------------------------------------------------------------- entry point
def load_model(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
               diffusion_steps: int | None = None, noise_schedule: str | None = None) -> DiffusionRet:
    """Load a DiffusionRet model in eval mode, float32.

    Args:
        path_or_state_dict: an official checkpoint (``.pth``/``.bin``/``.pt`` state dict, or the
            dict itself), one of our ``.safetensors`` checkpoints, or a folder containing
            ``model.safetensors``.
        diffusion_steps, noise_schedule: the sampler. Official checkpoints do not record it and
            default to the reference's evaluation setting (50, cosine); ours record it, and a value
            given here overrides the recorded one.
    """
    if isinstance(path_or_state_dict, Mapping):
        source = "state dict"
        state = normalize_official_state_dict(path_or_state_dict, source)
        config = infer_model_config(state, source, diffusion_steps=diffusion_steps or 50, noise_schedule=noise_schedule or "cosine")
    else:
        path = Path(path_or_state_dict)
        if path.is_dir():
            path = path / "model.safetensors"
        source = os.fspath(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: file is empty")
        if _is_safetensors(path):
            state, config = _load_own(path, "cpu")
            changes = {}
            if diffusion_steps is not None:
                changes["diffusion_steps"] = diffusion_steps
            if noise_schedule is not None:
                changes["noise_schedule"] = noise_schedule
            config = dataclasses.replace(config, **changes) if changes else config
        else:
            try:
                raw = torch_load_weights(path)  # refuses a torch whose weights_only can be bypassed
            except UnsafeTorchError as exc:
                raise CheckpointError(f"{path}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
                raise CheckpointError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]})") from exc
            state = normalize_official_state_dict(raw, source)
            config = infer_model_config(state, source, diffusion_steps=diffusion_steps or 50, noise_schedule=noise_schedule or "cosine")
    model = model_from_state_dict(state, config, source)
    logger.info("loaded %s (%s stage, %s, CLIP %dx%d/%d)", source, config.stage, config.agg_module, config.clip.image_size,
                config.clip.image_size, config.clip.vision_patch_size)
    return model.to(device).eval()


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and path.suffix != ".pth"


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, *, diffusion_steps: int = 50,
                     noise_schedule: str = "cosine") -> Path:
    """Convert an official checkpoint into this project's safetensors format."""
    model = load_model(src, diffusion_steps=diffusion_steps, noise_schedule=noise_schedule)
    return save_model(model, dst, metadata={"converted_from": os.path.basename(os.fspath(src))})
