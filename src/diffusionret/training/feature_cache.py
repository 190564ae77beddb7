"""The stage-2 feature cache: encode the training split once, train the denoisers from a memory map.

In the generation stage the backbone is frozen, so without augmentation every caption and every
video gives the same features every epoch; encoding 12 frames per sample with the ViT at every step
(the reference, and ``train.feature_cache: off``) is almost all of the stage's cost. With the cache:

1. every rank encodes its share of fixed-size *shards* (captions: word tokens, sentence CLS, mask;
   videos: frame features after the temporal module, frame mask) and writes each shard atomically,
   so a killed run resumes where it stopped (finished shards are skipped);
2. rank 0 streams the shards into one features file in the format of ``diffusionret extract``
   (:class:`~diffusionret.evaluation.features.CorpusFeatures`), atomically, and removes the shards;
3. every rank memory-maps that file and builds each step's batch from the rows of the same samples
   the data loader would have read (same sampler, same order), so the objective sees the same inputs.

The cache is keyed by :func:`cache_fingerprint` (the frozen model + the input settings + encoding
precision and storage dtype): a cache or shards with another fingerprint are never used; they are
re-encoded, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from diffusionret.config_utils import atomic_write_text
from diffusionret.distributed import DistContext, IndexSampler, barrier, broadcast_object

logger = logging.getLogger(__name__)

CACHE_FILE = "train.safetensors"
SHARD_DIR = "train.shards"
SHARD_SIZE = 1024  # captions or videos per shard: the unit of resumption and of merge memory
_DENOISER_PREFIXES = ("diffusion_model.", "diffusion_model_v.")
# Config fields that do not change the frozen encoders (the stage and the denoisers/sampler).
_NON_ENCODER_FIELDS = ("stage", "denoisers", "denoiser_temp", "diffusion_steps", "noise_schedule")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- identity
def input_settings(inputs: Any) -> dict[str, Any]:
    """How videos and captions become tensors, as the cache records and fingerprints them.

    Args:
        inputs: an :class:`~diffusionret.inputs.InputConfig` (``RunConfig.input_config()``).
    """
    return inputs.to_json_dict()


class _EncoderView:
    """The parts of a model that produce the cached features (no denoisers, no stage/sampler fields),
    shaped like a model for :func:`~diffusionret.models.fingerprint.model_fingerprint`."""

    def __init__(self, model: nn.Module) -> None:
        from diffusionret.config_utils import to_dict

        config = to_dict(getattr(model, "config", None)) or {}
        self.config = {k: v for k, v in config.items() if k not in _NON_ENCODER_FIELDS}
        self._state = {k: v for k, v in model.state_dict().items() if not k.startswith(_DENOISER_PREFIXES)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def cache_fingerprint(model: nn.Module, inputs: Mapping[str, Any], *, encode_dtype: str, store_dtype: str) -> str:
    """The key of a feature cache: the frozen encoders' fingerprint + how inputs are made and stored.

    The denoisers are left out on purpose: they are what trains on the cache, and a resumed run has
    other denoiser weights than a fresh one but the same frozen features.

    Args:
        model: the stage-2 model.
        inputs: :func:`input_settings` plus anything else that changes the samples (dataset, split).
        encode_dtype: autocast dtype of the encoding (``"float32"`` when none).
        store_dtype: storage dtype of the cache.
    """
    from diffusionret.models.fingerprint import model_fingerprint

    digest = hashlib.sha256()
    digest.update(model_fingerprint(_EncoderView(model)).encode())  # type: ignore[arg-type]
    extra = {"inputs": dict(inputs), "encode_dtype": encode_dtype, "store_dtype": store_dtype}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class CacheSpec:
    """Where and how to build a cache.

    Attributes:
        directory: cache folder (shared by all ranks).
        fingerprint: :func:`cache_fingerprint` of the model and inputs.
        meta: provenance stored in the file (``fingerprint`` is added).
        batch_size: global encoding batch size (split over ranks).
        num_workers: data-loader workers per rank.
        amp_dtype: autocast dtype for encoding (``None``: fp32), the same as the online path uses.
        store_dtype: ``float32`` or ``float16``.
        shard_size: captions / videos per shard.
    """

    directory: Path
    fingerprint: str
    meta: Mapping[str, Any]
    batch_size: int
    num_workers: int = 0
    amp_dtype: torch.dtype | None = None
    store_dtype: str = "float32"
    shard_size: int = SHARD_SIZE

    @property
    def path(self) -> Path:
        return self.directory / CACHE_FILE

    @property
    def shard_dir(self) -> Path:
        return self.directory / SHARD_DIR


def cached_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in a cache file, or ``None`` when it is missing or unreadable."""
    from diffusionret.evaluation.features import read_features_metadata

    if not path.is_file():
        return None
    try:
        return json.loads(read_features_metadata(path)["meta"]).get("fingerprint")
    except (ValueError, KeyError, OSError) as exc:
        logger.warning("feature cache %s is unreadable (%s): re-encoding", path, exc)
        return None


