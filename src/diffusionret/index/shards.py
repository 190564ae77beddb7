"""Self-contained feature shards: one safetensors file per batch of encoded videos.

A shard holds the features *and* everything the catalogue needs about its videos (paths, file
states, durations, thumbnails, decode failures), so that a shard written by any process, including
a torchrun rank that never touches SQLite or a build killed before it registered the shard, can be
registered later from the file alone. Files appear through ``temp + fsync + rename``: a shard on
disk under its final name is always complete.

Tensors:
    ``frames`` (N, T, D) float16: per-frame features after the temporal module.
    ``frame_mask`` (N, T) uint8: 1 for real frames.
    ``pooled`` (N, D) float32: the first-stage embedding (:func:`~diffusionret.index.features.pool_frames`).
    ``frame_weights`` (N, T) float32, optional: the WTI head's video-side softmax weights of the
        stored (fp16) frames (``DiffusionRet.frame_weights``), so queries skip the weight MLP.
        Shards written before it existed, or by an extractor without a model, lack it.
    ``thumbs`` (B,) uint8 and ``thumb_offsets`` (N + 1,) int64: concatenated JPEG thumbnails.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from diffusionret.config_utils import atomic_write_bytes
from diffusionret.safetensors_mmap import item_size, mmap_from_header, read_header

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
SHARD_SUFFIX = ".safetensors"
_SHARD_FORMAT = "diffusionret-index-shard/1"
# What a reader accepts per feature tensor: safetensors dtype names, and the trailing shape
# ("T", "D": the index's frames per row and dimension) after the leading row axis.
_FEATURE_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "frames": (("F16",), ("T", "D")),
    "frame_mask": (("U8", "BOOL"), ("T",)),
    "pooled": (("F32",), ("D",)),
    "frame_weights": (("F32",), ("T",)),
}


class ShardFormatError(ValueError):
    """A shard file is damaged or does not match the catalogue (the message names the file)."""


@dataclass(frozen=True)
class ShardEntry:
    """Facts about one row of a shard (row ``i`` of the tensors): a video, or one segment of it.

    ``start``/``end`` (seconds) are set for a segment row (a video indexed in segments has one entry
    per segment, sharing ``id``); ``None`` for a video indexed whole, whose entry is written exactly
    as before segments existed.
    """

    id: str
    path: str
    size: int
    mtime_ns: int
    duration: float | None
    width: int | None
    height: int | None
    num_frames: int
    start: float | None = None
    end: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The metadata dict (no span keys for a whole-video row: shards of whole indexes stay as they were)."""
        out = dict(self.__dict__)
        if self.start is None:
            del out["start"], out["end"]
        return out


@dataclass(frozen=True)
class ShardFailure:
    path: str
    size: int
    mtime_ns: int
    error: str


@dataclass
class ShardContents:
    """A shard read back from disk (tensors optional: registration needs only the metadata).

    Attributes:
        name: file name.
        model_id: the model that encoded it.
        created_ns: creation time, which orders registration (newer entries win).
        entries: one per row.
        failures: videos that failed to decode.
        thumbnails: one JPEG (or ``None``) per row.
    """

    name: str
    model_id: str
    created_ns: int
    entries: list[ShardEntry]
    failures: list[ShardFailure]
    thumbnails: list[bytes | None]


def new_shard_name(rank: int, sequence: int) -> str:
    """A unique, time-ordered file name: ``s<ns>-r<rank>-<seq>.safetensors``."""
    return f"s{time.time_ns():020d}-r{rank:03d}-{sequence:06d}{SHARD_SUFFIX}"


