"""Data: PyAV decoding, frame sampling, transforms, annotation readers and the dataset.

Names are imported on first use (PEP 562), so ``import diffusionret.data`` loads neither torch nor
PyAV; ``read_frames`` needs PyAV only, the dataset and transforms need torch.

- :func:`read_frames`, :func:`probe_video`, :class:`VideoDecodeError` (decoding, :mod:`.decode`)
- :func:`sample_times`, :func:`reference_frame_indices` (:mod:`.sampling`)
- :class:`ClipTransform`, :class:`TrainTransform`, :func:`build_transform` (:mod:`.transforms`)
- :data:`READERS`, :class:`VideoTextPair`, :class:`AnnotationError` (:mod:`.annotations`, :mod:`.records`)
- :class:`VideoTextDataset`, :func:`collate`, :class:`Batch`, :func:`worker_init_fn`,
  :func:`require_complete` (:mod:`.dataset`, :mod:`.collate`)
- :class:`DataConfig`, :func:`build_dataset`, :func:`load_data_config` (:mod:`.config`)
- :func:`check_data`, :func:`preprocess_videos` (:mod:`.check`, :mod:`.preprocess`)
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # decoding
    "read_frames": "diffusionret.data.decode",
    "probe_video": "diffusionret.data.decode",
    "decode_all_frames": "diffusionret.data.decode",
    "benchmark_decode": "diffusionret.data.decode",
    "DecodeStats": "diffusionret.data.decode",
    "VideoInfo": "diffusionret.data.decode",
    # errors
    "VideoDecodeError": "diffusionret.data.errors",
    "AnnotationError": "diffusionret.data.errors",
    "MissingVideosError": "diffusionret.data.errors",
    # sampling
    "sample_times": "diffusionret.data.sampling",
    "target_times": "diffusionret.data.sampling",
    "subsample": "diffusionret.data.sampling",
    "reference_frame_indices": "diffusionret.data.sampling",
    # transforms
    "ClipTransform": "diffusionret.data.transforms",
    "TrainTransform": "diffusionret.data.transforms",
    "RandAugmentPolicy": "diffusionret.data.transforms",
    "build_transform": "diffusionret.data.transforms",
    "clip_mean_std": "diffusionret.data.transforms",
    # records and readers
    "VideoTextPair": "diffusionret.data.records",
    "VideoLocator": "diffusionret.data.records",
    "video_key": "diffusionret.data.records",
    "READERS": "diffusionret.data.annotations",
    "get_reader": "diffusionret.data.annotations",
    # dataset
    "VideoTextDataset": "diffusionret.data.dataset",
    "TextView": "diffusionret.data.dataset",
    "VideoView": "diffusionret.data.dataset",
    "SkippedVideo": "diffusionret.data.dataset",
    "read_skip_report": "diffusionret.data.dataset",
    "require_complete": "diffusionret.data.dataset",
    "worker_init_fn": "diffusionret.data.dataset",
    "Batch": "diffusionret.data.collate",
    "collate": "diffusionret.data.collate",
    # config and factories
    "DataConfig": "diffusionret.data.config",
    "build_dataset": "diffusionret.data.config",
    "load_data_config": "diffusionret.data.config",
    # tools
    "check_data": "diffusionret.data.check",
    "format_report": "diffusionret.data.check",
    "preprocess_videos": "diffusionret.data.preprocess",
    "transcode_video": "diffusionret.data.preprocess",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'diffusionret.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
