"""Where a loaded index's second-stage features live: in RAM, or memory-mapped from its shards.

The second stage reads the frame features (N, T, D) fp16, frame masks and stored WTI frame weights
of only the ~100 rows the first stage selects per query, so these need not be resident: a
:class:`MappedFrames` maps them from the (immutable) shard files and each gather reads the pages
of the selected rows (about 12 KB per row at T = 12, D = 512), from the page cache when warm. At 1M
segments that keeps ~12 GB out of the process's resident memory (BENCHMARKS.md, "Archive scale").
:class:`InMemoryFrames` holds the same tensors in RAM (indexes assembled in memory: tests, benchmarks).

Both give the same values for the same rows: ``gather`` returns exactly what the in-RAM tensors
indexed by ``rows`` would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from diffusionret.index.shards import MappedShard, ShardFormatError, map_shard, read_pooled

logger = logging.getLogger(__name__)


class FrameStore(Protocol):
    """Per-row second-stage features of an index (row ``i`` is the index's row ``i``).

    ``weights_known``: (N,) bool, which rows have stored WTI frame weights, or ``None`` when none has.
    """

    weights_known: Tensor | None

    def __len__(self) -> int: ...

    def stored(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``frames`` (n, T, D) float16 and ``frame_mask`` (n, T) bool of ``rows`` (n,) long, as stored."""
        ...

    def stored_weights(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        """``weights`` (n, T) float32 (zeros where unknown) and ``known`` (n,) bool, or ``None`` when no row has any."""
        ...

    def describe(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class InMemoryFrames:
    """Second-stage features held in RAM.

    Attributes:
        frames: (N, T, D) float16.
        frame_mask: (N, T) bool.
        frame_weights: (N, T) float32, or ``None``.
        weights_known: (N,) bool, which rows of ``frame_weights`` are stored, or ``None``.
    """

    frames: Tensor
    frame_mask: Tensor
    frame_weights: Tensor | None = None
    weights_known: Tensor | None = None

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def stored(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        # index_select, not frames[rows]: the same rows, and about 6x faster on (n, T, D) float16
        # (advanced indexing of half precision was most of a search query's gather).
        return self.frames.index_select(0, rows), self.frame_mask.index_select(0, rows)

    def stored_weights(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.frame_weights is None or self.weights_known is None:
            return None
        return self.frame_weights.index_select(0, rows), self.weights_known.index_select(0, rows)

    def describe(self) -> dict[str, object]:
        return {"frames": "in memory"}


class MappedFrames:
    """Second-stage features memory-mapped from the index's shard files.

    Args:
        shards: the mapped shards (see :func:`~diffusionret.index.shards.map_shard`).
        shard_of: (N,) int32, which of ``shards`` holds each index row.
        local_row: (N,) int64, the row inside that shard.
        num_frames, embed_dim: T and D.
    """

    def __init__(self, shards: Sequence[MappedShard], shard_of: Tensor, local_row: Tensor, *, num_frames: int,
                 embed_dim: int) -> None:
        if shard_of.shape != local_row.shape:
            raise ValueError("shard_of and local_row disagree in length")
        self.shards = list(shards)
        self.shard_of = shard_of
        self.local_row = local_row
        has = torch.tensor([s.frame_weights is not None for s in self.shards], dtype=torch.bool)
        self.weights_known: Tensor | None = has[shard_of.long()] if bool(has.any()) else None
        self._frame_shape = (num_frames, embed_dim)
        # numpy views of the same maps (no copy): numpy's per-call overhead is a fraction of torch's,
        # which matters when a request touches ~100 shards.
        self._shard_of_np = shard_of.numpy()
        self._local_np = local_row.numpy()
        self._frames_np = [s.frames.numpy() for s in self.shards]
        self._mask_np = [s.frame_mask.view(torch.uint8).numpy() for s in self.shards]
        self._weights_np = [None if s.frame_weights is None else s.frame_weights.numpy() for s in self.shards]

    @classmethod
    def open(cls, shard_dir: Path, rows: Sequence[tuple[str, int]], num_rows: dict[str, int], *,
             num_frames: int, embed_dim: int) -> "MappedFrames":
        """Validate and map every shard that ``rows`` use.

        Args:
            shard_dir: the index's ``shards/`` folder.
            rows: ``(shard name, row in shard)`` of every index row, in index order.
            num_rows: rows of each shard according to the catalogue.
            num_frames, embed_dim: T and D of the index.

        Raises:
            FileNotFoundError: a shard file is gone (a concurrent update retired it).
            ShardFormatError: a shard does not match the catalogue or is truncated (names the file).
        """
        order: dict[str, int] = {}
        owners = [order.setdefault(name, len(order)) for name, _ in rows]
        shard_of = torch.tensor(owners, dtype=torch.int32)
        local_row = torch.tensor([row for _, row in rows], dtype=torch.int64)
        shards = [map_shard(shard_dir / name, num_rows=num_rows[name], num_frames=num_frames, embed_dim=embed_dim)
                  for name in order]
        # A catalogue row past the end of its shard would read another row's bytes.
        sizes = torch.tensor([s.num_rows for s in shards], dtype=torch.int64)
        bad = ((local_row < 0) | (local_row >= sizes[shard_of.long()])).nonzero()[:, 0] if shards else []
        if len(bad):
            shard = shards[int(shard_of[bad[0]])]
            raise ShardFormatError(f"index shard {shard.path}: the catalogue names row {int(local_row[bad[0]])}, "
                                   f"the file holds {shard.num_rows}")
        return cls(shards, shard_of, local_row, num_frames=num_frames, embed_dim=embed_dim)

    def __len__(self) -> int:
        return int(self.shard_of.shape[0])

    def _split(self, rows: Tensor) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """Group ``rows`` by shard: ``(order, [(shard number, rows inside it), ...])`` where the groups,
        concatenated, hold ``rows[order]``. One sort for the whole request, then one indexing
        operation per shard touched (numpy: a few microseconds each), never one per row."""
        rows_np = rows.numpy()
        owners, local = self._shard_of_np[rows_np], self._local_np[rows_np]
        order = np.argsort(owners, kind="stable")
        owners, local = owners[order], local[order]
        cuts = [0, *(np.flatnonzero(owners[1:] != owners[:-1]) + 1).tolist(), len(order)]
        return order, [(int(owners[a]), local[a:b]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    @staticmethod
    def _assemble(order: np.ndarray, parts: list[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> Tensor:
        out = np.empty((len(order), *shape), dtype=dtype)
        if parts:
            out[order] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(out)

    def stored(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        order, groups = self._split(rows.long())
        t, d = self._frame_shape
        frames = self._assemble(order, [self._frames_np[s][local] for s, local in groups], (t, d), np.float16)
        mask = self._assemble(order, [self._mask_np[s][local] for s, local in groups], (t,), np.uint8)
        return frames, mask.bool()

    def stored_weights(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.weights_known is None:
            return None
        rows = rows.long()
        order, groups = self._split(rows)
        t = self._frame_shape[0]
        parts = [np.zeros((len(local), t), np.float32) if self._weights_np[s] is None else self._weights_np[s][local]
                 for s, local in groups]
        return self._assemble(order, parts, (t,), np.float32), self.weights_known[rows]

    def read_pooled(self, dtype: torch.dtype) -> Tensor:
        """(N, D) pooled embeddings of every row in ``dtype``, read shard by shard (one shard's float32
        tensor in flight at a time, so an fp16 copy never needs the fp32 whole in RAM)."""
        d = self._frame_shape[1]
        pooled = torch.empty(len(self), d, dtype=dtype)
        # One sort groups the rows by shard (a scan of every row per shard would be quadratic-ish:
        # a 1M-row index built with 256-row shards has ~3,900 of them).
        order, groups = self._split(torch.arange(len(self)))
        start = 0
        for shard, local in groups:
            stop = start + len(local)
            values = read_pooled(self.shards[shard], d)[torch.from_numpy(local)]
            pooled[torch.from_numpy(order[start:stop])] = values.to(dtype)
            start = stop
        return pooled

    def describe(self) -> dict[str, object]:
        return {"frames": "memory-mapped", "shards": len(self.shards)}
