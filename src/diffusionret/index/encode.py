"""``ModelVideoEncoder``: decode videos with PyAV and encode them with a DiffusionRet model.

Frames are prepared exactly as the evaluation dataset prepares them (``read_frames`` at the
model's image size, then :class:`~diffusionret.data.transforms.ClipTransform`), so a video's index
features equal the features evaluation computes for it. Decoding runs in worker processes
(:class:`~diffusionret.data.isolate.IsolatedPool`), each file under a time and memory budget: a
hostile file fails on its own (recorded in the index with its error) instead of hanging the build.
Segmented files are decoded along their whole timeline in the same workers, under the same memory
budget and a time budget that follows their progress (:mod:`~diffusionret.index.segment_job`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from diffusionret.data.isolate import MEMORY, SPEED, STALL, TIME, DecodeBudget, IsolatedPool, JobFailed
from diffusionret.index.decode_job import DecodedVideo, DecodeRequest, decode_for_index
from diffusionret.index.features import ExtractionFailure, ModelIdentity, SegmentedFeatures, VideoFeatures
from diffusionret.index.identity import model_identity
from diffusionret.index.segment_job import MAX_TIMELINE_S, DecodedTimeline, SegmentRequest, decode_any
from diffusionret.index.segments import SegmentConfig
from diffusionret.models.config import InputConfig

logger = logging.getLogger(__name__)


@dataclass
class _Decoded:
    frames: Tensor  # (T, 3, S, S) float32, zero-padded
    mask: Tensor  # (T,) bool
    duration: float | None
    width: int | None
    height: int | None
    thumbnail: bytes | None


class ModelVideoEncoder:
    """A :class:`~diffusionret.index.features.FeatureExtractor` backed by a DiffusionRet model.

    Args:
        model: the model (eval mode; its device is used).
        input_config: frames per video, sampling rate and method (``read_frames``); normally the
            model's recorded :class:`~diffusionret.models.config.InputConfig`, default the reference's.
            Frames are always decoded at the model's image size.
        batch_size: videos per forward pass.
        decode_workers: decoding worker processes (started on first use, reused until :meth:`close`).
        model_path: the checkpoint ``model`` came from (recorded in the index).
        identity: precomputed identity (skips hashing the weights).
        budget: time and memory each file may take to decode: a clip within ``timeout_s``; a segmented
            file's timeline (and shot detection) without a stall of ``timeout_s`` and at
            ``min_speed`` or faster (:class:`~diffusionret.data.isolate.JobWatch`).
        max_timeline_s: a segmented file whose frames run past this many seconds fails (a timestamp
            jumping years ahead would otherwise repeat one frame for every ``1 / fps`` of the gap).
        decode_job: the workers' job (default :func:`~diffusionret.index.segment_job.decode_any`; tests
            substitute a slowed one). A module-level function ``(request, progress) -> result``.
    """

    def __init__(self, model: nn.Module, input_config: InputConfig | None = None, *, batch_size: int = 16,
                 decode_workers: int = 2, model_path: str | None = None, identity: ModelIdentity | None = None,
                 budget: DecodeBudget | None = None, max_timeline_s: float = MAX_TIMELINE_S,
                 decode_job: Callable[..., Any] = decode_any) -> None:
        if batch_size <= 0 or decode_workers <= 0 or not max_timeline_s > 0:
            raise ValueError("batch_size, decode_workers and max_timeline_s must be positive")
        self.image_size = int(model.image_size)
        input_config = input_config or InputConfig.for_image_size(self.image_size)
        self.model = model.eval()
        self.input_config = input_config
        self.max_frames = input_config.max_frames
        self.fps = input_config.fps
        self.sampling = input_config.sampling
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.max_timeline_s = max_timeline_s
        self.device = next(model.parameters()).device
        self._identity = identity or model_identity(model, str(Path(model_path).resolve()) if model_path else None)
        self._pool = IsolatedPool(decode_job, workers=decode_workers, budget=budget, progress=True)
        # Workers also stop when this encoder is collected or the interpreter exits without close().
        self._finalizer = weakref.finalize(self, self._pool.close)

    @classmethod
    def from_settings(cls, model: nn.Module, settings: dict[str, Any], **kwargs: Any) -> "ModelVideoEncoder":
        """An encoder that decodes exactly like the one that recorded ``settings`` (for ``index update``)."""
        if settings.get("extractor") != "diffusionret":
            raise ValueError(f"the index was not built by a model encoder (settings {settings})")
        input_config = InputConfig.for_image_size(int(model.image_size)).replace(
            max_frames=settings["max_frames"], fps=settings["fps"], sampling=settings["sampling"])
        return cls(model, input_config, **kwargs)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def settings(self) -> dict[str, Any]:
        return {"extractor": "diffusionret", "max_frames": self.max_frames, "fps": self.fps,
                "sampling": self.sampling, "image_size": self.image_size}

    @property
    def num_frames(self) -> int:
        return self.max_frames

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @torch.no_grad()
    def frame_weights(self, frames: Tensor, frame_mask: Tensor) -> Tensor | None:
        """The WTI head's video-side weights of stored features: (N, T, D) fp16, (N, T) -> (N, T) float32.

        Computed from the fp16 features the index stores, exactly as a query computes them from
        the gathered features, so stored and query-time weights agree. ``None`` for a model
        without ``frame_weights``.
        """
        compute = getattr(self.model, "frame_weights", None)
        if compute is None:
            return None
        return compute(frames.to(self.device), frame_mask.long().to(self.device)).float().cpu()

    def close(self) -> None:
        """Stop the decoding worker processes."""
        self._finalizer()

    def extract(self, paths: Sequence[Path]) -> Iterator[VideoFeatures | ExtractionFailure]:
        """Decode in worker processes, encode in batches; yields one result per path, in order.

        A file fails on its own (an :class:`ExtractionFailure` with the reason) whatever goes wrong
        with it: a decode error, any other exception, the time or memory budget, a decoder crash.
        """
        requests = [DecodeRequest(str(p), self.fps, self.max_frames, self.image_size, self.sampling) for p in paths]
        yield from self._in_batches(self._prepare(Path(path), result)
                                    for path, result in zip(paths, self._pool.map(requests), strict=True))

    def extract_segments(self, paths: Sequence[Path],
                         config: SegmentConfig) -> Iterator[SegmentedFeatures | ExtractionFailure]:
        """Segment features of each video (decode once, image tower once per frame; see
        :mod:`~diffusionret.index.segment_encode`); yields one result per path, in order.

        Every file is decoded in a worker process under the decode budget, as in :meth:`extract`:
        the whole timeline of a segmented file (and its shot detection) included, so a file that
        fails, hangs or exhausts memory there is recorded as failed with its reason. The timeline's
        time budget follows its progress (a long recording is not killed for being long, one that
        stalls or decodes too slowly is). In ``auto`` mode
        a video no longer than :data:`~diffusionret.index.segments.AUTO_WHOLE_FACTOR` windows (by its
        probed duration) is decoded and encoded exactly as :meth:`extract` does (a
        :class:`VideoFeatures`, stored as a whole-video row). The other videos' timeline frames come
        back through a scratch folder (under the system's temporary folder, ``$TMPDIR``; at most
        one per worker plus the one being encoded), deleted as soon as the file is encoded.

        Args:
            paths: the videos.
            config: a resolved segmentation (:meth:`SegmentConfig.resolved`).
        """
        if config.window is None:
            raise ValueError("resolve the segment config against the model's trained span first")
        with tempfile.TemporaryDirectory(prefix="diffusionret-segments-") as scratch:
            requests = [SegmentRequest(DecodeRequest(str(p), self.fps, self.max_frames, self.image_size, self.sampling),
                                       config, str(Path(scratch) / str(i)), max_duration=self.max_timeline_s)
                        for i, p in enumerate(paths)]

            def prepared() -> Iterator[_Decoded | SegmentedFeatures | ExtractionFailure]:
                for path, request, decoded in zip(paths, requests, self._pool.map(requests), strict=True):
                    try:
                        if isinstance(decoded, DecodedTimeline):
                            item = self._segment(decoded)
                        else:
                            item = self._prepare(Path(path), decoded)
                    finally:
                        shutil.rmtree(request.workdir, ignore_errors=True)  # whatever the worker got to write
                    yield item

            yield from self._in_batches(prepared())

    def _segment(self, decoded: DecodedTimeline) -> SegmentedFeatures | ExtractionFailure:
        """Encode a worker-decoded timeline: image tower per frame, temporal module per planned segment."""
        from diffusionret.index.segment_encode import EncodedTimeline, encode_frame_batches, encode_segments
        from diffusionret.index.segment_job import stored_batches
        from diffusionret.index.segments import Segment

        try:
            features = encode_frame_batches(self.model, stored_batches(decoded))
            timeline = EncodedTimeline(features=features, times=decoded.times, fps=self.fps,
                                       duration=decoded.duration, header_duration=decoded.header_duration,
                                       width=decoded.width, height=decoded.height)
            spans = [Segment(start, end) for start, end in decoded.spans]
            frames, mask = encode_segments(self.model, timeline, spans, self.max_frames, sampling=self.sampling)
        except Exception as exc:  # noqa: BLE001 - one bad file fails alone, as in extract()
            return ExtractionFailure(_describe_failure(exc))
        return SegmentedFeatures(spans=list(decoded.spans), frames=frames, frame_mask=mask, duration=decoded.duration,
                                 thumbnails=list(decoded.thumbnails), width=decoded.width, height=decoded.height)

    def decode(self, path: Path) -> _Decoded | ExtractionFailure:
        """Frames (model input), facts and thumbnail of one video, decoded in this process (no budget)."""
        try:
            result: DecodedVideo | JobFailed = decode_for_index(
                DecodeRequest(str(path), self.fps, self.max_frames, self.image_size, self.sampling))
        except Exception as exc:  # noqa: BLE001 - a failure instead of raising, as extract() gives
            result = JobFailed(_describe_failure(exc))
        return self._prepare(Path(path), result)

    def _prepare(self, path: Path, result: DecodedVideo | JobFailed) -> _Decoded | ExtractionFailure:
        """Worker output -> model input: (T, 3, S, S) normalised, zero-padded frames and their mask."""
        from diffusionret.data.transforms import ClipTransform

        if isinstance(result, JobFailed):
            cause = _cause(path, result.error)
            return ExtractionFailure(f"{cause}; {_ADVICE[result.limit]}" if result.limit in _ADVICE else cause)
        try:
            clip = ClipTransform(self.image_size)(result.frames)  # (n, 3, S, S)
        except Exception as exc:  # noqa: BLE001 - odd frames are this file's problem, not the build's
            return ExtractionFailure(_describe_failure(exc))
        n = clip.shape[0]
        frames = torch.zeros(self.max_frames, 3, self.image_size, self.image_size)
        frames[:n] = clip
        mask = torch.arange(self.max_frames) < n
        return _Decoded(frames, mask, result.duration, result.width, result.height, result.thumbnail)

    def _in_batches(self, items: Iterable[_Decoded | SegmentedFeatures | ExtractionFailure],
                    ) -> Iterator[VideoFeatures | SegmentedFeatures | ExtractionFailure]:
        """:meth:`_encode` ``items`` ``batch_size`` at a time, as they come; one result per item, in order."""
        batch: list[_Decoded | SegmentedFeatures | ExtractionFailure] = []
        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._encode(batch)
                batch = []
        if batch:
            yield from self._encode(batch)

    @torch.no_grad()
    def _encode(self, batch: Sequence[_Decoded | SegmentedFeatures | ExtractionFailure],
                ) -> list[VideoFeatures | SegmentedFeatures | ExtractionFailure]:
        """Encode the decoded clips of ``batch`` in one pass; failures and segmented results pass through."""
        good = [item for item in batch if isinstance(item, _Decoded)]
        features: list[Tensor] = []
        if good:
            frames = torch.stack([item.frames for item in good]).to(self.device)
            mask = torch.stack([item.mask for item in good]).long().to(self.device)
            features = list(self.model.encode_video(frames, mask).float().cpu())  # B x (T, D)
        results: list[VideoFeatures | SegmentedFeatures | ExtractionFailure] = []
        for item in batch:
            if not isinstance(item, _Decoded):
                results.append(item)
                continue
            video = features.pop(0)
            results.append(VideoFeatures(frames=video * item.mask[:, None], frame_mask=item.mask,
                                         duration=item.duration, thumbnail=item.thumbnail, width=item.width,
                                         height=item.height))
        return results


# What to change when a file exceeds one of the decode budget's limits (the index command's options).
_ADVICE = {
    TIME: "raise --decode-timeout to allow more",
    STALL: "raise --decode-timeout if the decoder is only slow (a segmented video's timeline may go that long "
           "without progress)",
    SPEED: "lower --decode-min-speed (or raise --decode-timeout, its head start) if this machine decodes the "
           "file that slowly",
    MEMORY: "raise --decode-memory to allow more",
}


def _describe_failure(exc: BaseException) -> str:
    from diffusionret.data.errors import VideoDecodeError

    return exc.cause if isinstance(exc, VideoDecodeError) else f"{type(exc).__name__}: {exc}"


def _cause(path: Path, error: str) -> str:
    """The reason without the file name a ``VideoDecodeError`` message starts with (the catalogue has the path)."""
    prefix = f"VideoDecodeError: {path}: "
    return error[len(prefix):] if error.startswith(prefix) else error
