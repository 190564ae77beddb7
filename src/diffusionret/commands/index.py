"""``diffusionret index build|update|info``: create, refresh and inspect an on-disk video index.

Under ``torchrun`` every rank encodes its share of the pending videos and rank 0 merges the shards::

    torchrun --nproc_per_node 4 -m diffusionret index build --model ckpt.safetensors --videos videos/ --out idx/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from diffusionret.commands._common import positive_float, user_errors

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build, update or inspect a video index",
                                   description="Build, update or inspect a persistent index of video features.")
    actions = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="index a video collection (resumes an interrupted build)",
                               description="Find videos (recursively, or from .txt/.csv lists), encode them in "
                                           "batches and write an index. Re-running a killed build resumes it.")
    build.add_argument("--model", required=True,
                       help="model checkpoint (.safetensors or run folder, a training run's last.pt, or an official .pth)")
    build.add_argument("--videos", required=True, nargs="+", metavar="DIR_OR_LIST",
                       help="folder(s) scanned recursively, .txt lists (one path per line) or .csv (path column)")
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder")
    build.add_argument("--video-root", metavar="DIR",
                       help="folder that relative paths in .txt/.csv lists refer to (default: the list's folder)")
    build.add_argument("--frames", type=int, default=None,
                       help="frames sampled per video, T (default: the checkpoint's input setting, else the "
                            "reference's 12)")
    build.add_argument("--fps", type=float, default=None,
                       help="frame sampling rate before reducing to T (default: the checkpoint's, else 1)")
    build.add_argument("--sampling", default=None, choices=("uniform", "head", "tail", "reference"),
                       help="how T frames are chosen from the sampled ones (default: the checkpoint's, else uniform)")
    _add_segment_options(build, default="auto")
    _add_run_options(build)
    build.set_defaults(func=run_build)

    update = actions.add_parser("update", help="add new and changed videos, drop deleted ones",
                                description="Re-scan the recorded sources (or --videos) and bring the index "
                                            "up to date.")
    update.add_argument("index", metavar="INDEX_DIR")
    update.add_argument("--model", help="model checkpoint (default: the one recorded in the index)")
    update.add_argument("--videos", nargs="+", metavar="DIR_OR_LIST",
                        help="sources to scan (default: the recorded ones)")
    update.add_argument("--video-root", metavar="DIR",
                        help="folder for relative paths in lists (default: the recorded one)")
    _add_segment_options(update, default=None)
    _add_run_options(update)
    update.set_defaults(func=run_update)

    info = actions.add_parser("info", help="show what an index holds")
    info.add_argument("index", metavar="INDEX_DIR")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)


def _add_segment_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    from diffusionret.index.segments import SEGMENT_MODES

    recorded = "the index's recorded segmentation" if default is None else default
    parser.add_argument("--segments", choices=SEGMENT_MODES, default=default,
                        help="how videos are cut into indexed segments: whole = one per video; fixed = windows of "
                             "--window s every --stride s; shots = shot boundaries; auto = whole for short videos, "
                             f"fixed for long ones (default: {recorded}). An update cannot change it")
    parser.add_argument("--window", type=float, default=None, metavar="SECONDS",
                        help="segment length (default: the model's clip span, frames / fps)")
    parser.add_argument("--stride", type=float, default=None, metavar="SECONDS",
                        help="seconds between segment starts (default: half the window)")


def _segment_config(args: argparse.Namespace) -> Any:
    """The requested :class:`~diffusionret.index.segments.SegmentConfig`, or ``None`` (keep the recorded one)."""
    from diffusionret.index.builder import SegmentsError
    from diffusionret.index.segments import SegmentConfig

    if args.segments is None:
        if args.window is not None or args.stride is not None:
            raise SegmentsError("--window and --stride need --segments")
        return None
    try:
        return SegmentConfig(mode=args.segments, window=args.window, stride=args.stride)
    except ValueError as exc:  # a non-positive window, a stride longer than the window
        raise SegmentsError(str(exc)) from exc


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prune", action="store_true",
                        help="allow removing more than a few indexed videos, or every video of a source (without "
                             "it, a run whose sources lost many videos, e.g. an unmounted disk, changes nothing)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="decode again the files that failed before (default: skipped until they change)")
    parser.add_argument("--decode-timeout", type=positive_float, default=120.0, metavar="SECONDS",
                        help="time budget to decode one video; a decoder that takes longer is killed and the file "
                             "recorded as failed. A segmented video's whole timeline may take longer while it "
                             "progresses: it is killed after this long without progress, or when it falls below "
                             "--decode-min-speed (default: 120)")
    parser.add_argument("--decode-min-speed", type=positive_float, default=1.0, metavar="X",
                        help="slowest decoding of a segmented video's timeline, in seconds of video per second: "
                             "after --decode-timeout + duration decoded / X seconds it is killed (default: 1, real "
                             "time)")
    parser.add_argument("--decode-memory", type=float, default=4.0, metavar="GIB",
                        help="address-space budget of each decoding worker process (default: 4 GiB)")
    parser.add_argument("--batch-size", type=int, default=16, help="videos encoded per forward pass")
    parser.add_argument("--shard-size", type=int, default=256,
                        help="videos per shard file (the unit of resumable progress)")
    parser.add_argument("--decode-workers", type=int, default=2,
                        help="worker processes decoding videos ahead of the model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ann", "--ivf", dest="ann", choices=("auto", "on", "off"), default="auto",
                        help="keep an ANN file (--ann-kind) for an approximate first stage (FAISS): auto = for "
                             "indexes of at least --ann-min-videos videos when FAISS is installed; on = always "
                             "(needs FAISS); off = never, and delete existing ones (default: auto)")
    parser.add_argument("--ann-kind", choices=("pq", "ivf"), default="pq",
                        help="the ANN file built: pq = 4-bit PQ fast-scan codes, shortlist re-scored exactly; "
                             "ivf = IVF-Flat (default: pq)")
    parser.add_argument("--ann-min-videos", "--ivf-min-videos", dest="ann_min_videos", type=int, default=100_000,
                        metavar="N", help="index size from which --ann auto builds the ANN file (default: 100000)")
    parser.add_argument("--ivf-nlist", type=int, default=None, metavar="LISTS",
                        help="IVF clusters (default: the power of two nearest sqrt(videos), 1024 at 1M)")
    parser.add_argument("--pq-m", type=int, default=None, metavar="M",
                        help="PQ sub-quantisers, a divisor of the embedding dimension (default: D/2, 256 at D=512)")


def _ann_config(args: argparse.Namespace) -> Any:
    from diffusionret.index.ann_build import AnnBuildConfig

    return AnnBuildConfig(mode=args.ann, min_videos=args.ann_min_videos, nlist=args.ivf_nlist,
                          kind=args.ann_kind, pq_m=args.pq_m)


def decode_budget(args: argparse.Namespace) -> Any:
    """The :class:`~diffusionret.data.isolate.DecodeBudget` of ``--decode-timeout/-memory/-min-speed``."""
    from diffusionret.data.isolate import DecodeBudget

    return DecodeBudget(timeout_s=args.decode_timeout, memory_bytes=int(args.decode_memory * 2**30),
                        min_speed=args.decode_min_speed)


def _encoder(args: argparse.Namespace, model_path: str, device: str | None, settings: dict[str, Any] | None = None):
    from diffusionret.index.encode import ModelVideoEncoder
    from diffusionret.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(model_path, device=device or "cpu")
    options = dict(batch_size=args.batch_size, decode_workers=args.decode_workers, model_path=model_path,
                   budget=decode_budget(args))
    if settings is not None:
        return ModelVideoEncoder.from_settings(loaded.model, settings, **options)
    # The checkpoint's input settings, with the command-line flags on top.
    input_config = loaded.input.replace(max_frames=args.frames, fps=args.fps, sampling=args.sampling)
    return ModelVideoEncoder(loaded.model, input_config, **options)


def _distributed(device: str | None):
    """Join the torchrun job when there is one: (rank, world_size, agree, device, context).

    ``agree(failed)`` is the builder's synchronisation point: it returns on every rank whether any
    rank failed (:func:`~diffusionret.distributed.any_rank`).
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        import torch

        return 0, 1, None, device or ("cuda" if torch.cuda.is_available() else "cpu"), None
    from diffusionret.distributed import any_rank, init_distributed

    ctx = init_distributed(device)
    return ctx.rank, ctx.world_size, (lambda failed: any_rank(failed, ctx)), str(ctx.device), ctx


