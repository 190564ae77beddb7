"""Ties an index to its model: the model digest (:mod:`diffusionret.models.fingerprint`) as recorded.

An index stores features from one model; searching it with another model compares vectors from
two unrelated spaces and returns confident nonsense. The digest makes that a hard error.
"""

from __future__ import annotations

from torch import nn

from diffusionret.index.features import ModelIdentity
from diffusionret.models.fingerprint import identity_config, model_fingerprint

__all__ = ["ModelMismatchError", "identity_config", "model_fingerprint", "model_identity"]


class ModelMismatchError(RuntimeError):
    """An index was built by a different model than the one asked to query or extend it."""


def model_identity(model: nn.Module, path: str | None = None) -> ModelIdentity:
    """The :class:`ModelIdentity` of ``model`` (loaded from ``path``, when given)."""
    return ModelIdentity(model_id=model_fingerprint(model), config=identity_config(model), path=path)