def ensure_feature_cache(model: nn.Module, dataset: Any, spec: CacheSpec, ctx: DistContext) -> Path:
    """The path of a cache of ``dataset`` made by ``model`` with ``spec.fingerprint``; encoded if needed.

    A collective: every rank calls it. Resumable: shards written by an interrupted call are kept
    when their fingerprint matches and skipped.

    Args:
        model: the frozen model, on ``ctx.device``.
        dataset: the training split (``VideoTextDataset``, without augmentation).
        spec: where and how.
        ctx: distributed context.
    """
    path = spec.path
    found = broadcast_object(cached_fingerprint(path) if ctx.is_main else None, ctx)
    if found == spec.fingerprint:
        logger.info("feature cache %s matches the model and input settings: re-used", path)
        return path
    if found is not None:
        logger.warning("feature cache %s was made by another model or other input settings "
                       "(fingerprint %s..., expected %s...): re-encoding", path, found[:12], spec.fingerprint[:12])
    if ctx.is_main:
        _prepare_shard_dir(spec)
    barrier(ctx)
    _encode_shards(model, dataset, spec, ctx)
    barrier(ctx)
    if ctx.is_main:
        _merge_shards(dataset, spec)
        shutil.rmtree(spec.shard_dir, ignore_errors=True)
    barrier(ctx)
    return path


def view_directory(directory: Path, view: int, views: int) -> Path:
    """The cache folder of augmented view ``view`` of ``views`` (the folder itself for a single view)."""
    return directory if views == 1 else directory / f"view{view}"


def ensure_view_caches(model: nn.Module, dataset: Any, specs: Sequence[CacheSpec], ctx: DistContext) -> list[Path]:
    """:func:`ensure_feature_cache` for each of N augmented views of an augmenting ``dataset``.

    View v holds the dataset's augmentation draw of epoch v (``dataset.set_epoch(v)``; each video's
    draw is keyed by the video, so all its captions see the same view). Each spec's fingerprint must
    name its view, so that a view is never taken for another. A collective, like
    :func:`ensure_feature_cache`; the dataset's epoch is restored afterwards.
    """
    epoch = dataset.epoch
    try:
        paths = []
        for view, spec in enumerate(specs):
            dataset.set_epoch(view)
            paths.append(ensure_feature_cache(model, dataset, spec, ctx))
        return paths
    finally:
        dataset.set_epoch(epoch)


def _prepare_shard_dir(spec: CacheSpec) -> None:
    stamp = spec.shard_dir / "FINGERPRINT"
    if spec.shard_dir.exists():
        old = stamp.read_text().strip() if stamp.is_file() else None
        if old == spec.fingerprint:
            logger.info("resuming the feature cache: %d finished shards in %s",
                        len(list(spec.shard_dir.glob("*.safetensors"))), spec.shard_dir)
            return
        logger.warning("discarding feature-cache shards of another model or input settings in %s", spec.shard_dir)
        shutil.rmtree(spec.shard_dir)
    spec.shard_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, spec.fingerprint + "\n")