def _finish(ctx: Any) -> None:
    if ctx is not None:
        from diffusionret.distributed import destroy_distributed

        destroy_distributed(ctx)


def _report(report: Any, rank: int) -> None:
    if rank == 0:
        sys.stdout.write(
            f"{report.total} videos indexed: {report.added} added, {report.replaced} re-encoded, {report.removed} "
            f"removed, {report.unchanged} unchanged, {report.failed} failed\n"
        )
        for path, error in report.failures:
            sys.stdout.write(f"  failed: {path}: {error}\n")


def _sync(args: argparse.Namespace, model_path: str, sync: Callable[..., Any],
          settings: dict[str, Any] | None = None) -> int:
    """Encode with the model at ``model_path`` and run ``sync(encoder, **options)`` (build or update) on every rank."""
    ann = _ann_config(args)
    segments = _segment_config(args)  # a bad combination fails before the model loads
    rank, world_size, agree, device, ctx = _distributed(args.device)
    try:
        encoder = _encoder(args, model_path, device, settings=settings)
        try:
            report = sync(encoder, video_root=args.video_root, shard_size=args.shard_size, rank=rank,
                          world_size=world_size, agree=agree, progress=not args.no_progress, ann=ann,
                          prune=args.prune, retry_failed=args.retry_failed, segments=segments)
        finally:
            encoder.close()  # stops the decoding worker processes
        _report(report, rank)
    finally:
        _finish(ctx)
    return 0


