"""Deterministic stand-ins for the model side of an index, for tests, benchmarks and dry runs.

:class:`SyntheticExtractor` derives a video's features from its file name and bytes without
decoding: each word of the file stem contributes a fixed random direction, so a query naming
those words (embedded by :func:`synthetic_text_embedding`) finds the file. Nothing here is used by
the real pipeline.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusionret.index.features import ExtractionFailure, ModelIdentity, VideoFeatures
from diffusionret.index.searcher import SearchHit
from diffusionret.index.store import VideoIndex

BROKEN_MARKER = b"BROKEN"


def _seed(*parts: bytes | str) -> int:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return int.from_bytes(digest.digest()[:8], "little")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def synthetic_word_vector(word: str, dim: int, seed: int = 0) -> Tensor:
    """(D,) a fixed unit vector per word."""
    generator = torch.Generator().manual_seed(_seed("word", str(seed), word))
    return F.normalize(torch.randn(dim, generator=generator), dim=0)


def synthetic_text_embedding(text: str, dim: int, seed: int = 0) -> Tensor:
    """(D,) unit vector: the normalised sum of the word vectors of ``text`` (zero for no words)."""
    vectors = [synthetic_word_vector(w, dim, seed) for w in _words(text)]
    if not vectors:
        return torch.zeros(dim)
    return F.normalize(torch.stack(vectors).sum(0), dim=0)


def solid_jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 36)) -> bytes:
    """A small single-colour JPEG (a stand-in thumbnail)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@dataclass
class SyntheticExtractor:
    """A :class:`~diffusionret.index.features.FeatureExtractor` that needs no model and no decoder.

    Features of a file depend only on its name and bytes (so a changed file gets new features); a
    file whose bytes start with ``BROKEN`` fails like an undecodable video.

    Attributes:
        frames: T.
        dim: D.
        seed: changes the "model" (and so the identity).
        delay_s: sleep per video (to make a build slow enough to interrupt).
        on_video: called with each path before it is "encoded" (fault injection).
        decode_media: take the thumbnail (middle frame) and duration from the real video (PyAV)
            instead of a solid colour and a size-derived duration.
        with_weights: also provide stand-in WTI frame weights (:meth:`frame_weights`), which the
            index then stores, as it does with a model's.
    """

    frames: int = 4
    dim: int = 16
    seed: int = 0
    delay_s: float = 0.0
    on_video: Callable[[Path], None] | None = None
    decode_media: bool = False
    with_weights: bool = False

    @property
    def identity(self) -> ModelIdentity:
        model_id = hashlib.sha256(f"synthetic:{self.seed}:{self.frames}:{self.dim}".encode()).hexdigest()
        return ModelIdentity(model_id=model_id, config={"synthetic": self.seed}, path=None)

    @property
    def settings(self) -> dict[str, Any]:
        return {"extractor": "synthetic", "num_frames": self.frames}

    @property
    def num_frames(self) -> int:
        return self.frames

    @property
    def embed_dim(self) -> int:
        return self.dim

    def frame_weights(self, frames: Tensor, frame_mask: Tensor) -> Tensor | None:
        """With ``with_weights``: a deterministic stand-in for the WTI frame weights (softmax over real frames)."""
        if not self.with_weights:
            return None
        direction = synthetic_word_vector("frame weights", self.dim, self.seed)
        logits = (frames.float() @ direction).masked_fill(~frame_mask.bool(), -9e15)
        return torch.softmax(logits, dim=-1)

    def extract(self, paths: Sequence[Path]) -> Iterator[VideoFeatures | ExtractionFailure]:
        for path in paths:
            if self.on_video is not None:
                self.on_video(path)
            if self.delay_s:
                time.sleep(self.delay_s)
            yield self.features(path)

    def features(self, path: Path) -> VideoFeatures | ExtractionFailure:
        data = Path(path).read_bytes()
        if data.startswith(BROKEN_MARKER):
            return ExtractionFailure("synthetic decode error")
        generator = torch.Generator().manual_seed(_seed(str(self.seed), data, Path(path).name))
        base = synthetic_text_embedding(Path(path).stem.replace("_", " "), self.dim, self.seed)
        frames = base + 0.3 * torch.randn(self.frames, self.dim, generator=generator)
        real = 1 + int(torch.randint(0, self.frames, (1,), generator=generator))
        mask = torch.arange(self.frames) < real
        frames = frames * mask[:, None]
        rgb = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator))
        if self.decode_media:
            return self._with_media(Path(path), frames, mask)
        return VideoFeatures(frames=frames, frame_mask=mask, duration=round(len(data) / 1000.0, 3),
                             thumbnail=solid_jpeg(rgb), width=64, height=36)

    @staticmethod
    def _with_media(path: Path, frames: Tensor, mask: Tensor) -> VideoFeatures:
        from diffusionret.data.decode import probe_video, read_frames
        from diffusionret.index.decode_job import jpeg_thumbnail

        info = probe_video(path)
        images, _ = read_frames(path, fps=4.0, max_frames=3, size=None)
        return VideoFeatures(frames=frames, frame_mask=mask, duration=float(info.duration),
                             thumbnail=jpeg_thumbnail(images[len(images) // 2]), width=info.width, height=info.height)


class SyntheticSearcher:
    """A search backend over an index built by :class:`SyntheticExtractor` (first stage only).

    Implements the protocol :func:`diffusionret.serve.app.create_app` expects, so the HTTP API and
    the web page can be tested without a model.
    """

    def __init__(self, index: VideoIndex, seed: int = 0, delay_s: float = 0.0) -> None:
        self.index = index
        self.seed = seed
        self.delay_s = delay_s

    def search(self, query: str, k: int = 10) -> list[SearchHit]:
        if self.delay_s:
            time.sleep(self.delay_s)
        embedding = synthetic_text_embedding(query, self.index.info.embed_dim, self.seed)
        scores, rows = self.index.search(embedding[None], k)
        hits = []
        for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist(), strict=True), start=1):
            record = self.index.records[row]
            hits.append(SearchHit(rank=rank, score=score, record=record, stage_scores={"coarse": score}))
        return hits

    def describe(self) -> dict[str, Any]:
        return {"videos": len(self.index), "model_id": self.index.model_id, "model_path": None,
                "candidates": len(self.index), "rerank_top_k": 0}