def _shards(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _shard_path(spec: CacheSpec, kind: str, k: int) -> Path:
    return spec.shard_dir / f"{kind}_{k:06d}.safetensors"


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def _encode_shards(model: nn.Module, dataset: Any, spec: CacheSpec, ctx: DistContext) -> None:
    """Encode this rank's unfinished shards (shard ``k`` belongs to rank ``k % world_size``)."""
    from safetensors.torch import save_file

    from diffusionret.config_utils import atomic_path
    from diffusionret.data.collate import collate
    from diffusionret.data.dataset import worker_init_fn

    was_training = model.training
    model.eval()
    store = _DTYPES[spec.store_dtype]
    local_batch = max(1, spec.batch_size // ctx.world_size)
    jobs = [("text", k, r) for k, r in enumerate(_shards(len(dataset), spec.shard_size))]
    jobs += [("video", k, r) for k, r in enumerate(_shards(dataset.num_videos, spec.shard_size))]
    mine = [job for i, job in enumerate(jobs) if i % ctx.world_size == ctx.rank]
    todo = [job for job in mine if not _shard_path(spec, job[0], job[1]).is_file()]
    if len(todo) < len(mine):
        logger.info("feature cache: %d of this rank's %d shards already done", len(mine) - len(todo), len(mine))
    try:
        for kind, k, indices in todo:
            view = dataset.text_view() if kind == "text" else dataset.video_view()
            loader = DataLoader(view, batch_size=local_batch, sampler=IndexSampler(indices),
                                num_workers=spec.num_workers, collate_fn=collate, worker_init_fn=worker_init_fn)
            parts: dict[str, list[torch.Tensor]] = {}
            for batch in loader:
                if batch is None:  # every video of the batch was skipped (on_error: skip)
                    continue
                with _autocast(ctx.device, spec.amp_dtype):
                    if kind == "text":
                        ids, mask = batch.text_ids.to(ctx.device), batch.text_mask.to(ctx.device)
                        tokens, cls = model.encode_text(ids, mask)
                        out = {"index": batch.index, "tokens": tokens.float().to(store), "text_mask": mask,
                               "cls": cls.float().to(store)}
                    else:
                        frames, mask = batch.frames.to(ctx.device), batch.frame_mask.to(ctx.device)
                        out = {"index": batch.video_index, "video": model.encode_video(frames, mask).float().to(store),
                               "frame_mask": mask}
                for name, value in out.items():
                    parts.setdefault(name, []).append(value.cpu())
            tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
            if not tensors:  # a video shard whose every video was skipped
                tensors = {"index": torch.zeros(0, dtype=torch.long)}
            with atomic_path(_shard_path(spec, kind, k)) as tmp:
                save_file(tensors, str(tmp))
            logger.info("feature cache: %s shard %d (%d items) written", kind, k, len(indices))
    finally:
        model.train(was_training)


def _merge_shards(dataset: Any, spec: CacheSpec) -> None:
    """Stream every shard into one features file (rank 0); captions of unreadable videos are dropped."""
    from diffusionret.evaluation.features import features_metadata
    from diffusionret.safetensors_mmap import mmap_tensors, write_streamed

    text_paths = [_shard_path(spec, "text", k) for k in range(len(_shards(len(dataset), spec.shard_size)))]
    video_paths = [_shard_path(spec, "video", k) for k in range(len(_shards(dataset.num_videos, spec.shard_size)))]
    missing_files = [p for p in text_paths + video_paths if not p.is_file()]
    if missing_files:
        raise RuntimeError(f"feature cache: shards missing after encoding: {[str(p) for p in missing_files[:3]]}")
    video_index = torch.cat([mmap_tensors(p, ["index"])["index"].clone() for p in video_paths])
    present = torch.zeros(dataset.num_videos, dtype=torch.bool)
    present[video_index] = True
    new_row = torch.full((dataset.num_videos,), -1, dtype=torch.long)
    new_row[video_index] = torch.arange(video_index.numel())
    c2v_all = dataset.caption_to_video_tensor()
    keep_parts, text_index = [], []
    for p in text_paths:
        index = mmap_tensors(p, ["index"])["index"].clone()
        keep = present[c2v_all[index]]
        keep_parts.append(keep)
        text_index.append(index[keep])
    text_index_all = torch.cat(text_index)
    all_ids = dataset.video_ids
    missing = [all_ids[j] for j in range(dataset.num_videos) if not bool(present[j])]
    meta = {**spec.meta, "fingerprint": spec.fingerprint}

    def load_part(name: str, handle: tuple[Path, int]) -> torch.Tensor:
        path, k = handle
        if name in ("video", "frame_mask"):
            return mmap_tensors(path, [name])[name]
        if name == "caption_to_video":
            return new_row[c2v_all[text_index[k]]]
        if name == "text_index":
            return text_index[k]
        rows = mmap_tensors(path, [name])[name]
        keep = keep_parts[k]
        return rows if bool(keep.all()) else rows[keep]

    texts = [(p, k) for k, p in enumerate(text_paths)]
    videos = [(p, k) for k, p in enumerate(video_paths)]
    parts = {"tokens": texts, "text_mask": texts, "cls": texts, "video": videos, "frame_mask": videos,
             "caption_to_video": texts, "text_index": texts}
    write_streamed(spec.path, parts, features_metadata([all_ids[j] for j in video_index.tolist()], missing, meta),
                   load_part)
    logger.info("feature cache written: %s (%d captions, %d videos%s)", spec.path, text_index_all.numel(),
                video_index.numel(), f", {len(missing)} unreadable" if missing else "")


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class CachedBatch:
    """One local batch of cached features (the inputs of the online path, already encoded).

    Shapes: ``tokens`` (b, L, D), ``text_mask`` (b, L), ``cls`` (b, D), ``video`` (b, T, D),
    ``frame_mask`` (b, T), ``video_key`` (b,), ``caption_row`` / ``video_row`` (b,) rows in the cache.
    """

    tokens: torch.Tensor
    text_mask: torch.Tensor
    cls: torch.Tensor
    video: torch.Tensor
    frame_mask: torch.Tensor
    video_key: torch.Tensor
    caption_row: torch.Tensor
    video_row: torch.Tensor

    def args(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Keyword arguments of :meth:`GenerationObjective.forward` on ``device`` (features as float32)."""
        return {"text_ids": None, "frames": None, "tokens": self.tokens.to(device).float(), "text_mask": self.text_mask.to(device),
                "cls": self.cls.to(device).float(), "video": self.video.to(device).float(),
                "frame_mask": self.frame_mask.to(device), "video_key": self.video_key.to(device),
                "caption_row": self.caption_row.to(device)}


class TrainFeatureCache:
    """A memory-mapped training cache, addressed by the dataset's sample indices.

    Args:
        path: the cache file.
        num_samples: ``len(dataset)`` of the training split it was made from.
    """

    def __init__(self, path: str | Path, num_samples: int) -> None:
        from diffusionret.data.records import video_key
        from diffusionret.evaluation.features import CorpusFeatures

        self.path = Path(path)
        self.features = CorpusFeatures.load(self.path, mmap=True)
        feats = self.features
        index = feats.text_index if feats.text_index is not None else torch.arange(feats.num_captions)
        self.row_of_sample = torch.full((num_samples,), -1, dtype=torch.long)
        self.row_of_sample[index] = torch.arange(index.numel())
        self.caption_to_video = feats.caption_to_video.clone()
        self.video_keys = torch.tensor([video_key(v) for v in feats.video_ids], dtype=torch.long)

    def batch(self, indices: torch.Tensor | list[int]) -> CachedBatch | None:
        """The cached rows of dataset samples ``indices`` (b,); samples of unreadable videos are dropped
        (as the data loader drops them); ``None`` when none is left."""
        rows = self.row_of_sample[torch.as_tensor(indices, dtype=torch.long)]
        rows = rows[rows >= 0]
        if rows.numel() == 0:
            return None
        videos = self.caption_to_video[rows]
        f = self.features
        return CachedBatch(tokens=f.tokens[rows], text_mask=f.text_mask[rows], cls=f.cls[rows], video=f.video[videos],
                           frame_mask=f.frame_mask[videos], video_key=self.video_keys[videos], caption_row=rows,
                           video_row=videos)


class CachedBatches:
    """Iterates a :class:`~diffusionret.distributed.TrainSampler` in local batches of cached features:
    a drop-in for the training ``DataLoader`` (same samples, same order, resumable the same way).

    Args:
        cache: the cache, or the caches of N augmented views (:func:`ensure_view_caches`): epoch e
            (the sampler's) reads view ``e mod N``.
        sampler: the training sampler.
    """

    def __init__(self, cache: TrainFeatureCache | Sequence[TrainFeatureCache], sampler: Any) -> None:
        self.views = (cache,) if isinstance(cache, TrainFeatureCache) else tuple(cache)
        if not self.views:
            raise ValueError("CachedBatches needs at least one cache")
        self.sampler = sampler

    @property
    def cache(self) -> TrainFeatureCache:
        """The cache of the sampler's current epoch."""
        return self.views[self.sampler.epoch % len(self.views)]

    def __iter__(self) -> Iterator[CachedBatch | None]:
        cache = self.cache
        chunk: list[int] = []
        for index in self.sampler:
            chunk.append(index)
            if len(chunk) == self.sampler.local_batch:
                yield cache.batch(chunk)
                chunk = []
        if chunk:
            yield cache.batch(chunk)

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.local_batch
