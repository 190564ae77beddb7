"""DiffusionRet networks: CLIP backbone (open_clip), temporal module, WTI head, denoisers.

Networks and checkpoints only: the diffusion sampler and re-ranking live in
:mod:`diffusionret.retrieval`, which depends on this package (never the other way).
"""

from diffusionret.models.checkpoint import CheckpointError, LoadedModel, load_checkpoint, load_model, save_model
from diffusionret.models.config import ClipConfig, DiffusionSchedule, InputConfig, ModelConfig
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.models.factory import build_model, build_model_from_open_clip
from diffusionret.models.fingerprint import model_fingerprint

__all__ = ["CheckpointError", "ClipConfig", "DiffusionRet", "DiffusionSchedule", "InputConfig", "LoadedModel",
           "ModelConfig", "build_model", "build_model_from_open_clip", "load_checkpoint", "load_model",
           "model_fingerprint", "save_model"]
