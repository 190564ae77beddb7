"""Build, resume and update an on-disk index (the writing side of :class:`~diffusionret.index.store.VideoIndex`).

:func:`build_index` and :func:`update_index` are the entry points; both find the videos and call
one routine, :func:`sync_index`, which makes the index match a list of video files:

1. (rank 0) open the catalogue under an exclusive lock, check the model, recover from a killed run:
   delete partial ``.tmp`` files and register complete shards that never got registered;
2. plan: files that are new, changed (size or mtime) or gone; unchanged files and unchanged
   files that failed to decode before are skipped;
3. every rank encodes its slice of the pending files in shards of ``shard_size`` videos, each written
   atomically; rank 0 registers each of its own shards at once, so a killed build resumes after
   the last complete shard;
4. (rank 0) register the other ranks' shards (the merge), drop deleted files, compact shards
   left with dead rows, record the update time, and bring the ANN (PQ or IVF) first-stage file up
   to date (:func:`~diffusionret.index.ann_build.refresh_ann`: built for large indexes, stale ones
   deleted);
5. (rank 0) replace the commit marker (:func:`write_commit_marker`): the one signal that a run
   finished, which ``serve`` waits for before reloading.

The read side (:mod:`~diffusionret.index.store`, :mod:`~diffusionret.index.first_stage`) never
writes; every file of an index, ANN files included, is written here under the writer lock.

Because a shard is self-contained and registration is one SQLite transaction, any kill leaves an
index that is consistent and that the next run completes without duplicates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

import diffusionret
from diffusionret.config_utils import atomic_write_text
from diffusionret.index import catalog
from diffusionret.index.ann_build import AnnBuildConfig, refresh_ann
from diffusionret.index.catalog import VideoRecord, video_id
from diffusionret.index.discover import FileState, discover_videos
from diffusionret.index.features import (
    ExtractionFailure,
    FeatureExtractor,
    SegmentedFeatures,
    VideoFeatures,
    extractor_frame_weights,
    pool_frames,
    stack_features,
)
from diffusionret.index.first_stage import ann_files, import_faiss
from diffusionret.index.identity import ModelMismatchError
from diffusionret.index.segments import SegmentConfig
from diffusionret.index.shards import (
    SHARD_DIR,
    SHARD_SUFFIX,
    ShardContents,
    ShardEntry,
    ShardFailure,
    new_shard_name,
    read_shard_metadata,
    read_shard_rows,
    read_shard_weights,
    write_shard,
)
from diffusionret.index.store import VideoIndex, index_fingerprint

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
PLAN_NAME = ".plan.json"  # rank 0's plan, read by the other ranks of a torchrun build


# An update may drop at most this many videos, or this fraction of the index, without ``prune``:
# losing a whole collection to a typo in --videos or an unmounted disk must take an explicit --prune.
PRUNE_FREE_VIDEOS = 5
PRUNE_FREE_FRACTION = 0.10
# How many of the paths that would be removed a refusal names.
_SHOWN_PATHS = 5


class IndexLockedError(RuntimeError):
    """Another process is building or updating the same index."""


class PruneRefusedError(RuntimeError):
    """A build or update would remove much of the index; it needs ``prune=True`` (``--prune``).

    Attributes:
        paths: every indexed video that would have been removed.
    """

    def __init__(self, message: str, paths: Sequence[str]) -> None:
        super().__init__(message)
        self.paths = list(paths)


@dataclass
class SyncReport:
    """What a build or update did (rank 0 has the complete picture; other ranks count their own work).

    Attributes:
        discovered: video files in the sources.
        added: new files encoded.
        replaced: changed files re-encoded.
        removed: files dropped because they left the sources.
        failed: files that failed to decode in this run (a changed file that no longer decodes
            also loses its old entry).
        unchanged: files already indexed with the same size and mtime.
        shards_written: shard files this process wrote.
        total: videos in the index afterwards (rank 0 only).
        failures: ``(path, error)`` of the files that failed in this run.
    """

    discovered: int = 0
    added: int = 0
    replaced: int = 0
    removed: int = 0
    failed: int = 0
    unchanged: int = 0
    shards_written: int = 0
    total: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    pending: list[tuple[str, FileState]]  # files to encode, sorted by path
    replaced: set[str]
    gone: list[str]
    unchanged: int
    segments: dict[str, Any] = field(default_factory=lambda: dict(WHOLE_SEGMENTS))  # how pending files are cut

    def to_json(self) -> dict[str, Any]:
        return {"pending": [[p, s.size, s.mtime_ns] for p, s in self.pending], "replaced": sorted(self.replaced),
                "gone": self.gone, "unchanged": self.unchanged, "segments": self.segments}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "_Plan":
        return cls(pending=[(p, FileState(size, mtime)) for p, size, mtime in data["pending"]],
                   replaced=set(data["replaced"]), gone=list(data["gone"]), unchanged=int(data["unchanged"]),
                   segments=dict(data.get("segments") or WHOLE_SEGMENTS))


def build_index(
    root: str | os.PathLike,
    videos: str | os.PathLike | Sequence[str | os.PathLike],
    extractor: FeatureExtractor,
    *,
    video_root: str | os.PathLike | None = None,
    shard_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    agree: Callable[[bool], bool] | None = None,
    progress: bool = True,
    ann: AnnBuildConfig | None = None,
    prune: bool = False,
    retry_failed: bool = False,
    segments: SegmentConfig | None = None,
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
        rank, world_size, agree: torchrun sharding (each rank encodes ``pending[rank::world_size]``; see
            :func:`sync_index`).
        progress: show a progress bar.
        ann: whether to write an ANN (PQ or IVF) first-stage file (default: for indexes of 100k+
            videos when FAISS is installed; see :class:`AnnBuildConfig`).
        prune: allow dropping many indexed videos (an existing index built from other sources).
        retry_failed: decode again files that failed before.
        segments: how videos are cut into segments (default ``whole``; see :func:`check_segments`).

    Raises:
        ModelMismatchError: ``root`` already holds an index built by another model.
        FileNotFoundError: a source holds no video (without ``prune``).
        PruneRefusedError: ``root`` holds many videos the sources no longer have (without ``prune``).
        AnnUnavailableError: ``ann.mode == "on"`` without FAISS.
    """
    sources = _source_list(videos)
    root_dir = str(Path(video_root).expanduser().resolve()) if video_root is not None else None
    return sync_index(root, _discover_some(sources, root_dir, prune), extractor, sources=sources,
                      video_root=root_dir, create=True, shard_size=shard_size, rank=rank, world_size=world_size,
                      agree=agree, progress=progress, ann=ann, prune=prune, retry_failed=retry_failed,
                      segments=segments)


