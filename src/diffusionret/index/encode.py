"""``ModelVideoEncoder``: decode videos with PyAV and encode them with a DiffusionRet model.

Frames are prepared exactly as the evaluation dataset prepares them (``read_frames`` at the
model's image size, then :class:`~diffusionret.data.transforms.ClipTransform`), so a video's index
features equal the features evaluation computes for it. Decoding runs ahead of the model on a small
thread pool (PyAV releases the GIL while decoding), so the model rarely waits for the decoder.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from diffusionret.index.features import ExtractionFailure, ModelIdentity, VideoFeatures
from diffusionret.index.identity import model_identity

logger = logging.getLogger(__name__)

# Thumbnails are made from the middle sampled frame; below this short side (tiny test models decode
# 32 px frames) the middle of the clip is decoded again at this size.
THUMBNAIL_SHORT_SIDE = 180


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
        max_frames: T, frames per video.
        fps: sampling rate before reducing to T (``read_frames``).
        sampling: ``uniform``/``head``/``tail``/``reference`` (``read_frames``).
        batch_size: videos per forward pass.
        decode_workers: decoding threads.
        model_path: the checkpoint ``model`` came from (recorded in the index).
        identity: precomputed identity (skips hashing the weights).
    """

    def __init__(self, model: nn.Module, *, max_frames: int = 12, fps: float = 1.0, sampling: str = "uniform",
                 batch_size: int = 16, decode_workers: int = 2, model_path: str | None = None,
                 identity: ModelIdentity | None = None) -> None:
        if max_frames <= 0 or fps <= 0 or batch_size <= 0 or decode_workers <= 0:
            raise ValueError("max_frames, fps, batch_size and decode_workers must be positive")
        self.model = model.eval()
        self.max_frames = max_frames
        self.fps = float(fps)
        self.sampling = sampling
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.image_size = int(model.image_size)
        self.device = next(model.parameters()).device
        self._identity = identity or model_identity(model, str(Path(model_path).resolve()) if model_path else None)

    @classmethod
    def from_settings(cls, model: nn.Module, settings: dict[str, Any], **kwargs: Any) -> "ModelVideoEncoder":
        """An encoder that decodes exactly like the one that recorded ``settings`` (for ``index update``)."""
        if settings.get("extractor") != "diffusionret":
            raise ValueError(f"the index was not built by a model encoder (settings {settings})")
        return cls(model, max_frames=settings["max_frames"], fps=settings["fps"], sampling=settings["sampling"],
                   **kwargs)

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

    def extract(self, paths: Sequence[Path]) -> Iterator[VideoFeatures | ExtractionFailure]:
        """Decode ahead on threads, encode in batches; yields one result per path, in order."""
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="diffusionret-decode") as pool:
            # At most two batches decoded ahead: bounded memory, and the model never starves.
            queue: deque[Future] = deque()
            pending = iter(paths)
            for path in pending:
                queue.append(pool.submit(self.decode, path))
                if len(queue) >= 2 * self.batch_size:
                    break
            while queue:
                batch = [queue.popleft().result() for _ in range(min(self.batch_size, len(queue)))]
                for path in pending:
                    queue.append(pool.submit(self.decode, path))
                    if len(queue) >= 2 * self.batch_size:
                        break
                yield from self._encode(batch)

    def decode(self, path: Path) -> _Decoded | ExtractionFailure:
        """Frames (model input), facts and thumbnail of one video; a failure instead of raising."""
        from diffusionret.data.decode import probe_video, read_frames
        from diffusionret.data.errors import VideoDecodeError
        from diffusionret.data.transforms import ClipTransform

        try:
            info = probe_video(path)
            raw, _ = read_frames(path, fps=self.fps, max_frames=self.max_frames, size=self.image_size,
                                 sampling=self.sampling)
        except VideoDecodeError as exc:
            return ExtractionFailure(exc.cause)
        clip = ClipTransform(self.image_size)(raw)  # (n, 3, S, S)
        n = clip.shape[0]
        frames = torch.zeros(self.max_frames, 3, self.image_size, self.image_size)
        frames[:n] = clip
        mask = torch.arange(self.max_frames) < n
        thumbnail = self._thumbnail(path, raw, info.duration)
        return _Decoded(frames, mask, float(info.duration), int(info.width), int(info.height), thumbnail)

    def _thumbnail(self, path: Path, raw: np.ndarray, duration: float) -> bytes | None:
        from diffusionret.data.decode import read_frames
        from diffusionret.data.errors import VideoDecodeError

        frame = raw[len(raw) // 2]
        if min(frame.shape[:2]) < THUMBNAIL_SHORT_SIDE:
            try:
                again, _ = read_frames(path, fps=1.0, max_frames=1, start=duration / 2 if duration else None,
                                       size=None, sampling="head")
                frame = again[0]
            except VideoDecodeError:
                pass  # keep the small frame: a thumbnail is a convenience, not a reason to fail
        return jpeg_thumbnail(frame)

    @torch.no_grad()
    def _encode(self, batch: Sequence[_Decoded | ExtractionFailure]) -> list[VideoFeatures | ExtractionFailure]:
        good = [item for item in batch if isinstance(item, _Decoded)]
        features: list[Tensor] = []
        if good:
            frames = torch.stack([item.frames for item in good]).to(self.device)
            mask = torch.stack([item.mask for item in good]).long().to(self.device)
            features = list(self.model.encode_video(frames, mask).float().cpu())  # B x (T, D)
        results: list[VideoFeatures | ExtractionFailure] = []
        for item in batch:
            if isinstance(item, ExtractionFailure):
                results.append(item)
                continue
            video = features.pop(0)
            results.append(VideoFeatures(frames=video * item.mask[:, None], frame_mask=item.mask,
                                         duration=item.duration, thumbnail=item.thumbnail, width=item.width,
                                         height=item.height))
        return results


def checkpoint_data_settings(path: str | Path) -> dict[str, Any]:
    """Frame settings a checkpoint was trained with, if it records them (``data`` metadata key).

    Training writes ``{"max_frames": ..., "fps": ..., "sampling": ..., "max_words": ...}`` as JSON
    under ``data``; official checkpoints and older files record nothing (an empty dict).
    """
    import json

    from diffusionret.models.checkpoint import read_metadata

    try:
        raw = read_metadata(path).get("data")
    except Exception:  # noqa: BLE001 - not one of our safetensors files: nothing recorded
        return {}
    try:
        data = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def jpeg_thumbnail(frame: np.ndarray, short_side: int = THUMBNAIL_SHORT_SIDE, quality: int = 82) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes, short side at most ``short_side`` (aspect ratio kept)."""
    from PIL import Image

    image = Image.fromarray(frame)
    scale = short_side / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
