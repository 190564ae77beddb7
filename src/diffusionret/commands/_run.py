"""What the run-config commands (``train``, ``eval``, ``extract``) share: config loading and the process group."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time so ``diffusionret --help`` stays fast
    from diffusionret.config import RunConfig
    from diffusionret.distributed import DistContext

logger = logging.getLogger(__name__)


def load_config(args: argparse.Namespace) -> "RunConfig | None":
    """``args.config`` with ``args.overrides`` applied; ``None`` (after logging why) when it is invalid."""
    from diffusionret.config import load_run_config
    from diffusionret.config_utils import ConfigError

    try:
        return load_run_config(args.config, args.overrides)
    except ConfigError as exc:
        logger.error("%s", exc)
        return None


def start_distributed(cfg: "RunConfig") -> "DistContext":
    """The process group of this run (a single process outside ``torchrun``) on ``train.device``."""
    from diffusionret.distributed import init_distributed

    return init_distributed(device=None if cfg.train.device == "auto" else cfg.train.device)
