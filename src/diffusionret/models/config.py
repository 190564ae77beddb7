"""Architecture configs: everything a checkpoint needs to rebuild its network, and nothing else."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

AggModule = Literal["seqTransf", "meanP", "seqLSTM"]
Stage = Literal["discrimination", "generation"]
NoiseSchedule = Literal["cosine", "linear"]


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
        stage: ``discrimination`` (no denoisers) or ``generation`` (with the two denoisers).
        denoiser_temp: temperature of the denoisers' text-conditioned frame pooling (``--temp``).
        diffusion_steps, noise_schedule: the sampler; official checkpoints do not record it.
    """

    clip: ClipConfig = field(default_factory=ClipConfig)
    agg_module: AggModule = "seqTransf"
    temporal_layers: int = 4
    max_position: int = 77
    stage: Stage = "discrimination"
    denoiser_temp: float = 1.0
    diffusion_steps: int = 50
    noise_schedule: NoiseSchedule = "cosine"

    def __post_init__(self) -> None:
        if self.agg_module not in ("seqTransf", "meanP", "seqLSTM"):
            raise ValueError(f"agg_module must be seqTransf, meanP or seqLSTM, got {self.agg_module!r}")
        if self.stage not in ("discrimination", "generation"):
            raise ValueError(f"stage must be discrimination or generation, got {self.stage!r}")
        if self.noise_schedule not in ("cosine", "linear"):
            raise ValueError(f"noise_schedule must be cosine or linear, got {self.noise_schedule!r}")
        if self.agg_module == "seqTransf" and self.temporal_layers <= 0:
            raise ValueError("seqTransf needs temporal_layers > 0")
        if self.diffusion_steps <= 0:
            raise ValueError("diffusion_steps must be positive")
        if self.denoiser_temp <= 0:
            raise ValueError("denoiser_temp must be positive")

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    @property
    def temporal_width(self) -> int:
        # The reference sizes the temporal module by the text width (cross_config.hidden_size) and
        # feeds it embed_dim features; the two agree for every released CLIP (ViT-B/32, B/16).
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
