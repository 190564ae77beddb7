"""Alias of :mod:`diffusionret.evaluation.metrics` so that ``diffusionret.metrics.retrieval_metrics`` works."""

from diffusionret.evaluation.metrics import *  # noqa: F401,F403
from diffusionret.evaluation.metrics import __all__  # noqa: F401
