"""DiffusionRet networks: CLIP backbone (open_clip), temporal module, WTI head, denoisers."""

from diffusionret.models.checkpoint import CheckpointError, load_model, save_model
from diffusionret.models.config import ClipConfig, ModelConfig
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.models.factory import build_model, build_model_from_open_clip

__all__ = ["CheckpointError", "ClipConfig", "DiffusionRet", "ModelConfig", "build_model", "build_model_from_open_clip",
           "load_model", "save_model"]
