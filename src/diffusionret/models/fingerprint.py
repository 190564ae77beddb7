"""The identity of a model: one digest of its architecture config and weights.

An index and a features cache store vectors from one model; using them with another model compares
vectors from two unrelated spaces and returns confident nonsense. Both compare this digest.

The digest is stable across versions of this project: the config enters it in the shape earlier
versions hashed (``stage`` rather than ``denoisers``, no sampler keys), so an index built before the
sampler left the model config still matches the same weights.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from diffusionret.config_utils import to_dict


def identity_config(model: nn.Module) -> dict[str, Any]:
    """The architecture config that enters the digest, in its canonical (version-stable) shape."""
    config = getattr(model, "config", None)
    data = to_dict(config) if config is not None else {}
    if not isinstance(data, dict):
        return {"config": repr(config)}
    if "denoisers" in data:
        # Canonical form = the first release's: ``stage`` names whether the model has denoisers.
        data["stage"] = "generation" if data.pop("denoisers") else "discrimination"
    return data


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
