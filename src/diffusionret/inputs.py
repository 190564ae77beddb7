"""How a video and a caption become model input, and the reference's documented setting.

:class:`InputConfig` is recorded with every model this project saves (see
:mod:`diffusionret.models.checkpoint`); :data:`REFERENCE_INPUT` is the one place that holds the
reference's defaults, used for official checkpoints (which record none) and as the default of
every function that decodes videos or tokenises captions. This module imports nothing heavy, so the
data pipeline can use it without the networks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

Sampling = Literal["uniform", "head", "tail", "reference"]

__all__ = ["INPUT_FIELDS", "REFERENCE_INPUT", "InputConfig", "Sampling"]

#: The fields of :class:`InputConfig`, which a run's data section holds under the same names.
INPUT_FIELDS = ("max_frames", "fps", "sampling", "size", "max_words")


@dataclass(frozen=True)
class InputConfig:
    """How a video and a caption become model input: the data settings a model was trained with.

    The defaults are the reference's documented MSR-VTT setting (:data:`REFERENCE_INPUT`), used for
    official checkpoints, which record none.

    Attributes:
        max_frames: ``T``, frames per video (the paper: 12; ActivityNet/DiDeMo: 64).
        fps: frames per second of video time sampled before reducing to ``T``.
        sampling: ``uniform``, ``head``, ``tail`` or ``reference`` (:mod:`diffusionret.data.sampling`).
        size: frame side ``S`` in pixels (the CLIP tower's image size).
        max_words: ``L``, caption length in tokens including SOT and EOT (the paper: 32).
    """

    max_frames: int = 12
    fps: float = 1.0
    sampling: Sampling = "uniform"
    size: int = 224
    max_words: int = 32

    #: Version of the serialised form (:meth:`to_json_dict`); bump when a field changes meaning.
    VERSION = 1

    def __post_init__(self) -> None:
        for name in ("max_frames", "size", "max_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_frames < 1 or self.size < 1:
            raise ValueError(f"max_frames and size must be >= 1, got {self.max_frames}, {self.size}")
        if self.max_words < 2:
            raise ValueError(f"max_words must be >= 2 (SOT and EOT), got {self.max_words}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        object.__setattr__(self, "fps", float(self.fps))
        if self.sampling not in ("uniform", "head", "tail", "reference"):
            raise ValueError(f"sampling must be uniform, head, tail or reference, got {self.sampling!r}")

    def replace(self, **changes: Any) -> "InputConfig":
        """A copy with ``changes``; ``None`` values are ignored (unset command-line flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json_dict(self) -> dict[str, Any]:
        """The versioned form stored with a checkpoint."""
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json_dict(cls, data: Any) -> "InputConfig":
        """Inverse of :meth:`to_json_dict`.

        Raises:
            ValueError: not a mapping, an unknown version, unknown keys or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", None)
        if version != cls.VERSION:
            raise ValueError(f"input config version {version!r} is not supported (expected {cls.VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown keys {unknown} (valid: {sorted(names)})")
        return cls(**data)

    @classmethod
    def from_legacy(cls, data: Any, default_size: int) -> "InputConfig":
        """The unversioned ``data`` metadata of files written by earlier versions.

        Those wrote ``{"max_frames", "fps", "sampling", "max_words", "size"}`` (``size`` not always).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown keys {unknown} (valid: {sorted(names)})")
        return cls(**{"size": default_size, **data})

    @classmethod
    def for_image_size(cls, image_size: int) -> "InputConfig":
        """The reference's defaults (:data:`REFERENCE_INPUT`) at a model's image size."""
        return dataclasses.replace(REFERENCE_INPUT, size=int(image_size))


#: The reference's documented input setting: 12 frames at 1 fps, uniform, 224 px, 32 tokens.
REFERENCE_INPUT = InputConfig()