def update_index(
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
        **kwargs: as for :func:`build_index` (``shard_size``, ``rank``, ``ann``, ``prune``, ``retry_failed``, ...).

    Raises:
        FileNotFoundError: no index at ``root``, or a source holds no video (an unmounted
            disk must not empty the index; ``prune`` accepts it).
        PruneRefusedError: the update would remove many videos (without ``prune``).
    """
    info = VideoIndex.read_info(root)
    sources = _source_list(videos) if videos is not None else info.sources
    if not sources:
        raise ValueError(f"{root}: no video sources recorded; pass the videos to scan")
    if video_root is not None:
        video_root = str(Path(video_root).expanduser().resolve())
    elif videos is None:
        video_root = info.video_root
    return sync_index(root, _discover_some(sources, video_root, bool(kwargs.get("prune"))), extractor,
                      sources=sources, video_root=video_root, create=False, **kwargs)


def _discover_some(sources: Sequence[str], video_root: str | None, prune: bool = False) -> list[Path]:
    """The videos of every source; each source on its own must hold some (an unmounted disk is an
    empty folder) unless ``prune`` accepts that its videos leave the index."""
    found: set[Path] = set()
    empty = []
    for source in sources:
        videos = discover_videos([source], video_root)
        if not videos:
            empty.append(source)
        found.update(videos)
    if empty and (not prune or not found):
        raise FileNotFoundError(
            f"no videos found in {', '.join(empty)} (an empty folder or an unmounted disk?)"
            + ("; pass --prune to drop the videos indexed from it" if found else ""))
    return sorted(found)


def _source_list(videos: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    items = [videos] if isinstance(videos, (str, os.PathLike)) else list(videos)
    return [str(Path(item).expanduser().resolve()) for item in items]


def sync_index(
    root: str | os.PathLike,
    videos: Sequence[Path],
    extractor: FeatureExtractor,
    *,
    sources: Sequence[str] | None = None,
    video_root: str | None = None,
    create: bool = True,
    shard_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    agree: Callable[[bool], bool] | None = None,
    progress: bool = True,
    ann: AnnBuildConfig | None = None,
    prune: bool = False,
    retry_failed: bool = False,
    segments: SegmentConfig | None = None,
) -> SyncReport:
    """Make the index at ``root`` hold exactly ``videos``, encoding only what is new or changed.

    Args:
        root: index folder (created when ``create``).
        videos: absolute paths of the collection (see :func:`~diffusionret.index.discover.discover_videos`);
            rank 0's list is the one that counts (it plans, the other ranks follow its plan).
        extractor: decodes and encodes videos; its model must be the one that built the index.
        sources: the folders/lists the videos came from, recorded so that ``index update`` can
            re-scan them.
        video_root: folder for relative paths in list sources (recorded with ``sources``).
        create: allow creating a new index (``index build``); ``False`` requires an existing one.
        shard_size: videos per shard file (the unit of atomic progress).
        rank, world_size: this process's place in a torchrun job.
        agree: synchronises the ranks (required when ``world_size > 1``): every rank calls
            ``agree(failed)`` at the same points, and it returns on all of them whether any rank
            failed, so that a failure on one rank ends the job on all (a plain barrier would leave
            the others waiting for the failed one until the process group's timeout).
        progress: show a tqdm bar (rank 0).
        ann: whether to keep an ANN first-stage file (default :class:`AnnBuildConfig`: for large indexes).
        prune: allow removing more than a few videos (see :data:`PRUNE_FREE_FRACTION`) or every
            video under a recorded source.
        retry_failed: decode again the files that failed before even when they did not change.
        segments: how videos are cut into segments; ``None`` keeps what the index records (``whole``
            for a new index or one built before segments existed). Checked before any work.

    Returns:
        A :class:`SyncReport`.

    Raises:
        ModelMismatchError: the index was built by another model or with other decoding settings.
        SegmentsError: ``segments`` differs from the segmentation the index records, has no window
            to use, or needs segments the extractor cannot encode (no ``extract_segments``).
        IndexLockedError: another process holds the index.
        FileNotFoundError: ``create`` is false and there is no index.
        AnnUnavailableError: ``ann.mode == "on"`` and FAISS is not installed (checked before any work).
        PruneRefusedError: without ``prune``, the run would remove more than a few videos or a
            whole source (nothing is changed, the recorded sources included).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    ann = ann or AnnBuildConfig()
    if ann.mode == "on" and rank == 0:
        import_faiss()
    if world_size > 1 and agree is None:
        raise ValueError("a multi-rank build needs an agreement function (agree)")
    wanted_segments = check_segments(segments, extractor.settings)
    if wanted_segments is not None and wanted_segments["mode"] != "whole" and \
            getattr(extractor, "extract_segments", None) is None:
        raise SegmentsError(f"--segments {wanted_segments['mode']} needs an extractor that encodes segments; "
                            f"{type(extractor).__name__} encodes whole videos only")
    agree = agree or (lambda failed: failed)
    root = Path(root)
    report = SyncReport(discovered=len(videos))
    with contextlib.ExitStack() as stack:
        conn: sqlite3.Connection | None = None
        with _agreed(agree, "planning the build"):
            if rank == 0:
                stack.enter_context(exclusive_lock(root, create))
                conn = stack.enter_context(contextlib.closing(catalog.connect(root)))
                clean_stale_temp_files(root)
                _init_or_check(conn, extractor, sources, video_root, create, wanted_segments)
                _recover(conn, root, extractor.identity.model_id)
                plan = _plan(conn, videos, retry_failed=retry_failed)
                plan = dataclasses.replace(plan, segments=recorded_segments(catalog.read_info(conn)))
                if not prune:
                    check_removals(conn, plan.gone)
                _record_sources(conn, sources, video_root)
                if world_size > 1:
                    # One plan for every rank: ranks planning on their own could see different catalogue
                    # states (rank 0 registers shards as it goes) or file states, and slice differently.
                    atomic_write_text(root / PLAN_NAME, json.dumps(plan.to_json()))
                report.removed = catalog.remove_paths(conn, plan.gone)
        with _agreed(agree, "encoding"):
            if rank != 0:
                plan = _Plan.from_json(json.loads((root / PLAN_NAME).read_text()))
            report.unchanged = plan.unchanged
            mine = plan.pending[rank::world_size]
            _encode_all(root, mine, plan.replaced, extractor, shard_size, rank, conn, report, progress,
                        _segment_config(plan.segments))
        with _agreed(agree, "committing the index"):
            if conn is not None:
                _recover(conn, root, extractor.identity.model_id)  # merge the other ranks' shards
                _compact(conn, root, shard_size, extractor)
                catalog.write_info(conn, {"updated_at": time.time()})
                refresh_ann(conn, root, ann)
                _count_outcomes(conn, plan, report)
                (root / PLAN_NAME).unlink(missing_ok=True)
                write_commit_marker(conn, root)  # last: the ANN file and every catalogue write come before
    logger.info(
        "index %s: %d added, %d replaced, %d removed, %d failed, %d unchanged; %d videos",
        root, report.added, report.replaced, report.removed, report.failed, report.unchanged, report.total,
    )
    return report


class OtherRankFailedError(RuntimeError):
    """Another rank of a multi-rank build failed (its own error is in its log); this one stopped too."""


@contextlib.contextmanager
def _agreed(agree: Callable[[bool], bool], step: str) -> Iterator[None]:
    """Run a step of a multi-rank build, then agree with the other ranks on whether any failed.

    This rank's own exception is raised after the agreement (so every rank reaches it); when only
    another rank failed, :class:`OtherRankFailedError` is raised here.
    """
    try:
        yield
    except Exception:
        agree(True)
        raise
    if agree(False):
        raise OtherRankFailedError(f"another rank failed while {step}; see its error")


def write_commit_marker(conn: sqlite3.Connection, root: Path) -> dict[str, Any]:
    """Replace the index's commit marker (see :func:`~diffusionret.index.catalog.read_commit_marker`)
    when the committed contents or ANN files changed; returns the marker now on disk."""
    fingerprint, _ = index_fingerprint(conn)
    ann = sorted(p.name for p in ann_files(root))
    current = catalog.read_commit_marker(root) or {}
    if current.get("fingerprint") == fingerprint and current.get("ann") == ann:
        return current
    marker = {"generation": int(current.get("generation", 0)) + 1, "fingerprint": fingerprint, "ann": ann,
              "videos": catalog.count_videos(conn), "committed_at": time.time()}
    atomic_write_text(root / catalog.COMMIT_NAME, json.dumps(marker, sort_keys=True))
    return marker


def _count_outcomes(conn: sqlite3.Connection, plan: _Plan, report: SyncReport) -> None:
    """Rank 0's report covers every rank: the outcome of each planned file is in the catalogue."""
    indexed = catalog.file_states(conn)
    failed = catalog.failure_states(conn)
    errors = catalog.failure_errors(conn)
    report.added = report.replaced = report.failed = 0
    report.failures = []
    for path, state in plan.pending:
        key = (state.size, state.mtime_ns)
        if indexed.get(path) == key:
            if path in plan.replaced:
                report.replaced += 1
            else:
                report.added += 1
        elif failed.get(path) == key:
            report.failed += 1
            report.failures.append((path, errors.get(path, "")))
    report.total = catalog.count_videos(conn)


@contextlib.contextmanager
def exclusive_lock(root: Path, create: bool) -> Iterator[None]:
    """Hold the index's writer lock (non-blocking: :class:`IndexLockedError` when another process has it).

    Raises:
        FileNotFoundError: ``create`` is false and there is no index at ``root``.
    """
    if not create and not (root / catalog.CATALOG_NAME).is_file():
        raise FileNotFoundError(f"no index at {root}; create one with `diffusionret index build`")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a+") as handle:
        try:
            # flock is released by the kernel when the process dies, so a killed build never leaves
            # a stale lock behind.
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise IndexLockedError(f"{root} is being built or updated by another process") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _init_or_check(
    conn: sqlite3.Connection, extractor: FeatureExtractor, sources: Sequence[str] | None, video_root: str | None,
    create: bool, segments: dict[str, Any] | None = None,
) -> None:
    info = catalog.read_info(conn)
    identity = extractor.identity
    if not info:
        if not create:
            raise FileNotFoundError("the index catalogue is empty; create it with `diffusionret index build`")
        catalog.write_info(conn, {
            "format_version": catalog.FORMAT_VERSION,
            "model_id": identity.model_id,
            "model_config": identity.config,
            "model_path": identity.path,
            "settings": extractor.settings,
            "num_frames": extractor.num_frames,
            "embed_dim": extractor.embed_dim,
            "sources": list(sources or []),
            "video_root": video_root,
            "segments": segments or WHOLE_SEGMENTS,
            "created_at": time.time(),
            "diffusionret_version": diffusionret.__version__,
        })
        return
    if info.get("format_version") != catalog.FORMAT_VERSION:
        raise ValueError(f"index format {info.get('format_version')} is not supported "
                         f"(expected {catalog.FORMAT_VERSION})")
    if info["model_id"] != identity.model_id:
        raise ModelMismatchError(
            f"the index was built by model {info['model_id'][:12]} ({info.get('model_path')}); "
            f"this model is {identity.model_id[:12]} ({identity.path}). Build a new index for it."
        )
    if info["settings"] != extractor.settings:
        raise ModelMismatchError(f"the index was built with settings {info['settings']}, not {extractor.settings}")
    recorded = recorded_segments(info)
    if segments is not None and segments != recorded:
        # Mixing segmentations would make scores of one video's rows incomparable with another's, and
        # an update only encodes new or changed files: re-segmenting the index takes a new build.
        raise SegmentsError(
            f"the index was built with segments {_describe_segments(recorded)}, not {_describe_segments(segments)}; "
            "build a new index to change how videos are segmented")
    if identity.path:  # the same weights may have moved; remember where to load them from
        catalog.write_info(conn, {"model_path": identity.path})


WHOLE_SEGMENTS: dict[str, Any] = {"mode": "whole"}


class SegmentsError(ValueError):
    """A segmentation the index cannot take: another one than it was built with, a windowed mode
    with no window to use, or one the extractor cannot encode."""


def trained_span(settings: dict[str, Any]) -> float | None:
    """Seconds of video one clip of the model covers (``max_frames / fps`` of the decoding settings),
    or ``None`` when the settings do not say (extractors without a frame rate)."""
    frames, fps = settings.get("max_frames"), settings.get("fps")
    if not frames or not fps:
        return None
    return float(frames) / float(fps)


def check_segments(config: SegmentConfig | None, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The segmentation to record for ``config``, resolved against the model's trained span.

    Args:
        config: the requested segmentation, or ``None`` (keep what the index records).
        settings: the extractor's decoding settings (``max_frames``, ``fps``).

    Returns:
        ``None`` for ``None``; ``{"mode": "whole"}`` for ``whole`` (window and stride mean nothing
        there); else the resolved config as a dict.

    Raises:
        SegmentsError: a windowed mode without a window and without a frame rate to derive it from.
        ShotDetectionUnavailableError: ``shots`` without PySceneDetect.
    """
    if config is None:
        return None
    if config.mode == "whole":
        return dict(WHOLE_SEGMENTS)
    span = trained_span(settings)
    if span is None and config.window is None:
        raise SegmentsError(f"--segments {config.mode} needs --window: the extractor's settings {settings} "
                         "give no frame rate to derive it from")
    resolved = config.resolved(span if span is not None else float(config.window))  # type: ignore[arg-type]
    if resolved.mode == "shots":
        from diffusionret.index.shots import require_scenedetect

        require_scenedetect()  # before any work, not once per file
    return resolved.to_dict()


def _segment_config(segments: dict[str, Any]) -> SegmentConfig | None:
    """The recorded segmentation as a config for the extractor (``None``: whole videos, :meth:`extract`)."""
    if segments.get("mode", "whole") == "whole":
        return None
    return SegmentConfig(**segments)


def recorded_segments(info: dict[str, Any]) -> dict[str, Any]:
    """The segmentation an index records; an index built before segments existed is ``whole``."""
    return dict(info.get("segments") or WHOLE_SEGMENTS)


def _describe_segments(segments: dict[str, Any]) -> str:
    if segments.get("mode") == "whole":
        return "whole"
    return f"{segments['mode']} (window {segments['window']:g} s, stride {segments['stride']:g} s)"


def _record_sources(conn: sqlite3.Connection, sources: Sequence[str] | None, video_root: str | None) -> None:
    """Remember the sources for the next ``index update`` (only once the run is allowed to go ahead)."""
    if sources:
        catalog.write_info(conn, {"sources": list(sources), "video_root": video_root})


def check_removals(conn: sqlite3.Connection, gone: Sequence[str]) -> None:
    """Refuse to drop more than a few videos, or every video under one recorded source, without ``prune``.

    Raises:
        PruneRefusedError: naming how many videos would go and a few of their paths.
    """
    indexed = catalog.file_states(conn)
    removed = sorted(p for p in gone if p in indexed)
    if not removed:
        return
    reason = None
    if len(removed) > max(PRUNE_FREE_VIDEOS, PRUNE_FREE_FRACTION * len(indexed)):
        reason = f"{len(removed)} of its {len(indexed)} videos are no longer in the sources"
    else:
        gone_set = set(removed)
        for source in catalog.read_info(conn).get("sources") or []:
            under = [p for p in indexed if _is_under(p, source)]
            if under and all(p in gone_set for p in under):
                reason = f"every video under the source {source} ({len(under)}) would be removed"
                break
    if reason is None:
        return
    shown = ", ".join(removed[:_SHOWN_PATHS]) + (", ..." if len(removed) > _SHOWN_PATHS else "")
    raise PruneRefusedError(
        f"refusing to remove {len(removed)} videos from the index: {reason} (e.g. {shown}). "
        "If the sources are right (not a typo, an unmounted disk or an empty folder), run again with --prune.",
        removed,
    )


def _is_under(path: str, source: str) -> bool:
    """Whether an indexed path was found by scanning the folder ``source`` (list sources: never)."""
    if Path(source).suffix.lower() in (".txt", ".csv"):
        return False
    return path == source or path.startswith(source.rstrip(os.sep) + os.sep)


def clean_stale_temp_files(root: Path) -> list[Path]:
    """Delete temporary files a killed writer left in the index folder (caller holds the writer lock).

    Every writer of the folder (builds, updates, ANN saves) holds the lock while its temporary files
    exist, so under the lock any ``.*.tmp`` is left over from a dead process.
    """
    removed = []
    for folder in (root, root / SHARD_DIR):
        if folder.is_dir():
            for partial in folder.glob(".*.tmp"):
                partial.unlink(missing_ok=True)
                removed.append(partial)
    if removed:
        logger.info("deleted %d temporary files left by an interrupted run", len(removed))
    return removed


def _plan(conn: sqlite3.Connection, videos: Sequence[Path], *, retry_failed: bool = False) -> _Plan:
    indexed = catalog.file_states(conn)
    failed = {} if retry_failed else catalog.failure_states(conn)
    wanted = {str(p) for p in videos}
    pending: list[tuple[str, FileState]] = []
    replaced: set[str] = set()
    unchanged = 0
    for path in sorted(wanted):
        try:
            state = FileState.of(path)
        except OSError:
            logger.warning("video disappeared before indexing: %s", path)
            continue
        known = indexed.get(path) or failed.get(path)
        if known == (state.size, state.mtime_ns):
            unchanged += 1
            continue
        if path in indexed:
            replaced.add(path)
        pending.append((path, state))
    failed_before = catalog.failure_states(conn)
    gone = sorted(set(indexed) - wanted) + sorted(set(failed_before) - wanted - set(indexed))
    return _Plan(pending=pending, replaced=replaced, gone=gone, unchanged=unchanged)


def _encode_all(
    root: Path,
    pending: Sequence[tuple[str, FileState]],
    replaced: set[str],
    extractor: FeatureExtractor,
    shard_size: int,
    rank: int,
    conn: sqlite3.Connection | None,
    report: SyncReport,
    progress: bool,
    segments: SegmentConfig | None = None,
) -> None:
    """Encode ``pending`` in shards of ``shard_size`` videos (``segments``: cut each video so, else whole)."""
    shard_dir = root / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(pending), desc=f"encoding (rank {rank})" if rank else "encoding", unit="video",
               disable=not progress, position=rank)
    with bar:
        for sequence, start in enumerate(range(0, len(pending), shard_size)):
            chunk = pending[start:start + shard_size]
            results = []
            paths = [Path(path) for path, _ in chunk]
            if segments is None:
                results_iter = extractor.extract(paths)
            else:
                results_iter = extractor.extract_segments(paths, segments)  # type: ignore[attr-defined]
            for result in results_iter:
                results.append(result)
                bar.update(1)
            if len(results) != len(chunk):
                raise RuntimeError(f"extractor returned {len(results)} results for {len(chunk)} videos")
            name = _write_chunk(shard_dir, rank, sequence, chunk, results, extractor)
            for (path, _), result in zip(chunk, results, strict=True):
                if isinstance(result, ExtractionFailure):
                    report.failed += 1
                    report.failures.append((path, result.error))
                elif path in replaced:
                    report.replaced += 1
                else:
                    report.added += 1
            report.shards_written += 1
            if conn is not None:
                _register(conn, read_shard_metadata(shard_dir / name))


def _write_chunk(
    shard_dir: Path,
    rank: int,
    sequence: int,
    chunk: Sequence[tuple[str, FileState]],
    results: Sequence[VideoFeatures | SegmentedFeatures | ExtractionFailure],
    extractor: FeatureExtractor,
) -> str:
    entries: list[ShardEntry] = []
    features: list[VideoFeatures] = []
    failures: list[ShardFailure] = []
    for (path, state), result in zip(chunk, results, strict=True):
        if isinstance(result, ExtractionFailure):
            logger.warning("cannot index %s: %s", path, result.error)
            failures.append(ShardFailure(path, state.size, state.mtime_ns, result.error))
            continue
        if isinstance(result, SegmentedFeatures):  # one row per segment, all of one video in this shard
            for (start, end), row in zip(result.spans, result.rows(), strict=True):
                entries.append(ShardEntry(
                    id=video_id(path), path=path, size=state.size, mtime_ns=state.mtime_ns,
                    duration=result.duration, width=result.width, height=result.height,
                    num_frames=int(row.frame_mask.sum()), start=float(start), end=float(end),
                ))
                features.append(row)
            continue
        entries.append(ShardEntry(
            id=video_id(path), path=path, size=state.size, mtime_ns=state.mtime_ns, duration=result.duration,
            width=result.width, height=result.height, num_frames=int(result.frame_mask.sum()),
        ))
        features.append(result)
    frames, frame_mask = stack_features(features, extractor.num_frames, extractor.embed_dim)
    name = new_shard_name(rank, sequence)
    write_shard(
        shard_dir, name, model_id=extractor.identity.model_id, entries=entries, failures=failures,
        frames=frames, frame_mask=frame_mask, pooled=pool_frames(frames, frame_mask),
        thumbnails=[f.thumbnail for f in features],
        # From the stored fp16 frames: the weights a query would compute from them.
        frame_weights=extractor_frame_weights(extractor, frames, frame_mask),
    )
    return name


def _register(conn: sqlite3.Connection, shard: ShardContents) -> None:
    """Register a shard: one video record per id (a segmented video's names its first segment row,
    and takes that segment's thumbnail), one segment per row with a span."""
    records: list[VideoRecord] = []
    thumbnails: list[bytes | None] = []
    segments: list[tuple[str, float, float, int]] = []
    seen: set[str] = set()
    for row, e in enumerate(shard.entries):
        if e.start is not None and e.end is not None:
            segments.append((e.id, e.start, e.end, row))
        if e.id in seen:
            continue
        seen.add(e.id)
        records.append(VideoRecord(e.id, e.path, e.size, e.mtime_ns, e.duration, e.width, e.height, e.num_frames,
                                   shard.name, row))
        thumbnails.append(shard.thumbnails[row])
    failures = [(f.path, f.size, f.mtime_ns, f.error) for f in shard.failures]
    catalog.register_shard(conn, shard.name, shard.created_ns, records, thumbnails, failures,
                           num_rows=len(shard.entries), segments=segments)


def _recover(conn: sqlite3.Connection, root: Path, model_id: str) -> None:
    """Finish what a killed or multi-rank run left on disk (rank 0, holding the lock)."""
    shard_dir = root / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for partial in shard_dir.glob(".*.tmp"):  # an atomic write that never reached its rename
        partial.unlink(missing_ok=True)
    _delete_retired(conn, shard_dir)
    known = catalog.shard_names(conn)
    orphans: list[ShardContents] = []
    for path in sorted(shard_dir.glob(f"*{SHARD_SUFFIX}")):
        if path.name in known:
            continue
        try:
            contents = read_shard_metadata(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is set aside, never trusted
            logger.warning("setting aside unreadable shard %s: %s", path.name, exc)
            path.rename(path.with_name(f".{path.name}.corrupt"))
            continue
        if contents.model_id != model_id:
            raise ModelMismatchError(f"shard {path.name} was written by another model ({contents.model_id[:12]})")
        orphans.append(contents)
    # Oldest first, so that a file encoded twice keeps its newest features.
    for contents in sorted(orphans, key=lambda c: (c.created_ns, c.name)):
        _register(conn, contents)
        logger.info("registered shard %s (%d videos)", contents.name, len(contents.entries))


def _delete_retired(conn: sqlite3.Connection, shard_dir: Path) -> None:
    retired = catalog.retired_shards(conn)
    for name in retired:
        (shard_dir / name).unlink(missing_ok=True)
    catalog.forget_shards(conn, retired)


def _compact(conn: sqlite3.Connection, root: Path, shard_size: int, extractor: FeatureExtractor) -> None:
    """Rewrite shards with dead rows, merge small shards, drop empty ones.

    Dead rows come from replaced or removed videos; small shards from the tail of each rank's
    slice. Rows are re-packed in path order into full shards, so repeated updates do not fragment
    the index.
    """
    live = catalog.live_rows(conn)
    sizes = catalog.shard_sizes(conn)
    empty = [name for name, count in live.items() if count == 0]
    holey = [name for name, count in live.items() if 0 < count < sizes[name]]
    small = [name for name, count in live.items() if 0 < count < shard_size // 2]
    rewrite = sorted(set(holey) | set(small)) if holey or len(small) > 1 else []
    shard_dir = root / SHARD_DIR
    if rewrite:
        records = [r for r in catalog.list_rows(conn) if r.shard in set(rewrite)]
        chunks = _chunk_rows(records, shard_size)
        for sequence, chunk in enumerate(chunks):
            _rewrite(conn, shard_dir, chunk, sequence, extractor)
        logger.info("compacted %d shards into %d", len(rewrite), len(chunks))
    catalog.retire_shards(conn, sorted(set(empty) | set(rewrite)))
    _delete_retired(conn, shard_dir)


def _chunk_rows(records: Sequence[VideoRecord], shard_size: int) -> list[list[VideoRecord]]:
    """Rows in chunks of about ``shard_size``, never splitting one video's segments across two chunks.

    Every segment of a video lives in one shard, as when it was first written: recovery registers a
    shard's videos together (replacing their earlier rows), which must see all of a video's segments.
    """
    chunks: list[list[VideoRecord]] = []
    for record in records:
        if not chunks or (len(chunks[-1]) >= shard_size and chunks[-1][-1].id != record.id):
            chunks.append([])
        chunks[-1].append(record)
    return chunks


def _rewrite(conn: sqlite3.Connection, shard_dir: Path, records: Sequence[VideoRecord], sequence: int,
             extractor: FeatureExtractor) -> None:
    parts: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        parts.setdefault(record.shard, []).append(position)
    frames: list[torch.Tensor] = [torch.empty(0)] * len(records)
    masks, pooled = list(frames), list(frames)
    weights: list[torch.Tensor | None] = [None] * len(records)
    thumbnails: list[bytes | None] = [None] * len(records)
    for shard, positions in parts.items():
        rows = [records[i].row for i in positions]
        shard_frames, shard_masks, shard_pooled = read_shard_rows(shard_dir / shard, rows)
        shard_weights = read_shard_weights(shard_dir / shard, rows)
        # A segment's thumbnail lives in its shard only (the catalogue keeps one per video).
        shard_thumbs = (read_shard_metadata(shard_dir / shard).thumbnails
                        if any(records[i].start is not None for i in positions) else None)
        for j, i in enumerate(positions):
            frames[i], masks[i], pooled[i] = shard_frames[j], shard_masks[j], shard_pooled[j]
            weights[i] = None if shard_weights is None else shard_weights[j]
            if records[i].start is None:
                thumbnails[i] = catalog.thumbnail(conn, records[i].id)
            else:
                assert shard_thumbs is not None
                thumbnails[i] = shard_thumbs[records[i].row]
    frames_t, masks_t = torch.stack(frames), torch.stack(masks)
    if all(w is not None for w in weights):
        weights_t: torch.Tensor | None = torch.stack(weights)  # type: ignore[arg-type]
    else:  # rows from shards written before weights were stored: compute them now if the model can
        weights_t = extractor_frame_weights(extractor, frames_t, masks_t)
    entries = [ShardEntry(r.id, r.path, r.size, r.mtime_ns, r.duration, r.width, r.height,
                          int(masks_t[i].sum()) if r.start is not None else r.num_frames, r.start, r.end)
               for i, r in enumerate(records)]
    # The video entry moves with the row it names (a segmented video's first segment).
    heads = {(r.shard, r.row) for r in catalog.list_records(conn)}
    name = new_shard_name(0, sequence)
    write_shard(
        shard_dir, name, model_id=catalog.read_info(conn)["model_id"], entries=entries, failures=[],
        frames=frames_t, frame_mask=masks_t, pooled=torch.stack(pooled),
        thumbnails=thumbnails, frame_weights=weights_t,
    )
    created_ns = read_shard_metadata(shard_dir / name).created_ns
    # Old shards are retired by the caller once every rewrite has committed; here only rows move.
    catalog.move_rows(conn, name, len(records), created_ns,
                      [(r.id, row) for row, r in enumerate(records) if (r.shard, r.row) in heads],
                      [(r.id, r.start, row) for row, r in enumerate(records) if r.start is not None])