def write_shard(
    directory: Path,
    name: str,
    *,
    model_id: str,
    entries: Sequence[ShardEntry],
    failures: Sequence[ShardFailure],
    frames: Tensor,
    frame_mask: Tensor,
    pooled: Tensor,
    thumbnails: Sequence[bytes | None],
    frame_weights: Tensor | None = None,
) -> Path:
    """Write a shard atomically (see module docstring for the tensor layout); returns its path."""
    if not (len(entries) == frames.shape[0] == frame_mask.shape[0] == pooled.shape[0] == len(thumbnails)):
        raise ValueError("shard entries, tensors and thumbnails disagree in length")
    if frame_weights is not None and frame_weights.shape != frame_mask.shape:
        raise ValueError(f"frame_weights {tuple(frame_weights.shape)} do not match the frame mask "
                         f"{tuple(frame_mask.shape)}")
    blobs = [t or b"" for t in thumbnails]
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in blobs], dtype=torch.int64), 0)
    payload = b"".join(blobs)
    # frombuffer rejects an empty buffer
    thumbs = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    metadata = {
        "format": _SHARD_FORMAT,
        "model_id": model_id,
        "created_ns": str(time.time_ns()),
        "entries": json.dumps([e.to_json() for e in entries]),
        "failures": json.dumps([f.__dict__ for f in failures]),
    }
    tensors = {
        "frames": frames.to(torch.float16).contiguous(),
        "frame_mask": frame_mask.to(torch.uint8).contiguous(),
        "pooled": pooled.to(torch.float32).contiguous(),
        "thumbs": thumbs,
        "thumb_offsets": offsets,
    }
    if frame_weights is not None:
        tensors["frame_weights"] = frame_weights.to(torch.float32).contiguous()
    path = directory / name
    atomic_write_bytes(path, save(tensors, metadata=metadata))  # fsyncs the file and the folder
    return path


