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

Writing goes through :func:`diffusionret.index.builder.sync_index`; :meth:`VideoIndex.build` and
:meth:`VideoIndex.update` are its two entry points.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffusionret.index import catalog
from diffusionret.index.builder import (
    IvfBuildConfig,
    SyncReport,
    exclusive_lock,
    index_fingerprint,
    sync_index,
)
from diffusionret.index.catalog import VideoRecord
from diffusionret.index.discover import discover_videos
from diffusionret.index.features import FeatureExtractor
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
    remove_stale_ivf,
)
from diffusionret.index.identity import ModelMismatchError
from diffusionret.index.shards import SHARD_DIR, read_shard_rows, read_shard_weights

logger = logging.getLogger(__name__)

__all__ = ["IndexInfo", "VideoIndex", "exact_topk"]


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

    @classmethod
    def from_catalog(cls, values: dict[str, Any]) -> "IndexInfo":
        return cls(
            model_id=values["model_id"], model_config=values.get("model_config", {}),
            model_path=values.get("model_path"), settings=values.get("settings", {}),
            num_frames=int(values["num_frames"]), embed_dim=int(values["embed_dim"]),
            sources=list(values.get("sources", [])), video_root=values.get("video_root"),
            created_at=values.get("created_at"),
            updated_at=values.get("updated_at"),
        )


