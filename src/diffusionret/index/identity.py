"""The identity of a model: a digest of its architecture config and weights.

An index stores features from one model; searching it with another model compares vectors from
two unrelated spaces and returns confident nonsense. The digest makes that a hard error.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from diffusionret.config_utils import to_dict
from diffusionret.index.features import ModelIdentity

# Sampler settings chosen at load time (``load_model(diffusion_steps=..., noise_schedule=...)``):
# they change how re-ranking samples, not the weights or the stored features.
_RUNTIME_ONLY_KEYS = ("diffusion_steps", "noise_schedule")


class ModelMismatchError(RuntimeError):
    """An index was built by a different model than the one asked to query or extend it."""


def identity_config(model: nn.Module) -> dict[str, Any]:
    """The architecture config that enters the digest (runtime-only sampler keys removed)."""
    config = getattr(model, "config", None)
    data = to_dict(config) if config is not None else {}
    if not isinstance(data, dict):
        data = {"config": repr(config)}
    return {k: v for k, v in data.items() if k not in _RUNTIME_ONLY_KEYS}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex digest over the config and every state-dict tensor (name, dtype, shape, bytes).

    Hashing the state dict rather than a checkpoint file makes the identity independent of how the
    model was stored (file metadata, tensor order) while still covering every weight. Weights are
    hashed as held in memory: the same checkpoint cast to another dtype is another model.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(identity_config(model), sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: nn.Module, path: str | None = None) -> ModelIdentity:
    """The :class:`ModelIdentity` of ``model`` (loaded from ``path``, when given)."""
    return ModelIdentity(model_id=model_fingerprint(model), config=identity_config(model), path=path)
