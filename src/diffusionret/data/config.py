"""The data section of a run config and the factory that turns it into datasets.

``DataConfig`` is self-contained so that a run config can embed it as its ``data`` field, and
``diffusionret data check CONFIG`` can read either such a run config or a file that is only a
``DataConfig``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diffusionret.config_utils import ConfigError, apply_overrides, from_dict, load_yaml
from diffusionret.inputs import REFERENCE_INPUT

if TYPE_CHECKING:
    from diffusionret.data.dataset import Tokenizer, VideoTextDataset

logger = logging.getLogger(__name__)

__all__ = ["DataConfig", "build_dataset", "load_data_config"]

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how videos and captions become tensors.

    Attributes:
        dataset: reader name: ``msrvtt``, ``msvd``, ``activitynet``, ``didemo``, ``lsmdc`` or ``custom``.
        anno_path: annotation folder (``custom``: the CSV/JSONL file, or a folder of ``<split>.csv``).
        video_path: video folder.
        train_split, test_split: the reader's split names used for training and testing.
        val_split: the split used for validation; ``None`` means ``test_split`` (what the reference
            does for every benchmark, docs/reference.md §5.1).
        max_words: ``L``, token length including SOT/EOT (the paper: 32; ActivityNet/DiDeMo: 64).
        max_frames: ``T`` (the paper: 12; ActivityNet/DiDeMo: 64).
        fps: frames per second of video time to sample (the reference's ``--video_framerate``).
        sampling: ``uniform``, ``head``, ``tail`` or ``reference`` (see :mod:`diffusionret.data.sampling`).
        size: frame side ``S``.
        augment: training augmentation: ``none`` (the reference), ``crop_flip``, ``randaugment``,
            ``crop_flip_randaugment``; never applied to val/test.
        on_error: bad videos: ``raise`` or ``skip`` (dropped and listed in the skip report).
        skip_report: JSON-lines file of skipped videos; ``None``: ``<report_dir>/skipped_<split>.jsonl``
            when the caller passes a report folder, else warnings only.
        exclude_ids: video ids to leave out (e.g. known-broken clips).
        num_workers: DataLoader worker processes.
        batch_size, batch_size_val: *global* batch sizes (divided by the world size per rank).
        pin_memory: DataLoader ``pin_memory`` (the reference: off; worth turning on for GPU training).
        seed: base seed of shuffling and augmentation.
    """

    dataset: str
    anno_path: Path
    video_path: Path
    train_split: str = "train"
    val_split: str | None = None
    test_split: str = "test"
    # The reference's documented setting (diffusionret.inputs.REFERENCE_INPUT).
    max_words: int = REFERENCE_INPUT.max_words
    max_frames: int = REFERENCE_INPUT.max_frames
    fps: float = REFERENCE_INPUT.fps
    sampling: Literal["uniform", "head", "tail", "reference"] = "uniform"
    size: int = REFERENCE_INPUT.size
    augment: Literal["none", "crop_flip", "randaugment", "crop_flip_randaugment"] = "none"
    on_error: Literal["raise", "skip"] = "raise"
    skip_report: Path | None = None
    exclude_ids: tuple[str, ...] = ()
    num_workers: int = 4
    batch_size: int = 128
    batch_size_val: int = 64
    pin_memory: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from diffusionret.data.annotations import ALIASES, READERS

        if ALIASES.get(self.dataset, self.dataset) not in READERS:
            raise ValueError(f"dataset {self.dataset!r} is not one of {sorted(READERS)}")
        if self.max_words < 2:
            raise ValueError(f"max_words must be >= 2 (SOT and EOT), got {self.max_words}")
        if self.max_frames < 1 or self.size < 1:
            raise ValueError(f"max_frames and size must be >= 1, got {self.max_frames}, {self.size}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.sampling == "reference" and self.fps != int(self.fps):
            raise ValueError(f"sampling 'reference' needs an integer fps (the reference's framerate), got {self.fps}")
        if self.batch_size < 1 or self.batch_size_val < 1 or self.num_workers < 0:
            raise ValueError("batch sizes must be >= 1 and num_workers >= 0")
        # Normalise str paths given programmatically (from_dict already makes Paths).
        for name in ("anno_path", "video_path"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.skip_report is not None:
            object.__setattr__(self, "skip_report", Path(self.skip_report))
        object.__setattr__(self, "exclude_ids", tuple(self.exclude_ids))

    def reader_split(self, split: str) -> str:
        """The reader's split name for ``"train"``/``"val"``/``"test"`` (other names pass through)."""
        if split == "train":
            return self.train_split
        if split == "val":
            return self.val_split if self.val_split is not None else self.test_split
        if split == "test":
            return self.test_split
        return split


def load_data_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DataConfig:
    """A :class:`DataConfig` from a YAML file that is either a run config with a ``data:`` section or
    a bare data config. Overrides are ``key=value`` (``data.key=value`` also works for run configs).

    Raises:
        ConfigError: unreadable YAML, unknown keys or invalid values (names the file).
    """
    raw = load_yaml(path)
    if isinstance(raw.get("data"), dict):
        section = apply_overrides(raw, [o if o.startswith("data.") else f"data.{o}" for o in overrides])["data"]
    else:
        section = apply_overrides(raw, list(overrides))
    try:
        return from_dict(DataConfig, section, "data")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def build_dataset(
    cfg: DataConfig,
    split: str,
    *,
    tokenizer: Tokenizer | None = None,
    train: bool | None = None,
    report_dir: str | os.PathLike | None = None,
) -> VideoTextDataset:
    """Read a split and wrap it in a :class:`~diffusionret.data.dataset.VideoTextDataset`.

    Args:
        cfg: the data config.
        split: ``"train"``, ``"val"``, ``"test"`` (mapped through the config) or a reader split name.
        tokenizer: defaults to :func:`diffusionret.tokenizer.tokenize`.
        train: apply ``cfg.augment``; default: ``split == "train"``.
        report_dir: folder for the default skip report (see :attr:`DataConfig.skip_report`).
    """
    from diffusionret.data.annotations import get_reader
    from diffusionret.data.dataset import VideoTextDataset
    from diffusionret.data.transforms import build_transform

    reader_split = cfg.reader_split(split)
    records = get_reader(cfg.dataset)(cfg.anno_path, cfg.video_path, reader_split, exclude_ids=cfg.exclude_ids)
    if not records:
        raise ValueError(f"{cfg.dataset}/{reader_split}: no records in {cfg.anno_path}")
    is_train = split == "train" if train is None else train
    report = cfg.skip_report
    if report is None and report_dir is not None:
        report = Path(report_dir) / f"skipped_{split}.jsonl"
    return VideoTextDataset(
        records,
        tokenizer=tokenizer,
        max_words=cfg.max_words,
        max_frames=cfg.max_frames,
        fps=cfg.fps,
        sampling=cfg.sampling,
        size=cfg.size,
        transform=build_transform(cfg.size, cfg.augment if is_train else "none"),
        on_error=cfg.on_error,
        skip_report=report,
        seed=cfg.seed,
        name=f"{cfg.dataset}/{reader_split}",
    )
