"""Loading and saving models: the one loader for every format this project reads.

Three formats, all read by :func:`load_checkpoint` (and :func:`load_model`, its model alone):

* **Official DiffusionRet checkpoints** (``best.pth``: a plain ``state_dict`` of the reference
  model, docs/reference.md §7): stage 1 or 2, with or without ``module.`` prefixes, fp16 or fp32 tensors. The
  architecture is rebuilt from the tensors alone; the duplicated ``pe`` buffers are derived and
  ignored. Unlike the reference (``strict=False``), any missing or unexpected key and any shape
  mismatch is an error that lists them.
* **This project's format**: one ``.safetensors`` file (or a folder holding ``model.safetensors``)
  whose metadata holds, as JSON, the architecture (``diffusionret_config``), the input settings
  (``diffusionret_input``, a versioned :class:`~diffusionret.models.config.InputConfig`) and the
  diffusion schedule the denoisers were trained with (``diffusionret_diffusion``). Files of the
  first format version kept the schedule and ``stage`` inside the architecture config and the
  input settings unversioned under ``data``; they load the same.
* **Trainer checkpoints** (a run's ``checkpoints/last.pt`` / ``epoch_<k>.pt``): the model's state
  dict and config, optionally its EMA weights, and the run config that holds the input settings.

Files without input settings (official ones) get the reference's (:data:`REFERENCE_INPUT`); a
file whose recorded settings are malformed is a :class:`CheckpointError`, never a silent default.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from diffusionret.config_utils import atomic_path, to_dict
from diffusionret.models import clip_backbone
from diffusionret.models.config import (REFERENCE_DIFFUSION, DiffusionSchedule, InputConfig, ModelConfig,
                                        legacy_diffusion_schedule, model_config_from_dict)
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.models.safe_load import UnsafeTorchError, torch_load_weights

logger = logging.getLogger(__name__)

FORMAT_NAME = "diffusionret"
#: 2: input settings and diffusion schedule in their own metadata keys; 1: inside the config / ``data``.
FORMAT_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")
TRAINER_FORMAT = "diffusionret-trainer"
TRAINER_FORMAT_VERSION = 1
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


def infer_model_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint", *,
                       denoiser_temp: float = 1.0) -> ModelConfig:
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
    denoisers = any(k.startswith("diffusion_model.") for k in state)
    return ModelConfig(clip=clip_cfg, agg_module=agg, temporal_layers=layers, max_position=int(max_pos),
                       denoisers=denoisers, denoiser_temp=denoiser_temp)


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


# ---------------------------------------------------------------------------------------------- loaded model
@dataclass(frozen=True)
class LoadedModel:
    """A model with what its checkpoint records besides the weights.

    Attributes:
        model: the network, eval mode.
        input: how videos and captions become its input (the reference's defaults when the file
            records none: see ``input_recorded``).
        diffusion: the diffusion schedule its denoisers were trained with (the reference's
            evaluation setting when the file records none).
        source: the file it came from (``"state dict"`` for an in-memory dict).
        input_recorded: whether the file recorded ``input``.
    """

    model: DiffusionRet
    input: InputConfig
    diffusion: DiffusionSchedule
    source: str
    input_recorded: bool = True


# ---------------------------------------------------------------------------------------------- own format
def save_model(model: DiffusionRet, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None, *,
               input_config: InputConfig | None = None, diffusion: DiffusionSchedule | None = None) -> Path:
    """Write ``model`` as safetensors with its configs in the metadata, atomically.

    Args:
        input_config: the input settings the model was trained with (recorded so that index,
            search and evaluation decode videos and captions the same way).
        diffusion: the diffusion schedule the denoisers were trained with.
        metadata: further string entries (values that are not strings are stored as JSON).

    Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "diffusionret_config": json.dumps(to_dict(model.config))}
    if input_config is not None:
        meta["diffusionret_input"] = json.dumps(input_config.to_json_dict())
    if diffusion is not None:
        meta["diffusionret_diffusion"] = json.dumps(to_dict(diffusion))
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


