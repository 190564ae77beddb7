"""``diffusionret train --config FILE [key=value ...]``: train stage 1 or 2 (``stage:`` in the config).

Single process: ``diffusionret train --config configs/msrvtt/stage1.yaml``. Several GPUs or machines:
``torchrun --nproc_per_node 4 [--nnodes 2 --node_rank R --rdzv_endpoint HOST:PORT] -m diffusionret
train --config ...`` (NCCL on GPUs, gloo on CPU). ``--resume`` continues a killed run from
``<output_dir>/checkpoints/last.pt``. While training, ``kill -USR1 <pid>`` writes a checkpoint after
the current step and ``kill -TERM <pid>`` writes one and stops (resume later with ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from diffusionret.commands._common import emit, load_config, start_distributed

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the discrimination (stage 1) or generation (stage 2) stage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=1 data.batch_size=64")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from checkpoints/last.pt")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this trainer checkpoint")
    parser.set_defaults(func=run)


def _attach_log_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _install_signal_handlers(save: threading.Event, stop: threading.Event) -> dict[int, object]:
    """SIGUSR1 -> checkpoint after this step; SIGTERM -> checkpoint and stop. Returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # handlers can only be installed from the main thread
    previous = {}
    if hasattr(signal, "SIGUSR1"):
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: save.set())
    previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return previous


def run(args: argparse.Namespace) -> int:
    from diffusionret.data.errors import MissingVideosError
    from diffusionret.distributed import destroy_distributed
    from diffusionret.training.loop import TrainingStopped, train

    cfg = load_config(args)
    if cfg is None:
        return 2
    ctx = start_distributed(cfg)
    handler = _attach_log_file(Path(cfg.output_dir) / "train.log") if ctx.is_main else None
    save, stop = threading.Event(), threading.Event()
    previous = _install_signal_handlers(save, stop)
    resume = args.resume_from or bool(args.resume)
    try:
        model_path = train(cfg, dist=ctx, resume=resume, save_request=save, stop_request=stop)
    except TrainingStopped as exc:
        logger.warning("%s", exc)
        return 143
    except (MissingVideosError, FileExistsError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 1
    finally:
        for signum, old in previous.items():  # callers (tests, notebooks) get their handlers back
            if old is not None:
                signal.signal(signum, old)
        destroy_distributed(ctx)
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if ctx.is_main:
        emit(f"model: {model_path}")
        emit(f"run folder: {cfg.output_dir}")
    return 0