def read_shard_metadata(path: Path) -> ShardContents:
    """Read a shard's metadata and thumbnails (not its feature tensors).

    Raises:
        ValueError: the file is not a diffusionret shard.
    """
    with safe_open(str(path), framework="pt") as handle:
        meta: dict[str, Any] = handle.metadata() or {}
        if meta.get("format") != _SHARD_FORMAT:
            raise ValueError(f"{path}: not a diffusionret index shard")
        thumbs = handle.get_tensor("thumbs")
        offsets = handle.get_tensor("thumb_offsets").tolist()
    raw = thumbs.numpy().tobytes()
    thumbnails = [raw[a:b] or None for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    entries = [ShardEntry(**e) for e in json.loads(meta["entries"])]
    failures = [ShardFailure(**f) for f in json.loads(meta["failures"])]
    if len(entries) != len(thumbnails):
        raise ValueError(f"{path}: {len(entries)} entries but {len(thumbnails)} thumbnails")
    return ShardContents(path.name, meta["model_id"], int(meta["created_ns"]), entries, failures, thumbnails)


def read_shard_rows(path: Path, rows: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Load selected rows of a shard.

    Args:
        path: shard file.
        rows: row numbers to load, in the order wanted.

    Returns:
        ``frames`` (R, T, D) float16, ``frame_mask`` (R, T) bool, ``pooled`` (R, D) float32.
    """
    index = torch.as_tensor(list(rows), dtype=torch.long)
    with safe_open(str(path), framework="pt") as handle:
        frames = handle.get_tensor("frames")
        frame_mask = handle.get_tensor("frame_mask")
        pooled = handle.get_tensor("pooled")
    return frames[index], frame_mask[index].bool(), pooled[index]


def read_shard_pooled(path: Path, rows: Sequence[int]) -> Tensor:
    """Selected rows of a shard's pooled embeddings only: (R, D) float32 (the frames are not read)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("pooled")[index]


def read_shard_weights(path: Path, rows: Sequence[int]) -> Tensor | None:
    """Selected rows of a shard's stored frame weights, (R, T) float32, or ``None`` if it has none."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    with safe_open(str(path), framework="pt") as handle:
        if "frame_weights" not in handle.keys():
            return None
        return handle.get_tensor("frame_weights")[index]


@dataclass(frozen=True)
class MappedShard:
    """The feature tensors of one shard, memory-mapped (read-only on disk) after validation.

    Indexing a tensor reads only the pages of the rows asked for. The map keeps the file's inode
    alive: a writer that later retires the shard (unlink) or publishes other shards (rename of a
    new name) leaves these pages valid and unchanged, so an open index stays readable while
    ``index update`` runs.

    Attributes:
        path: the file.
        frames: (R, T, D) float16.
        frame_mask: (R, T) uint8 (or bool).
        frame_weights: (R, T) float32, or ``None`` for a shard stored without them.
        pooled_offset: byte offset of the (R, D) float32 ``pooled`` tensor (read with
            :func:`read_pooled`, never mapped: the first stage keeps its own copy in RAM).
    """

    path: Path
    frames: Tensor
    frame_mask: Tensor
    frame_weights: Tensor | None
    pooled_offset: int

    @property
    def num_rows(self) -> int:
        return int(self.frames.shape[0])


def validate_shard(path: Path, *, num_rows: int, num_frames: int, embed_dim: int) -> tuple[dict[str, Any], int]:
    """Check a shard's header against the catalogue before anything is mapped.

    Checks the format tag, every feature tensor's dtype and shape (``num_rows`` rows of ``T`` /
    ``D``), that each tensor's byte range has exactly the size its shape needs, and that the file
    is long enough for every range (a truncated file would otherwise raise SIGBUS on first touch).

    Returns:
        ``(tensors header, data start)`` (see :func:`diffusionret.safetensors_mmap.read_header`).

    Raises:
        FileNotFoundError: the file is gone (a concurrent update retired it).
        ShardFormatError: naming the file and what is wrong.
    """
    try:
        header, metadata, data_start = read_header(path)
    except ValueError as exc:  # read_header names the file and what is wrong
        raise ShardFormatError(f"index shard {exc}") from exc
    if metadata.get("format") != _SHARD_FORMAT:
        raise ShardFormatError(f"index shard {path}: not a diffusionret index shard "
                               f"(format {metadata.get('format')!r}, expected {_SHARD_FORMAT!r})")
    dims = {"T": num_frames, "D": embed_dim}
    for name, (dtypes, trailing) in _FEATURE_SPECS.items():
        info = header.get(name)
        if info is None:
            if name == "frame_weights":  # optional: shards written before weights were stored
                continue
            raise ShardFormatError(f"index shard {path}: no {name!r} tensor")
        try:
            dtype, shape = str(info["dtype"]), [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFormatError(f"index shard {path}: malformed header entry for {name!r}: {exc}") from exc
        expected = [num_rows, *(dims[d] for d in trailing)]
        if dtype not in dtypes:
            raise ShardFormatError(f"index shard {path}: {name!r} has dtype {dtype}, expected one of {dtypes}")
        if shape != expected:
            raise ShardFormatError(f"index shard {path}: {name!r} has shape {shape}; the catalogue expects "
                                   f"{expected} ({num_rows} rows, T={num_frames}, D={embed_dim})")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * item_size(dtype):
            raise ShardFormatError(f"index shard {path}: {name!r} spans bytes [{begin}, {end}), which is not "
                                   f"the {math.prod(shape) * item_size(dtype)} bytes its shape {shape} needs")
    return header, data_start


def map_shard(path: Path, *, num_rows: int, num_frames: int, embed_dim: int) -> MappedShard:
    """Validate a shard (:func:`validate_shard`) and memory-map its frame features, masks and weights.

    Raises:
        FileNotFoundError: the file is gone.
        ShardFormatError: naming the file.
    """
    header, data_start = validate_shard(path, num_rows=num_rows, num_frames=num_frames, embed_dim=embed_dim)
    names = ["frames", "frame_mask"] + (["frame_weights"] if "frame_weights" in header else [])
    mapped = mmap_from_header(path, header, data_start, names)
    return MappedShard(path=path, frames=mapped["frames"], frame_mask=mapped["frame_mask"],
                       frame_weights=mapped.get("frame_weights"),
                       pooled_offset=data_start + int(header["pooled"]["data_offsets"][0]))


def read_pooled(shard: MappedShard, embed_dim: int) -> Tensor:
    """A shard's whole (R, D) float32 ``pooled`` tensor, read into RAM with plain reads (not through a
    map, so that resident memory does not keep file pages the first stage has its own copy of)."""
    count = shard.num_rows * embed_dim
    with open(shard.path, "rb") as handle:
        handle.seek(shard.pooled_offset)
        values = np.fromfile(handle, dtype=np.float32, count=count)
    if values.size != count:  # the file shrank after validation
        raise ShardFormatError(f"index shard {shard.path}: truncated while reading its pooled embeddings")
    return torch.from_numpy(values).view(shard.num_rows, embed_dim)