class VideoIndex:
    """A loaded index: per-video features, metadata and an exact first-stage search.

    Use :meth:`load` (or :meth:`build` / :meth:`update` to write one).

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
        self._rows = {record.id: row for row, record in enumerate(records)}
        self.first_stage: ExactFirstStage | IvfFirstStage | PqFirstStage | None = None
        self._fingerprint: str | None = None
        # ANN indexes by kind, loaded or built once, reused when reconfigured.
        self._ann: dict[str, IvfFirstStage | PqFirstStage] = {}
        self._pooled_half: Tensor | None = None

    # ----------------------------------------------------------------------------------- writing
    @staticmethod
    def build(
        root: str | os.PathLike,
        videos: str | os.PathLike | Sequence[str | os.PathLike],
        extractor: FeatureExtractor,
        *,
        video_root: str | os.PathLike | None = None,
        shard_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        progress: bool = True,
        ivf: IvfBuildConfig | None = None,
    ) -> SyncReport:
        """Create (or resume building) an index of the videos found in ``videos``.

        Re-running a killed build with the same arguments resumes it: shards that were written
        completely are kept, nothing is encoded twice.

        Args:
            root: index folder.
            videos: folder(s) scanned recursively, ``.txt``/``.csv`` lists, or video files.
            extractor: decoder + model (e.g. :class:`~diffusionret.index.encode.ModelVideoEncoder`).
            video_root: folder that relative paths in list files refer to (default: the list's folder).
            shard_size: videos per atomically written shard.
            rank, world_size, barrier: torchrun sharding (each rank encodes ``pending[rank::world_size]``).
            progress: show a progress bar.
            ivf: whether to write an IVF first-stage file (default: for indexes of 100k+ videos
                when FAISS is installed; see :class:`~diffusionret.index.builder.IvfBuildConfig`).

        Raises:
            ModelMismatchError: ``root`` already holds an index built by another model.
            FileNotFoundError: the sources hold no video.
            AnnUnavailableError: ``ivf.mode == "on"`` without FAISS.
        """
        sources = _source_list(videos)
        root_dir = str(Path(video_root).expanduser().resolve()) if video_root is not None else None
        return sync_index(root, _discover_some(sources, root_dir), extractor, sources=sources, video_root=root_dir,
                          create=True, shard_size=shard_size, rank=rank, world_size=world_size, barrier=barrier,
                          progress=progress, ivf=ivf)

    @staticmethod
    def update(
        root: str | os.PathLike,
        extractor: FeatureExtractor,
        videos: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        video_root: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> SyncReport:
        """Bring an existing index up to date: encode new and changed files, drop deleted ones.

        Args:
            root: index folder.
            extractor: must carry the model that built the index.
            videos: sources to scan; default: the sources recorded at build time.
            video_root: folder for relative paths in list files; default: the recorded one.
            **kwargs: as for :meth:`build` (``shard_size``, ``rank``, ``ivf``, ...).

        Raises:
            FileNotFoundError: no index at ``root``, or the sources hold no video (an unmounted
                disk must not empty the index).
        """
        info = VideoIndex.read_info(root)
        sources = _source_list(videos) if videos is not None else info.sources
        if not sources:
            raise ValueError(f"{root}: no video sources recorded; pass the videos to scan")
        if video_root is not None:
            video_root = str(Path(video_root).expanduser().resolve())
        elif videos is None:
            video_root = info.video_root
        return sync_index(root, _discover_some(sources, video_root), extractor, sources=sources,
                          video_root=video_root, create=False, **kwargs)

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
            records = catalog.list_records(conn)
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
        """:func:`~diffusionret.index.first_stage.content_fingerprint` of the loaded rows (names the IVF file)."""
        if self._fingerprint is None:
            rows = [(r.id, r.shard, r.row) for r in self.records]
            self._fingerprint = content_fingerprint(self.info.model_id, self.info.embed_dim, rows)
        return self._fingerprint

    def configure_first_stage(self, config: FirstStageConfig | None = None, *,
                              ivf: IvfFirstStage | PqFirstStage | None = None,
                              save: bool = True) -> ExactFirstStage | IvfFirstStage | PqFirstStage:
        """Choose what :meth:`search` uses (see :class:`~diffusionret.index.first_stage.FirstStageConfig`).

        With ``method="ivf"`` or ``"pq"`` and no up-to-date file of that kind, the ANN index is
        built in memory (per million videos at 1 thread: IVF about 30 s, PQ about 15 s) and, when ``save``
        and no build or update holds the index, written to the index folder for the next load.

        Args:
            config: the policy (default: ``auto``).
            ivf: an already built ANN index (IVF or PQ) over these rows (its fingerprint must match).
            save: allow writing a newly built ANN file.

        Raises:
            AnnUnavailableError: ``method`` ``ivf`` or ``pq`` without FAISS.
            ValueError: ``ivf`` covers other rows.
        """
        config = config or FirstStageConfig()
        large = len(self) >= config.large_index
        stage: ExactFirstStage | IvfFirstStage | PqFirstStage | None = None
        if ivf is not None:
            if ivf.fingerprint != self.content_fingerprint:
                raise ValueError("the ANN index covers other rows than this index holds")
            self._ann[ivf.name] = ivf
        if len(self) > 0 and config.method in ANN_KINDS:
            stage = self._open_ann(config.method, config, build=True, save=save)
        elif len(self) > 0 and config.method == "auto" and large:
            if not self._faiss_installed():
                logger.info("FAISS is not installed: exact first stage over %d videos", len(self))
            else:
                for kind in ANN_KINDS:  # the best available up-to-date file
                    stage = self._open_ann(kind, config, build=False, save=save)
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
        self.first_stage = stage
        logger.info("first stage: %s", stage.describe())
        return stage

    @staticmethod
    def _faiss_installed() -> bool:
        try:
            import_faiss()
        except AnnUnavailableError:
            return False
        return True

    def _open_ann(self, kind: str, config: FirstStageConfig, *, build: bool,
                  save: bool) -> IvfFirstStage | PqFirstStage | None:
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
                logger.warning("building the %s first stage for %d videos in memory", kind.upper(), len(self))
                stage = (PqFirstStage.build(self.pooled, fingerprint) if kind == "pq"
                         else IvfFirstStage.build(self.pooled, fingerprint))
                if save:
                    self._save_ivf(stage)
            self._ann[kind] = stage
        if isinstance(stage, PqFirstStage):
            stage.rescore = config.rescore
        else:
            stage.nprobe = config.nprobe
        return stage

    def _save_ivf(self, stage: IvfFirstStage | PqFirstStage) -> None:
        """Write a freshly built ANN file, unless the index changed or a writer holds it (best effort)."""
        try:
            with exclusive_lock(self.root, create=False), \
                    contextlib.closing(catalog.connect(self.root, readonly=True)) as conn:
                if index_fingerprint(conn)[0] != stage.fingerprint:
                    logger.info("the index changed since it was loaded; not saving its ANN file")
                    return
                path = stage.save(self.root)
                remove_stale_ivf(self.root, stage.fingerprint)
                logger.info("wrote %s", path)
        except (OSError, RuntimeError) as exc:  # read-only folder, a build in progress, ...
            logger.warning("could not save the ANN file in %s: %s", self.root, exc)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` maximum-inner-product search over the pooled embeddings (exact, IVF or PQ: see :attr:`first_stage`).

        Args:
            queries: (Nq, D) query embeddings (normalise them for cosine scores).
            k: results per query (clipped to the index size).

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
        stage = self.first_stage or self.configure_first_stage()
        return stage.search(queries, k)


def _discover_some(sources: Sequence[str], video_root: str | None) -> list[Path]:
    videos = discover_videos(sources, video_root)
    if not videos:
        raise FileNotFoundError(f"no videos found in {', '.join(sources)}")
    return videos


def _source_list(videos: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    items = [videos] if isinstance(videos, (str, os.PathLike)) else list(videos)
    return [str(Path(item).expanduser().resolve()) for item in items]
