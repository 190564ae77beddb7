"""What a checkpoint records besides its tensors.

* :class:`ModelConfig`: the architecture, everything needed to rebuild the network and nothing else.
* :class:`~diffusionret.inputs.InputConfig` (defined in :mod:`diffusionret.inputs`, so that data
  code can use it without importing the networks): how a video and a caption become model input;
  it travels with the weights, as a CLIP model's preprocessing does.
* :class:`DiffusionSchedule`: the diffusion process the denoisers were trained with (steps,
  noise schedule). It is not part of the network; re-ranking starts from it (see
  :class:`diffusionret.retrieval.RerankConfig`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from diffusionret.inputs import REFERENCE_INPUT, InputConfig

logger = logging.getLogger(__name__)

__all__ = ["REFERENCE_DIFFUSION", "REFERENCE_INPUT", "ClipConfig", "DiffusionSchedule", "InputConfig", "ModelConfig",
           "legacy_diffusion_schedule", "model_config_from_dict"]

AggModule = Literal["seqTransf", "meanP", "seqLSTM"]
NoiseSchedule = Literal["cosine", "linear"]

#: Keys of the ModelConfig written by earlier versions that are no longer architecture fields:
#: ``stage`` became ``denoisers``; the sampler moved to :class:`DiffusionSchedule`.
LEGACY_MODEL_KEYS = ("stage", "diffusion_steps", "noise_schedule")


@dataclass(frozen=True)
class ClipConfig:
    """An OpenAI-style CLIP (ViT image tower + causal text transformer), built through open_clip.

    Head counts follow OpenAI's convention (width // 64, at least 1), as inferred from a state dict.
    ``open_clip_name`` is informational (which open_clip model the weights came from, if any).
    """

    embed_dim: int = 512
    image_size: int = 224
    vision_width: int = 768
    vision_layers: int = 12
    vision_patch_size: int = 32
    text_width: int = 512
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    open_clip_name: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("embed_dim", "image_size", "vision_width", "vision_layers", "vision_patch_size",
                     "text_width", "text_layers", "context_length", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClipConfig.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.vision_patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.vision_patch_size}")

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // 64)

    @property
    def text_heads(self) -> int:
        return max(1, self.text_width // 64)


@dataclass(frozen=True)
class ModelConfig:
    """The DiffusionRet architecture (docs/reference.md §1).

    Attributes:
        clip: the CLIP backbone.
        agg_module: temporal module over per-frame features: ``seqTransf`` (reference default),
            ``meanP`` (identity: the WTI head pools frames itself) or ``seqLSTM``.
        temporal_layers: depth of the seqTransf temporal transformer (reference: 4).
        max_position: rows of the frame position table (reference: CLIP context length, 77).
        denoisers: the model has the two denoisers (a generation-stage, stage-2, model).
        denoiser_temp: temperature of the denoisers' text-conditioned frame pooling (``--temp``).
    """

    clip: ClipConfig = field(default_factory=ClipConfig)
    agg_module: AggModule = "seqTransf"
    temporal_layers: int = 4
    max_position: int = 77
    denoisers: bool = False
    denoiser_temp: float = 1.0

    def __post_init__(self) -> None:
        if self.agg_module not in ("seqTransf", "meanP", "seqLSTM"):
            raise ValueError(f"agg_module must be seqTransf, meanP or seqLSTM, got {self.agg_module!r}")
        if not isinstance(self.denoisers, bool):
            raise ValueError(f"denoisers must be true or false, got {self.denoisers!r}")
        if self.agg_module == "seqTransf" and self.temporal_layers <= 0:
            raise ValueError("seqTransf needs temporal_layers > 0")
        if self.denoiser_temp <= 0:
            raise ValueError("denoiser_temp must be positive")

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def vit_b32(cls, **changes) -> "ModelConfig":
        """The paper's model: OpenAI CLIP ViT-B/32, 4-layer seqTransf, WTI head."""
        return cls(**changes)

    @classmethod
    def tiny(cls, **changes) -> "ModelConfig":
        """A CPU-seconds model for tests and the demo: 32 px frames, 2-layer width-64 towers."""
        clip = ClipConfig(embed_dim=64, image_size=32, vision_width=64, vision_layers=2, vision_patch_size=8,
                          text_width=64, text_layers=2, context_length=77, vocab_size=49408)
        base = dict(clip=clip, agg_module="seqTransf", temporal_layers=2)
        base.update(changes)
        return cls(**base)


def model_config_from_dict(data: Mapping[str, Any], where: str = "ModelConfig") -> ModelConfig:
    """A :class:`ModelConfig` from its dict, also in the shape earlier versions wrote.

    Earlier files carry ``stage`` (``generation`` means denoisers) and the sampler keys
    ``diffusion_steps``/``noise_schedule``; the first is mapped, the others are dropped (read them
    with :func:`legacy_diffusion_schedule`).

    Raises:
        ConfigError: unknown keys or invalid values (``where`` names the source).
    """
    from diffusionret.config_utils import ConfigError, from_dict

    data = dict(data)
    stage = data.pop("stage", None)
    if stage is not None:
        if stage not in ("discrimination", "generation"):
            raise ConfigError(f"{where}: stage must be discrimination or generation, got {stage!r}")
        if "denoisers" in data and data["denoisers"] != (stage == "generation"):
            raise ConfigError(f"{where}: stage {stage!r} contradicts denoisers={data['denoisers']!r}")
        data["denoisers"] = stage == "generation"
    dropped = [key for key in ("diffusion_steps", "noise_schedule") if data.pop(key, None) is not None]
    if stage is not None or dropped:
        logger.debug("%s: read a config written by an earlier version (stage, sampler keys %s)", where, dropped)
    return from_dict(ModelConfig, data, where)


@dataclass(frozen=True)
class DiffusionSchedule:
    """The diffusion process a model's denoisers were trained with (docs/reference.md §1.6).

    The denoisers embed the timestep, so re-ranking samples with the same number of steps unless
    told otherwise. Official checkpoints record none: :data:`REFERENCE_DIFFUSION` applies.
    """

    steps: int = 50
    schedule: NoiseSchedule = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be cosine or linear, got {self.schedule!r}")


#: The reference's evaluation setting (its README: 50 steps, cosine schedule).
REFERENCE_DIFFUSION = DiffusionSchedule()


def legacy_diffusion_schedule(data: Mapping[str, Any]) -> DiffusionSchedule | None:
    """The sampler an earlier version recorded in its ModelConfig dict, if it did."""
    if "diffusion_steps" not in data and "noise_schedule" not in data:
        return None
    return DiffusionSchedule(steps=int(data.get("diffusion_steps", REFERENCE_DIFFUSION.steps)),
                             schedule=data.get("noise_schedule", REFERENCE_DIFFUSION.schedule))
