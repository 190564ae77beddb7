"""Annotation readers: ``(anno_path, video_path, split, *, exclude_ids) -> list[VideoTextPair]``.

Each reader only reads annotation files (and finds video files); decoding happens in the dataset.
The registry is explicit (no import-time scanning).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from diffusionret.data.annotations.activitynet import read_activitynet
from diffusionret.data.annotations.custom import read_custom
from diffusionret.data.annotations.didemo import read_didemo
from diffusionret.data.annotations.lsmdc import read_lsmdc
from diffusionret.data.annotations.msrvtt import read_msrvtt
from diffusionret.data.annotations.msvd import read_msvd
from diffusionret.data.records import VideoTextPair


class Reader(Protocol):
    def __call__(
        self, anno_path: str | Path, video_path: str | Path, split: str, *, exclude_ids: Collection[str] = ()
    ) -> list[VideoTextPair]: ...


READERS: dict[str, Reader] = {
    "msrvtt": read_msrvtt,
    "msvd": read_msvd,
    "activitynet": read_activitynet,
    "didemo": read_didemo,
    "lsmdc": read_lsmdc,
    "custom": read_custom,
}

# Names the reference's ``--datatype`` used, accepted for convenience.
ALIASES: dict[str, str] = {"activity": "activitynet"}


def get_reader(name: str) -> Reader:
    """The reader registered under ``name`` (or one of :data:`ALIASES`)."""
    key = ALIASES.get(name, name)
    if key not in READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(READERS)}")
    return READERS[key]


__all__ = [
    "ALIASES",
    "READERS",
    "Reader",
    "get_reader",
    "read_activitynet",
    "read_custom",
    "read_didemo",
    "read_lsmdc",
    "read_msrvtt",
    "read_msvd",
]
