"""``VideoIndex``: a persistent on-disk index of video features, and its exact first-stage search.

On disk (one folder)::

    catalog.sqlite        settings, model identity, one row per video (path, size, mtime, duration,
                          thumbnail, where its features live), shards, decode failures
    shards/*.safetensors  features: frames after the temporal module (N, T, D) fp16, frame masks,
                          pooled first-stage embeddings (N, D) fp32, WTI frame weights (N, T) fp32
                          (see :mod:`diffusionret.index.shards`)
    pq-<content>.faiss    optional approximate first stage over the pooled embeddings (PQ fast-scan
    ivf-<content>.faiss   codes, or an IVF-Flat index), named after the rows it covers (see
                          :mod:`diffusionret.index.first_stage`)

In memory, a loaded index keeps every video's features in path order: row ``i`` of
:attr:`VideoIndex.frames` belongs to ``VideoIndex.records[i]``. Memory is about
``N * (T * D * 2 + D * 4 + T * 4)`` bytes (N = 100k ViT-B/32 videos at T = 12: about 1.4 GB), plus
the first stage's own copy of the embeddings for large indexes (fp16: ``N * D * 2``; IVF: ``N * D * 4``;
PQ: ``N * M / 2`` codes, re-scored against the pooled embeddings above).

This module only reads: an index is written by :mod:`diffusionret.index.builder` (``build_index``,
``update_index``), ANN files included (:mod:`diffusionret.index.ann_build`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from diffusionret.index import catalog
from diffusionret.index.catalog import VideoRecord
from diffusionret.index.first_stage import (
    ANN_KINDS,
    AnnUnavailableError,
    ExactFirstStage,
    FirstStageConfig,
    IvfFirstStage,
    PqFirstStage,
    content_fingerprint,
    exact_topk,
    import_faiss,
)
from diffusionret.index.identity import ModelMismatchError
from diffusionret.index.shards import SHARD_DIR, read_shard_rows, read_shard_weights

logger = logging.getLogger(__name__)

__all__ = ["IndexInfo", "VideoIndex", "exact_topk", "index_fingerprint"]


@dataclass(frozen=True)
class IndexInfo:
    """Settings recorded in an index's catalogue.

    Attributes:
        model_id: identity of the model that built the index.
        model_config: its architecture config.
        model_path: checkpoint it was loaded from (the default model for ``search``/``serve``).
        settings: decoding settings (frames, fps, image size, ...).
        num_frames: T, frames stored per video.
        embed_dim: D.
        sources: folders/lists the collection was discovered from.
        video_root: folder that relative paths in list sources refer to (``None``: each list's folder).
        created_at, updated_at: UNIX times.
        segments: how videos were cut into segments (``{"mode": "whole"}`` for indexes built
            before segments existed; see :func:`~diffusionret.index.builder.check_segments`).
    """

    model_id: str
    model_config: dict[str, Any]
    model_path: str | None
    settings: dict[str, Any]
    num_frames: int
    embed_dim: int
    sources: list[str] = field(default_factory=list)
    video_root: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    segments: dict[str, Any] = field(default_factory=lambda: {"mode": "whole"})

    @classmethod
    def from_catalog(cls, values: dict[str, Any]) -> "IndexInfo":
        return cls(
            model_id=values["model_id"], model_config=values.get("model_config", {}),
            model_path=values.get("model_path"), settings=values.get("settings", {}),
            num_frames=int(values["num_frames"]), embed_dim=int(values["embed_dim"]),
            sources=list(values.get("sources", [])), video_root=values.get("video_root"),
            created_at=values.get("created_at"),
            updated_at=values.get("updated_at"),
            segments=dict(values.get("segments") or {"mode": "whole"}),
        )


class VideoIndex:
    """A loaded index: per-video features, metadata and an exact first-stage search.

    Use :meth:`load` (:func:`diffusionret.index.builder.build_index` / ``update_index`` write one).

    Attributes:
        root: index folder.
        info: recorded settings and model identity.
        records: one :class:`VideoRecord` per row, sorted by path.
        frames: (N, T, D) float16 frame features after the temporal module.
        frame_mask: (N, T) bool, True for real frames.
        pooled: (N, D) float32 unit-norm first-stage embeddings.
        frame_weights: (N, T) float32 stored WTI frame weights, or ``None`` when no row has them.
        weights_known: (N,) bool, which rows of ``frame_weights`` are stored (an index extended
            after an upgrade may mix shards with and without weights), or ``None``.
        first_stage: what :meth:`search` uses (set by :meth:`configure_first_stage`; chosen with
            the default :class:`~diffusionret.index.first_stage.FirstStageConfig` on first use).
    """

    def __init__(self, root: Path, info: IndexInfo, records: list[VideoRecord], frames: Tensor,
                 frame_mask: Tensor, pooled: Tensor, *, frame_weights: Tensor | None = None,
                 weights_known: Tensor | None = None) -> None:
        self.root = Path(root)
        self.info = info
        self.records = records
        self.frames = frames
        self.frame_mask = frame_mask
        self.pooled = pooled
        if frame_weights is not None and weights_known is None:
            weights_known = torch.ones(len(records), dtype=torch.bool)
        if weights_known is not None and not bool(weights_known.any()):
            frame_weights = weights_known = None
        self.frame_weights = frame_weights
        self.weights_known = weights_known
        self._all_weights = weights_known is not None and bool(weights_known.all())
        self._rows: dict[str, int] = {}
        for row, record in enumerate(records):  # a video indexed in segments: its first segment's row
            self._rows.setdefault(record.id, row)
        self.first_stage: ExactFirstStage | IvfFirstStage | PqFirstStage | None = None
        self._fingerprint: str | None = None
        # ANN indexes by kind, loaded or built once, reused when reconfigured.
        self._ann: dict[str, IvfFirstStage | PqFirstStage] = {}
        self._pooled_half: Tensor | None = None

    # Writing moved to the write side (a reader never writes); these tell old callers where it went.
    @staticmethod
    def build(*_: Any, **__: Any) -> NoReturn:
        raise AttributeError("VideoIndex.build moved: call diffusionret.build_index(root, videos, extractor, ...) "
                             "(diffusionret.index.builder.build_index; ivf= is now ann=)")

    @staticmethod
    def update(*_: Any, **__: Any) -> NoReturn:
        raise AttributeError("VideoIndex.update moved: call diffusionret.update_index(root, extractor, ...) "
                             "(diffusionret.index.builder.update_index; ivf= is now ann=)")

    # ----------------------------------------------------------------------------------- reading
    @staticmethod
    def read_info(root: str | os.PathLike) -> IndexInfo:
        """The recorded settings of the index at ``root``, without loading features."""
        with contextlib.closing(catalog.connect(Path(root), readonly=True)) as conn:
            values = catalog.read_info(conn)
        if not values:
            raise FileNotFoundError(f"{root}: the index is empty (was its build interrupted before the first shard?)")
        return IndexInfo.from_catalog(values)

    @classmethod
    def load(cls, root: str | os.PathLike, *, model_id: str | None = None) -> "VideoIndex":
        """Load the index at ``root`` into memory.

        Args:
            root: index folder.
            model_id: when given, the identity of the model that will query the index.

        Raises:
            FileNotFoundError: no index at ``root``.
            ModelMismatchError: ``model_id`` is not the model that built the index.
        """
        root = Path(root)
        info = cls.read_info(root)
        if model_id is not None and model_id != info.model_id:
            raise ModelMismatchError(
                f"{root} was built by model {info.model_id[:12]} ({info.model_path}); refusing to query it "
                f"with model {model_id[:12]}: its features live in another embedding space"
            )
        # A concurrent `index update` may retire a shard between reading the catalogue and the file.
        for attempt in range(3):
            try:
                return cls._load_once(root, info)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                logger.info("index changed while loading; retrying")
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, root: Path, info: IndexInfo) -> "VideoIndex":
        with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
            records = _registered_only(root, catalog.list_rows(conn), set(catalog.shard_sizes(conn)))
        n, t, d = len(records), info.num_frames, info.embed_dim
        frames = torch.zeros(n, t, d, dtype=torch.float16)
        frame_mask = torch.zeros(n, t, dtype=torch.bool)
        pooled = torch.zeros(n, d, dtype=torch.float32)
        weights = torch.zeros(n, t, dtype=torch.float32)
        known = torch.zeros(n, dtype=torch.bool)
        by_shard: dict[str, list[int]] = {}
        for row, record in enumerate(records):
            by_shard.setdefault(record.shard, []).append(row)
        for shard, rows in by_shard.items():
            target = torch.as_tensor(rows, dtype=torch.long)
            shard_rows = [records[r].row for r in rows]
            f, m, p = read_shard_rows(root / SHARD_DIR / shard, shard_rows)
            frames[target], frame_mask[target], pooled[target] = f, m, p
            w = read_shard_weights(root / SHARD_DIR / shard, shard_rows)
            if w is not None:
                weights[target], known[target] = w, True
        logger.info("loaded index %s: %d videos, %d frames x %d dims, stored frame weights for %d",
                    root, n, t, d, int(known.sum()))
        return cls(root, info, records, frames, frame_mask, pooled, frame_weights=weights, weights_known=known)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def model_id(self) -> str:
        return self.info.model_id

    def row(self, video_id: str) -> int | None:
        """Row of a video id, or ``None`` when the id is not in the index."""
        return self._rows.get(video_id)

    def record(self, video_id: str) -> VideoRecord | None:
        row = self._rows.get(video_id)
        return None if row is None else self.records[row]

    def thumbnail(self, video_id: str) -> bytes | None:
        """The JPEG thumbnail of a video (read from the catalogue on demand), or ``None``."""
        if video_id not in self._rows:
            return None
        with contextlib.closing(catalog.connect(self.root, readonly=True)) as conn:
            return catalog.thumbnail(conn, video_id)

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Features of selected rows for the second stage.

        Args:
            rows: (n,) long row indices.

        Returns:
            ``frames`` (n, T, D) float32 and ``frame_mask`` (n, T) long (0/1, the mask type the model uses).
        """
        return self.frames[rows].float(), self.frame_mask[rows].long()

    def gather_weights(self, rows: Tensor) -> Tensor | None:
        """Stored WTI frame weights of selected rows, (n, T) float32, or ``None`` unless every row has them."""
        if self.frame_weights is None:
            return None
        if not self._all_weights and not bool(self.weights_known[rows].all()):  # type: ignore[index]
            return None
        return self.frame_weights[rows]

    # ------------------------------------------------------------------------------ first stage
    @property
    def content_fingerprint(self) -> str:
        """:func:`~diffusionret.index.first_stage.content_fingerprint` of the loaded rows (names the ANN files)."""
        if self._fingerprint is None:
            rows = [(r.id, r.shard, r.row) for r in self.records]
            self._fingerprint = content_fingerprint(self.info.model_id, self.info.embed_dim, rows)
        return self._fingerprint

    def configure_first_stage(self, config: FirstStageConfig | None = None, *,
                              ann: IvfFirstStage | PqFirstStage | None = None,
                              ) -> ExactFirstStage | IvfFirstStage | PqFirstStage:
        """Choose what :meth:`search` uses by default: :meth:`open_first_stage`, kept as :attr:`first_stage`."""
        stage = self.open_first_stage(config, ann=ann)
        self.first_stage = stage
        return stage

    def open_first_stage(self, config: FirstStageConfig | None = None, *,
                         ann: IvfFirstStage | PqFirstStage | None = None,
                         ) -> ExactFirstStage | IvfFirstStage | PqFirstStage:
        """A first stage over this index for ``config`` (see :class:`~diffusionret.index.first_stage.FirstStageConfig`).

        Pass it to :meth:`search` (``stage=``); the index's default (:attr:`first_stage`) is left as is.

        With ``method="ivf"`` or ``"pq"`` and no up-to-date file of that kind, the ANN index is
        built in memory (per million videos at 1 thread: IVF about 30 s, PQ about 15 s) for this
        process only: a reader never writes to the index folder (``index update --ann on
        --ann-kind KIND`` writes the file for the next load).

        Args:
            config: the policy (default: ``auto``).
            ann: an already built ANN index (IVF or PQ) over these rows (its fingerprint must match).

        Raises:
            AnnUnavailableError: ``method`` ``ivf`` or ``pq`` without FAISS.
            ValueError: ``ann`` covers other rows.
        """
        config = config or FirstStageConfig()
        large = len(self) >= config.large_index
        stage: ExactFirstStage | IvfFirstStage | PqFirstStage | None = None
        if ann is not None:
            if ann.fingerprint != self.content_fingerprint:
                raise ValueError("the ANN index covers other rows than this index holds")
            self._ann[ann.name] = ann
        if len(self) > 0 and config.method in ANN_KINDS:
            stage = self._open_ann(config.method, config, build=True)
        elif len(self) > 0 and config.method == "auto" and large:
            if not self._faiss_installed():
                logger.info("FAISS is not installed: exact first stage over %d videos", len(self))
            else:
                for kind in ANN_KINDS:  # the best available up-to-date file
                    stage = self._open_ann(kind, config, build=False)
                    if stage is not None:
                        break
                else:
                    logger.warning("%s has no up-to-date ANN file (run `diffusionret index update`); "
                                   "exact first stage", self.root)
        if stage is None:
            half = config.precision == "float16" or (config.precision == "auto" and large)
            if half and self._pooled_half is None:
                self._pooled_half = self.pooled.half()
            stage = ExactFirstStage(self._pooled_half if half else self.pooled)
        logger.info("first stage: %s", stage.describe())
        return stage

    @staticmethod
    def _faiss_installed() -> bool:
        try:
            import_faiss()
        except AnnUnavailableError:
            return False
        return True

    def _open_ann(self, kind: str, config: FirstStageConfig, *, build: bool) -> IvfFirstStage | PqFirstStage | None:
        stage = self._ann.get(kind)
        if stage is None:
            import_faiss()  # callers without build check first; this raises with the install command
            fingerprint = self.content_fingerprint
            if kind == "pq":
                stage = PqFirstStage.load(self.root, fingerprint, pooled=self.pooled)
            else:
                stage = IvfFirstStage.load(self.root, fingerprint, expected_rows=len(self),
                                           embed_dim=self.info.embed_dim)
            if stage is None and not build:
                return None
            if stage is None:
                logger.warning("building the %s first stage for %d videos in memory (not saved: run "
                               "`diffusionret index update %s --ann on --ann-kind %s` to keep one)",
                               kind.upper(), len(self), self.root, kind)
                stage = (PqFirstStage.build(self.pooled, fingerprint) if kind == "pq"
                         else IvfFirstStage.build(self.pooled, fingerprint))
            self._ann[kind] = stage
        if isinstance(stage, PqFirstStage):
            stage.rescore = config.rescore
        else:
            stage.nprobe = config.nprobe
        return stage

    def search(self, queries: Tensor, k: int, *,
               stage: ExactFirstStage | IvfFirstStage | PqFirstStage | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` maximum-inner-product search over the pooled embeddings (exact, IVF or PQ: see :attr:`first_stage`).

        Args:
            queries: (Nq, D) query embeddings (normalise them for cosine scores).
            k: results per query (clipped to the index size).
            stage: the first stage to search with (from :meth:`open_first_stage`; default :attr:`first_stage`).

        Returns:
            ``scores`` (Nq, k') float32 and ``rows`` (Nq, k') long, sorted by descending score,
            with ``k' = min(k, len(self))``.
        """
        if queries.dim() != 2 or queries.shape[1] != self.info.embed_dim:
            raise ValueError(f"queries must be (Nq, {self.info.embed_dim}), got {tuple(queries.shape)}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        queries = queries.detach().to("cpu", torch.float32)
        k = min(k, len(self))
        if k == 0:
            return torch.zeros(queries.shape[0], 0), torch.zeros(queries.shape[0], 0, dtype=torch.long)
        stage = stage or self.first_stage or self.configure_first_stage()
        return stage.search(queries, k)


def _registered_only(root: Path, records: list[VideoRecord], registered: set[str]) -> list[VideoRecord]:
    """Drop rows whose features would come from a file that no live shard entry of the catalogue registered.

    A shard file is trusted because the writer registered it; a row naming any other file (one
    dropped into ``shards/``, or a path leading out of it) is not read.
    """
    kept = [r for r in records if r.shard in registered and Path(r.shard).name == r.shard]
    if len(kept) != len(records):
        bad = sorted({r.shard for r in records} - {r.shard for r in kept})
        logger.warning("%s: ignoring %d videos whose shards are not registered in the catalogue: %s",
                       root, len(records) - len(kept), ", ".join(bad[:5]))
    return kept


def index_fingerprint(conn: sqlite3.Connection) -> tuple[str, list[VideoRecord]]:
    """:func:`~diffusionret.index.first_stage.content_fingerprint` of the catalogue's current rows, and the rows.

    Equals :attr:`VideoIndex.content_fingerprint` of the index loaded from that catalogue (same rows, same order).
    """
    info = catalog.read_info(conn)
    records = catalog.list_rows(conn)
    rows = [(r.id, r.shard, r.row) for r in records]
    return content_fingerprint(info["model_id"], int(info["embed_dim"]), rows), records
