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

In memory, a loaded index keeps only what the first stage scans, in path order (row ``i`` belongs
to ``VideoIndex.records[i]``): the pooled embeddings (fp32 below
:data:`~diffusionret.index.first_stage.LARGE_INDEX_VIDEOS` rows, fp16 from there, the precision
the first stage searches them in), the catalogue records, and the first stage's own structure (PQ:
``N * M / 2`` bytes of codes, re-scored against the pooled embeddings above; IVF: ``N * D * 4``).
The second stage's frame features, masks and stored frame weights stay in the shard files,
memory-mapped (:class:`~diffusionret.index.frame_store.MappedFrames`): a query reads the ~100 rows it
re-scores. At 1M ViT-B/32 segments (T = 12) that is about 1 KB of pooled embedding + 128 B of PQ
codes + the record per row in RAM, against ~12 KB of mapped frames (BENCHMARKS.md, "Archive scale").

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
from typing import Any, Literal, NoReturn

import torch
from torch import Tensor

from diffusionret.index import catalog
from diffusionret.index.catalog import VideoRecord
from diffusionret.index.first_stage import (
    ANN_KINDS,
    LARGE_INDEX_VIDEOS,
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
from diffusionret.index.frame_store import FrameStore, InMemoryFrames, MappedFrames
from diffusionret.index.shards import SHARD_DIR

logger = logging.getLogger(__name__)

__all__ = ["IndexInfo", "VideoIndex", "exact_topk", "index_fingerprint"]

PooledPrecision = Literal["auto", "float32", "float16"]


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
    """A loaded index: pooled embeddings for the first stage, per-row features for the second, metadata.

    Use :meth:`load` (:func:`diffusionret.index.builder.build_index` / ``update_index`` write one).
    The constructor assembles an index from in-RAM tensors (tests, benchmarks); :meth:`load` maps
    the frame features from the shards instead (:attr:`frame_store`).

    Attributes:
        root: index folder.
        info: recorded settings and model identity.
        records: one :class:`VideoRecord` per row, sorted by path.
        pooled: (N, D) unit-norm first-stage embeddings, float32 (or float16 for a large loaded index).
        frame_store: the per-row second-stage features (:meth:`gather`, :meth:`gather_weights`).
        first_stage: what :meth:`search` uses (set by :meth:`configure_first_stage`; chosen with
            the default :class:`~diffusionret.index.first_stage.FirstStageConfig` on first use).
    """

    def __init__(self, root: Path, info: IndexInfo, records: list[VideoRecord], frames: Tensor,
                 frame_mask: Tensor, pooled: Tensor, *, frame_weights: Tensor | None = None,
                 weights_known: Tensor | None = None) -> None:
        """An index over in-RAM tensors.

        Args:
            frames: (N, T, D) float16 frame features after the temporal module.
            frame_mask: (N, T) bool, True for real frames.
            pooled: (N, D) float32 (or float16) unit-norm first-stage embeddings.
            frame_weights: (N, T) float32 stored WTI frame weights, or ``None``.
            weights_known: (N,) bool, which rows of ``frame_weights`` are stored (an index extended
                after an upgrade may mix shards with and without weights); default: all, when given.
        """
        if frame_weights is not None and weights_known is None:
            weights_known = torch.ones(len(records), dtype=torch.bool)
        if weights_known is not None and not bool(weights_known.any()):
            frame_weights = weights_known = None
        self._setup(root, info, records, InMemoryFrames(frames, frame_mask, frame_weights, weights_known), pooled)

    @classmethod
    def from_frame_store(cls, root: Path, info: IndexInfo, records: list[VideoRecord], frame_store: FrameStore,
                         pooled: Tensor) -> "VideoIndex":
        """An index whose second-stage features come from ``frame_store`` (e.g. memory-mapped shards)."""
        index = cls.__new__(cls)
        index._setup(root, info, records, frame_store, pooled)
        return index

    def _setup(self, root: Path, info: IndexInfo, records: list[VideoRecord], frame_store: FrameStore,
               pooled: Tensor) -> None:
        if len(frame_store) != len(records) or pooled.shape[0] != len(records):
            raise ValueError(f"{len(records)} records, {len(frame_store)} feature rows, {pooled.shape[0]} pooled rows")
        self.root = Path(root)
        self.info = info
        self.records = records
        self.frame_store = frame_store
        self.pooled = pooled
        known = frame_store.weights_known
        self._all_weights = known is not None and bool(known.all())
        self._rows: dict[str, int] = {}
        for row, record in enumerate(records):  # a video indexed in segments: its first segment's row
            self._rows.setdefault(record.id, row)
        self.first_stage: ExactFirstStage | IvfFirstStage | PqFirstStage | None = None
        self._fingerprint: str | None = None
        # ANN indexes by kind, loaded or built once, reused when reconfigured.
        self._ann: dict[str, IvfFirstStage | PqFirstStage] = {}
        self._pooled_half: Tensor | None = None
        self._pooled_full: Tensor | None = None

    # Whole-index views of the second-stage features, for tests and small tools: on a loaded
    # index each reads every row from the shards into RAM (the search path uses gather).
    @property
    def frames(self) -> Tensor:
        """(N, T, D) float16 frame features of every row (read into RAM when memory-mapped)."""
        if isinstance(self.frame_store, InMemoryFrames):
            return self.frame_store.frames
        return self.frame_store.stored(torch.arange(len(self)))[0]

    @property
    def frame_mask(self) -> Tensor:
        """(N, T) bool, True for real frames."""
        if isinstance(self.frame_store, InMemoryFrames):
            return self.frame_store.frame_mask
        return self.frame_store.stored(torch.arange(len(self)))[1]

    @property
    def frame_weights(self) -> Tensor | None:
        """(N, T) float32 stored WTI frame weights (zeros where unknown), or ``None`` when no row has them."""
        if isinstance(self.frame_store, InMemoryFrames):
            return self.frame_store.frame_weights
        stored = self.frame_store.stored_weights(torch.arange(len(self)))
        return None if stored is None else stored[0]

    @property
    def weights_known(self) -> Tensor | None:
        """(N,) bool, which rows have stored frame weights, or ``None`` when none has."""
        return self.frame_store.weights_known

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
    def load(cls, root: str | os.PathLike, *, model_id: str | None = None,
             pooled_precision: PooledPrecision = "auto") -> "VideoIndex":
        """Open the index at ``root``: pooled embeddings and catalogue into RAM, frame features mapped.

        Every shard's header is checked against the catalogue (tensor dtypes and shapes, byte
        ranges, file size) before it is mapped, so a damaged or truncated shard is an error here,
        naming the file, rather than a crash (SIGBUS) at the first query touching it.

        Args:
            root: index folder.
            model_id: when given, the identity of the model that will query the index.
            pooled_precision: RAM copy of the pooled embeddings: ``float32``, ``float16`` (half
                the memory; the first stage then ranks the stored fp16 vectors exactly, as
                ``precision=float16`` does), or ``auto``: fp16 from
                :data:`~diffusionret.index.first_stage.LARGE_INDEX_VIDEOS` rows, where the
                first stage's ``auto`` precision searches fp16 anyway.

        Raises:
            FileNotFoundError: no index at ``root``.
            ModelMismatchError: ``model_id`` is not the model that built the index.
            ShardFormatError: a shard does not match the catalogue or is truncated.
        """
        if pooled_precision not in ("auto", "float32", "float16"):
            raise ValueError(f"pooled_precision must be auto, float32 or float16, got {pooled_precision!r}")
        root = Path(root)
        info = cls.read_info(root)
        if model_id is not None and model_id != info.model_id:
            raise ModelMismatchError(
                f"{root} was built by model {info.model_id[:12]} ({info.model_path}); refusing to query it "
                f"with model {model_id[:12]}: its features live in another embedding space"
            )
        # A concurrent `index update` may retire a shard between reading the catalogue and the file.
        # Once mapped, it may not: an unlinked or replaced file lives on while this process maps it.
        for attempt in range(3):
            try:
                return cls._load_once(root, info, pooled_precision)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                logger.info("index changed while loading; retrying")
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, root: Path, info: IndexInfo, pooled_precision: PooledPrecision) -> "VideoIndex":
        with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
            sizes = catalog.shard_sizes(conn)
            records = _registered_only(root, catalog.list_rows(conn), set(sizes))
        n, t, d = len(records), info.num_frames, info.embed_dim
        store = MappedFrames.open(root / SHARD_DIR, [(r.shard, r.row) for r in records], sizes,
                                  num_frames=t, embed_dim=d)
        half = pooled_precision == "float16" or (pooled_precision == "auto" and n >= LARGE_INDEX_VIDEOS)
        pooled = store.read_pooled(torch.float16 if half else torch.float32)
        known = store.weights_known
        logger.info("loaded index %s: %d rows, %d frames x %d dims memory-mapped from %d shards, pooled %s in "
                    "memory, stored frame weights for %d", root, n, t, d, len(store.shards),
                    str(pooled.dtype).removeprefix("torch."), 0 if known is None else int(known.sum()))
        return cls.from_frame_store(root, info, records, store, pooled)

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
        """Features of selected rows for the second stage (read from the shard maps of a loaded index).

        Args:
            rows: (n,) long row indices.

        Returns:
            ``frames`` (n, T, D) float32 and ``frame_mask`` (n, T) long (0/1, the mask type the model uses).
        """
        frames, mask = self.frame_store.stored(rows)
        return frames.float(), mask.long()

    def gather_weights(self, rows: Tensor) -> Tensor | None:
        """Stored WTI frame weights of selected rows, (n, T) float32, or ``None`` unless every row has them."""
        known = self.frame_store.weights_known
        if known is None:
            return None
        if not self._all_weights and not bool(known[rows].all()):
            return None
        stored = self.frame_store.stored_weights(rows)
        return None if stored is None else stored[0]

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
            stage = ExactFirstStage(self._pooled_as(torch.float16 if half else torch.float32))
        logger.info("first stage: %s", stage.describe())
        return stage

    def _pooled_as(self, dtype: torch.dtype) -> Tensor:
        """The pooled embeddings in ``dtype``: :attr:`pooled`, or a copy made once (float32 from the shards)."""
        if self.pooled.dtype == dtype:
            return self.pooled
        if dtype == torch.float16:
            if self._pooled_half is None:
                self._pooled_half = self.pooled.half()
            return self._pooled_half
        if self._pooled_full is None:
            if isinstance(self.frame_store, MappedFrames):  # the shards keep the float32 originals
                logger.info("reading float32 pooled embeddings of %d rows for an exact float32 first stage", len(self))
                self._pooled_full = self.frame_store.read_pooled(torch.float32)
            else:
                self._pooled_full = self.pooled.float()
        return self._pooled_full

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
