"""Frame transforms: the reference's CLIP preprocessing and optional, video-consistent augmentation.

Input of every transform: uint8 ``(T, H, W, 3)`` RGB frames as returned by
:func:`diffusionret.data.read_frames` (already short-side resized when ``size`` was given). Output:
float32 ``(T, 3, S, S)`` normalised with CLIP's mean/std.

* :class:`ClipTransform` (evaluation, and training by default, as in the reference, which never
  augments; docs/reference.md §5.3 and §8.3): bicubic short-side resize to ``S`` (torchvision/PIL rule), centre
  crop ``S x S`` (torchvision rule), ``/255``, normalise.
* :class:`TrainTransform`: random resized crop + horizontal flip and/or a RandAugment-style policy,
  with *one* set of random parameters per video so all its frames change the same way (a flip on
  some frames only would turn "left" into "right" mid-clip). Randomness comes from an explicit
  ``torch.Generator``, so a (seed, epoch, index) triple reproduces an item exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from diffusionret.data.decode import resize_short_side

__all__ = [
    "ClipTransform",
    "RandAugmentPolicy",
    "TrainTransform",
    "VideoTransform",
    "build_transform",
    "center_crop",
    "clip_mean_std",
    "normalize",
]


class VideoTransform(Protocol):
    def __call__(self, frames: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, S, S)``."""
        ...


@functools.lru_cache(maxsize=1)
def clip_mean_std() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLIP's normalisation constants, from ``open_clip.constants`` (imported on first use: it is heavy)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


def _to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> uint8 ``(T, 3, H, W)``."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.permute(0, 3, 1, 2).contiguous()