@user_errors
def run_build(args: argparse.Namespace) -> int:
    from diffusionret.index.builder import build_index

    def build(encoder: Any, **options: Any) -> Any:
        return build_index(args.out, args.videos, encoder, **options)

    return _sync(args, args.model, build)


@user_errors
def run_update(args: argparse.Namespace) -> int:
    from diffusionret.index.builder import update_index
    from diffusionret.index.store import VideoIndex

    info = VideoIndex.read_info(args.index)
    model_path = args.model or info.model_path
    if model_path is None:
        logger.error("%s does not record its model; pass --model", args.index)
        return 2
    def update(encoder: Any, **options: Any) -> Any:
        return update_index(args.index, encoder, args.videos, **options)

    return _sync(args, model_path, update, settings=info.settings)


@user_errors
def run_info(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from diffusionret.index import catalog
    from diffusionret.index.first_stage import (
        ANN_KINDS,
        ann_files,
        ann_path,
        ivf_files,
        ivf_path,
    )
    from diffusionret.index.builder import recorded_segments
    from diffusionret.index.store import VideoIndex, index_fingerprint

    info = VideoIndex.read_info(args.index)
    root = Path(args.index)
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        segmentation = recorded_segments(catalog.read_info(conn))
        videos, failures = catalog.count_videos(conn), catalog.count_failures(conn)
        segments = catalog.count_segments(conn)
        failed_files = [{"path": path, "size": size, "mtime": mtime_ns / 1e9, "error": error}
                        for path, size, mtime_ns, error in catalog.list_failures(conn)]
        shards = len(catalog.shard_sizes(conn))
        fingerprint = index_fingerprint(conn)[0]
    current = ivf_path(root, fingerprint)
    current_ann = [p for p in (ann_path(root, kind, fingerprint) for kind in ANN_KINDS) if p.is_file()]
    data = {"index": str(root.resolve()), "videos": videos,
            # Indexed segments (feature rows): one per video indexed whole, one per segment of the others.
            "segments": segments, "segmentation": segmentation,
            "failures": failures, "shards": shards,
            "model_id": info.model_id, "model_path": info.model_path, "settings": info.settings,
            "num_frames": info.num_frames, "embed_dim": info.embed_dim, "sources": info.sources,
            "video_root": info.video_root,
            "created_at": info.created_at, "updated_at": info.updated_at,
            # The IVF file that matches the current contents (None: exact first stage only) and any stale ones.
            "ivf_file": current.name if current.is_file() else None,
            "stale_ivf_files": [p.name for p in ivf_files(root) if p != current],
            # Every ANN file (PQ or IVF) for the current contents, in the order `--first-stage auto` tries them.
            "ann_files": [p.name for p in current_ann],
            "stale_ann_files": [p.name for p in ann_files(root) if p not in current_ann],
            # Files skipped by `index update` until they change (or --retry-failed), with the reason.
            "failed_files": failed_files}
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        width = max(len(key) for key in data)
        for key, value in data.items():
            if key != "failed_files":
                sys.stdout.write(f"{key:<{width}}  {value}\n")
        for failure in failed_files:
            sys.stdout.write(f"failed  {failure['path']}: {failure['error']}\n")
    return 0
