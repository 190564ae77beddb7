"""diffusionret: generative text-video retrieval (DiffusionRet, ICCV 2023) as real software.

Public API (imported lazily so that ``import diffusionret`` stays light):

- :func:`load_model` / :func:`load_checkpoint` — any checkpoint (official ``.pth``, this project's
  safetensors, a training run's ``last.pt``); ``load_checkpoint`` also returns the recorded
  :class:`InputConfig` and diffusion schedule.
- :func:`save_model` — write a model as safetensors + JSON configs.
- :class:`Reranker`, :class:`RerankConfig` — diffusion re-ranking with a model's denoisers.
- :func:`build_model` — a fresh model from a :class:`ModelConfig` (optionally from CLIP weights).
- :func:`tokenize` — CLIP BPE tokenisation with the reference's truncation and padding.
- :mod:`diffusionret.metrics` — retrieval metrics.
- :class:`VideoIndex`, :class:`Searcher` — on-disk video index and cascade search;
  :func:`build_index`, :func:`update_index` — write one.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffusionret.version import __version__

_LAZY = {
    "load_model": "diffusionret.models.checkpoint",
    "load_checkpoint": "diffusionret.models.checkpoint",
    "InputConfig": "diffusionret.models.config",
    "Reranker": "diffusionret.retrieval",
    "RerankConfig": "diffusionret.retrieval",
    "save_model": "diffusionret.models.checkpoint",
    "build_model": "diffusionret.models.factory",
    "ModelConfig": "diffusionret.models.config",
    "DiffusionRet": "diffusionret.models.diffusionret",
    "tokenize": "diffusionret.tokenizer",
    "VideoIndex": "diffusionret.index.store",
    "Searcher": "diffusionret.index.searcher",
    "build_index": "diffusionret.index.builder",
    "update_index": "diffusionret.index.builder",
}

__all__ = sorted([*_LAZY, "metrics", "__version__"])


def __getattr__(name: str) -> Any:
    if name == "metrics":
        return importlib.import_module("diffusionret.evaluation.metrics")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffusionret' has no attribute {name!r}")