def _json_entry(meta: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from exc


def _load_own(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, InputConfig | None, DiffusionSchedule]:
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
    version = meta.get("format_version", "1")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format version {version!r} is not supported (this version reads "
                              f"{', '.join(_READABLE_VERSIONS)}); upgrade diffusionret")
    raw_config = _json_entry(meta, "diffusionret_config", path)
    try:
        config = model_config_from_dict(raw_config, "diffusionret_config")
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid architecture config in metadata: {exc}") from exc
    try:
        if "diffusionret_diffusion" in meta:
            diffusion = DiffusionSchedule(**_json_entry(meta, "diffusionret_diffusion", path))
        else:
            diffusion = legacy_diffusion_schedule(raw_config) or REFERENCE_DIFFUSION
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid diffusion schedule in metadata: {exc}") from exc
    try:
        if "diffusionret_input" in meta:
            input_config = InputConfig.from_json_dict(_json_entry(meta, "diffusionret_input", path))
        elif "data" in meta:  # format version 1: the training run's data settings, unversioned
            input_config = InputConfig.from_legacy(_json_entry(meta, "data", path), config.clip.image_size)
        else:
            input_config = None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: invalid input settings in metadata: {exc}") from exc
    return tensors, config, input_config, diffusion


# ---------------------------------------------------------------------------------------------- trainer format
def is_trainer_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` is the payload of a trainer checkpoint (``last.pt``)."""
    return isinstance(obj, Mapping) and obj.get("format") == TRAINER_FORMAT


def model_from_trainer_checkpoint(payload: Mapping[str, Any], *, use_ema: bool = False,
                                  source: str = "trainer checkpoint") -> DiffusionRet:
    """Rebuild the model of a trainer checkpoint (eval mode, CPU), optionally with its EMA weights."""
    try:
        config = model_config_from_dict(payload["model_config"], f"{source}: model_config")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    model = DiffusionRet(config)
    model.load_state_dict(payload["model"], strict=True)
    if use_ema:
        if payload.get("ema") is None:
            raise CheckpointError(f"{source}: this checkpoint has no EMA weights")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in payload["ema"]["shadow"].items():
                params[name].copy_(value.to(params[name].dtype))
    return model.eval()


def _trainer_settings(payload: Mapping[str, Any], image_size: int,
                      source: str) -> tuple[InputConfig | None, DiffusionSchedule]:
    """Input settings and diffusion schedule of a trainer checkpoint: its run config's ``data`` and ``diffusion``."""
    run = payload.get("run_config") or {}
    data, diffusion = run.get("data"), run.get("diffusion")
    try:
        input_config = None
        if isinstance(data, Mapping):
            fields = ("max_frames", "fps", "sampling", "size", "max_words")
            input_config = InputConfig.for_image_size(image_size).replace(**{k: data.get(k) for k in fields})
        schedule = REFERENCE_DIFFUSION
        if isinstance(diffusion, Mapping):
            schedule = DiffusionSchedule(steps=diffusion.get("steps", REFERENCE_DIFFUSION.steps),
                                         schedule=diffusion.get("schedule", REFERENCE_DIFFUSION.schedule))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid data or diffusion settings in its run config: {exc}") from exc
    return input_config, schedule


# ---------------------------------------------------------------------------------------------- entry points
def load_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any], *, device: str | torch.device = "cpu",
                    use_ema: bool = False) -> LoadedModel:
    """Load a model and its recorded settings from any checkpoint this project reads.

    Args:
        path_or_state_dict: an official checkpoint (``.pth``/``.bin``/``.pt`` state dict, or the
            dict itself), one of our ``.safetensors`` files or a folder containing
            ``model.safetensors``, or a trainer checkpoint (``last.pt``, ``epoch_<k>.pt``).
        device: where the model goes (float32, eval mode).
        use_ema: the EMA weights of a trainer checkpoint (an error for other formats).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable or not a DiffusionRet checkpoint, or malformed recorded settings
            (the message names the file).
    """
    input_config: InputConfig | None = None
    diffusion = REFERENCE_DIFFUSION
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "state dict", path_or_state_dict
    else:
        path = Path(path_or_state_dict)
        if path.is_dir():
            path = path / "model.safetensors"
        source = os.fspath(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: file is empty")
        raw = None
        if _is_safetensors(path):
            if use_ema:
                raise CheckpointError(f"{path}: only trainer checkpoints carry EMA weights")
            state, config, input_config, diffusion = _load_own(path)
            model = model_from_state_dict(state, config, source)
        else:
            try:
                raw = torch_load_weights(path)  # refuses a torch whose weights_only can be bypassed
            except UnsafeTorchError as exc:
                raise CheckpointError(f"{path}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
                raise CheckpointError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]})") from exc
    if raw is not None:
        if is_trainer_checkpoint(raw):
            if raw.get("format_version") != TRAINER_FORMAT_VERSION:
                raise CheckpointError(f"{source}: trainer checkpoint version {raw.get('format_version')} is not "
                                      f"supported (expected {TRAINER_FORMAT_VERSION})")
            model = model_from_trainer_checkpoint(raw, use_ema=use_ema, source=source)
            input_config, diffusion = _trainer_settings(raw, model.config.clip.image_size, source)
        else:
            if use_ema:
                raise CheckpointError(f"{source}: only trainer checkpoints carry EMA weights")
            state = normalize_official_state_dict(raw, source)
            model = model_from_state_dict(state, infer_model_config(state, source), source)
    config = model.config
    recorded = input_config is not None
    if input_config is None:
        input_config = InputConfig.for_image_size(config.clip.image_size)
    logger.info("loaded %s (%s, %s, CLIP %dx%d/%d)", source, "with denoisers" if config.denoisers else "no denoisers",
                config.agg_module, config.clip.image_size, config.clip.image_size, config.clip.vision_patch_size)
    return LoadedModel(model=model.to(device).eval(), input=input_config, diffusion=diffusion, source=source,
                       input_recorded=recorded)


def load_model(path_or_state_dict: str | os.PathLike | Mapping[str, Any], *, device: str | torch.device = "cpu",
               use_ema: bool = False, **removed: Any) -> DiffusionRet:
    """Load a DiffusionRet model in eval mode, float32: :func:`load_checkpoint`'s model alone.

    Raises:
        TypeError: for the removed sampler arguments ``diffusion_steps`` / ``noise_schedule``.
    """
    _reject_sampler_arguments("load_model", removed)
    return load_checkpoint(path_or_state_dict, device=device, use_ema=use_ema).model


def _reject_sampler_arguments(where: str, removed: Mapping[str, Any]) -> None:
    sampler = sorted(set(removed) & {"diffusion_steps", "noise_schedule"})
    if sampler:
        raise TypeError(f"{where}() no longer takes {', '.join(sampler)}: the sampler is not part of the model. "
                        "Pass RerankConfig(steps=..., schedule=...) to diffusionret.retrieval.Reranker instead "
                        "(load_checkpoint(...).diffusion is the schedule the model was trained with)")
    if removed:
        raise TypeError(f"{where}() got unexpected keyword arguments {sorted(removed)}")


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and path.suffix != ".pth"


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, *,
                     diffusion: DiffusionSchedule = REFERENCE_DIFFUSION,
                     input_config: InputConfig | None = None) -> Path:
    """Convert an official checkpoint into this project's safetensors format.

    Args:
        diffusion: the schedule its denoisers were trained with (official files do not record it;
            the reference's is 50 cosine steps).
        input_config: its input settings (default: the reference's at the model's image size).
    """
    loaded = load_checkpoint(src)
    return save_model(loaded.model, dst, metadata={"converted_from": os.path.basename(os.fspath(src))},
                      input_config=input_config or loaded.input, diffusion=diffusion)