def center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size x size`` crop of ``(T, C, H, W)``, offsets ``round((H - size) / 2)`` like torchvision;
    sides shorter than ``size`` are zero-padded (torchvision's behaviour too)."""
    height, width = frames.shape[-2:]
    if height < size or width < size:
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        frames = F.pad(frames, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = frames.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return frames[..., top : top + size, left : left + size]


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, 3, H, W)`` -> float32, ``(x / 255 - mean) / std`` (ToTensor + Normalize, same ops)."""
    mean, std = clip_mean_std()
    x = frames.to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _short_side(frames: np.ndarray, size: int) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(getattr(frames, "shape", ()))
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {shape} {getattr(frames, 'dtype', type(frames))}")
    if min(frames.shape[1:3]) == size:
        return frames
    return np.stack([resize_short_side(frame, size) for frame in frames])


@dataclass(frozen=True)
class ClipTransform:
    """The reference's preprocessing: short-side bicubic resize, centre crop, CLIP normalisation."""

    size: int = 224

    def __call__(self, frames: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, size, size)``; ``generator`` is unused."""
        return normalize(center_crop(_to_tensor(_short_side(frames, self.size)), self.size))


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A RandAugment-style policy in the spirit of timm's ``rand-m7-n4-mstd0.5-inc1`` (docs/reference.md §5.3).

    ``num_ops`` operations are drawn (with replacement) from the "increasing" list, each applied with
    probability ``prob`` at magnitude ``magnitude`` (out of 10) plus Gaussian jitter ``magnitude_std``,
    geometric ops fill with grey 128. Drawn once per video and applied to all its frames.
    """

    num_ops: int = 4
    magnitude: float = 7.0
    magnitude_std: float = 0.5
    prob: float = 0.5

    OPS: ClassVar[tuple[str, ...]] = (
        "auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
        "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
    )  # fmt: skip

    def sample(self, generator: torch.Generator | None) -> list[tuple[str, float, float]]:
        """``[(op, magnitude in [0, 1], sign)]`` for the ops that fire on this video."""
        chosen = []
        for _ in range(self.num_ops):
            op = self.OPS[int(torch.randint(len(self.OPS), (), generator=generator))]
            fires = _uniform(generator) < self.prob
            jitter = float(torch.randn((), generator=generator)) * self.magnitude_std
            sign = 1.0 if _uniform(generator) < 0.5 else -1.0
            if fires:
                m = min(10.0, max(0.0, self.magnitude + jitter)) / 10.0
                chosen.append((op, m, sign))
        return chosen

    @staticmethod
    def apply(frames: torch.Tensor, ops: list[tuple[str, float, float]]) -> torch.Tensor:
        """Apply sampled ops to uint8 ``(T, 3, H, W)`` frames (the same ops to every frame)."""
        import torchvision.transforms.v2.functional as TF

        fill = [128.0, 128.0, 128.0]
        size = frames.shape[-1]
        for op, m, sign in ops:
            if op == "auto_contrast":
                frames = TF.autocontrast(frames)
            elif op == "equalize":
                frames = TF.equalize(frames)
            elif op == "invert":
                frames = TF.invert(frames)
            elif op == "rotate":
                frames = TF.rotate(frames, sign * 30.0 * m, fill=fill)
            elif op == "posterize":
                frames = TF.posterize(frames, bits=max(1, 4 - int(4 * m)))  # keep 4..1 bits; never all black
            elif op == "solarize":
                frames = TF.solarize(frames, threshold=256 - 256 * m)
            elif op == "solarize_add":
                added = (frames.to(torch.int16) + int(110 * m)).clamp_(0, 255).to(torch.uint8)
                frames = torch.where(frames < 128, added, frames)
            elif op in ("color", "contrast", "brightness", "sharpness"):
                factor = max(0.0, 1.0 + sign * 0.9 * m)
                adjust: Callable = {
                    "color": TF.adjust_saturation,
                    "contrast": TF.adjust_contrast,
                    "brightness": TF.adjust_brightness,
                    "sharpness": TF.adjust_sharpness,
                }[op]
                frames = adjust(frames, factor)
            elif op in ("shear_x", "shear_y"):
                angle = math.degrees(math.atan(sign * 0.3 * m))
                shear = [angle, 0.0] if op == "shear_x" else [0.0, angle]
                frames = TF.affine(frames, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=fill)
            elif op in ("translate_x", "translate_y"):
                pixels = int(round(sign * 0.45 * m * size))
                shift = [pixels, 0] if op == "translate_x" else [0, pixels]
                frames = TF.affine(frames, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=fill)
            else:  # pragma: no cover - OPS and this table are kept in sync
                raise ValueError(f"unknown op {op}")
        return frames


@dataclass(frozen=True)
class TrainTransform:
    """Video-consistent training augmentation followed by CLIP normalisation.

    Attributes:
        size: output side ``S``.
        crop_flip: random resized crop (area ``crop_scale`` of the frame, aspect ``crop_ratio``) resized
            to ``S x S``, then horizontal flip with probability ``flip_prob``; otherwise centre crop.
        randaugment: RandAugment-style policy, or ``None``.
    """

    size: int = 224
    crop_flip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob: float = 0.5
    randaugment: RandAugmentPolicy | None = None

    def _crop_box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a random crop (torchvision RandomResizedCrop's sampling scheme)."""
        area = height * width
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * _uniform(generator, *self.crop_scale)
            ratio = math.exp(_uniform(generator, log_lo, log_hi))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                return top, left, h, w
        side = min(height, width)  # fall back to the centre square
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, frames: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, size, size)``; one random draw for all frames."""
        video = _to_tensor(_short_side(frames, self.size))
        if self.crop_flip:
            top, left, h, w = self._crop_box(video.shape[-2], video.shape[-1], generator)
            patch = video[..., top : top + h, left : left + w].to(torch.float32)
            patch = F.interpolate(patch, size=(self.size, self.size), mode="bicubic", antialias=True,
                                  align_corners=False)
            video = patch.round_().clamp_(0, 255).to(torch.uint8)
            if _uniform(generator) < self.flip_prob:
                video = video.flip(-1)
        else:
            video = center_crop(video, self.size).contiguous()
        if self.randaugment is not None:
            video = self.randaugment.apply(video, self.randaugment.sample(generator))
        return normalize(video)


AUGMENTATIONS: tuple[str, ...] = ("none", "crop_flip", "randaugment", "crop_flip_randaugment")


def build_transform(size: int = 224, augment: str = "none") -> VideoTransform:
    """The transform for ``augment`` (one of :data:`AUGMENTATIONS`; ``"none"`` is the reference's)."""
    if augment == "none":
        return ClipTransform(size)
    if augment == "crop_flip":
        return TrainTransform(size, crop_flip=True)
    if augment == "randaugment":
        return TrainTransform(size, crop_flip=False, randaugment=RandAugmentPolicy())
    if augment == "crop_flip_randaugment":
        return TrainTransform(size, crop_flip=True, randaugment=RandAugmentPolicy())
    raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTATIONS}")
