"""Writing an index's ANN (PQ or IVF) first-stage files: when to keep one, building, saving, deleting stale ones.

The write side of :mod:`~diffusionret.index.first_stage` (which only loads and searches these files).
:func:`refresh_ann` runs at the end of every ``index build``/``update`` under the writer lock
(:func:`diffusionret.index.builder.sync_index`); nothing on the read side writes a FAISS file.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from diffusionret.config_utils import atomic_path
from diffusionret.index import catalog
from diffusionret.index.catalog import VideoRecord
from diffusionret.index.first_stage import (
    ANN_KINDS,
    ANN_SUFFIX,
    DEFAULT_ANN_KIND,
    LARGE_INDEX_VIDEOS,
    AnnKind,
    AnnUnavailableError,
    IvfFirstStage,
    PqFirstStage,
    ann_files,
    ann_path,
    import_faiss,
)
from diffusionret.index.shards import SHARD_DIR, read_shard_pooled
from diffusionret.index.store import index_fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnBuildConfig:
    """Whether ``index build``/``update`` keep an ANN first-stage file (:mod:`~diffusionret.index.first_stage`).

    Attributes:
        mode: ``auto``: for indexes of at least ``min_videos`` videos when FAISS is installed;
            ``on``: always (FAISS required); ``off``: never (existing ANN files are deleted).
        min_videos: the ``auto`` threshold.
        nlist: IVF clusters (default: the power of two nearest sqrt(N); ``kind="ivf"`` only).
        kind: which structure to build: ``pq`` (PQ fast-scan + exact re-scoring, the default) or
            ``ivf`` (IVF-Flat).
        pq_m: PQ sub-quantisers (default :func:`~diffusionret.index.first_stage.default_pq_m`;
            ``kind="pq"`` only).
    """

    mode: str = "auto"
    min_videos: int = LARGE_INDEX_VIDEOS
    nlist: int | None = None
    kind: AnnKind = DEFAULT_ANN_KIND
    pq_m: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"ANN mode must be auto, on or off, got {self.mode!r}")
        if self.kind not in ANN_KINDS:
            raise ValueError(f"ANN kind must be one of {ANN_KINDS}, got {self.kind!r}")
        if self.nlist is not None and self.nlist <= 0:
            raise ValueError(f"nlist must be positive, got {self.nlist}")
        if self.pq_m is not None and self.pq_m <= 0:
            raise ValueError(f"pq_m must be positive, got {self.pq_m}")



def refresh_ann(conn: sqlite3.Connection, root: Path, config: AnnBuildConfig) -> Path | None:
    """Make the index folder hold an up-to-date ANN file when ``config`` asks for one (caller holds the lock).

    Builds ``<kind>-<fingerprint>.faiss`` (``config.kind``) for the catalogue's current rows when it
    is wanted and missing, then deletes every ANN file of other contents. Returns the path of the
    ``config.kind`` file, or ``None`` when the index keeps none of that kind.
    """
    fingerprint, records = index_fingerprint(conn)
    wanted = bool(records) and (config.mode == "on"
                                or (config.mode == "auto" and len(records) >= config.min_videos))
    path = ann_path(root, config.kind, fingerprint)
    if wanted and not path.is_file():
        try:
            import_faiss()
        except AnnUnavailableError as exc:  # raised up front for mode "on"; "auto" goes on without
            logger.warning("not building an ANN first stage for %d videos: %s", len(records), exc)
        else:
            pooled = load_pooled(root, records, int(catalog.read_info(conn)["embed_dim"]))
            if config.kind == "pq":
                save_ann(PqFirstStage.build(pooled, fingerprint, m=config.pq_m), root)
            else:
                save_ann(IvfFirstStage.build(pooled, fingerprint, nlist=config.nlist), root)
            logger.info("wrote %s", path.name)
    # Up-to-date files (of either kind, e.g. one a user built on purpose) stay unless ANN is switched off.
    keep = fingerprint if config.mode != "off" else None
    for name in remove_stale_ann(root, keep):
        logger.info("deleted stale ANN file %s", name)
    return path if keep and path.is_file() else None


def load_pooled(root: Path, records: Sequence[VideoRecord], embed_dim: int) -> torch.Tensor:
    """(N, D) float32 pooled embeddings of ``records`` in their order, read from the shards (not the frames)."""
    by_shard: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        by_shard.setdefault(record.shard, []).append(position)
    pooled = torch.zeros(len(records), embed_dim, dtype=torch.float32)
    for shard, positions in by_shard.items():
        values = read_shard_pooled(root / SHARD_DIR / shard, [records[i].row for i in positions])
        pooled[torch.as_tensor(positions, dtype=torch.long)] = values
    return pooled


def save_ann(stage: IvfFirstStage | PqFirstStage, root: Path) -> Path:
    """Write ``<kind>-<fingerprint>.faiss`` for a built ANN stage atomically (temp + fsync + rename); returns its path.

    A PQ file holds the codes and codebooks only: a loaded one re-scores against the index's pooled embeddings.
    """
    faiss = import_faiss()
    path = ann_path(root, stage.name, stage.fingerprint)
    with atomic_path(path) as tmp:
        faiss.write_index(stage.index, str(tmp))
    return path


def remove_stale_ann(root: Path, keep: str | None) -> list[str]:
    """Delete ANN files (IVF or PQ) not for fingerprint ``keep`` (and leftover temp files); returns their names."""
    removed = []
    for path in ann_files(root):
        if keep is None or path.name.removesuffix(ANN_SUFFIX).split("-", 1)[1] != keep:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    for kind in ANN_KINDS:
        for tmp in Path(root).glob(f".{kind}-*{ANN_SUFFIX}.*.tmp"):
            tmp.unlink(missing_ok=True)
    return removed
