"""Helpers shared by the benchmark scripts (timing, machine description, memory, result lines).

Every script prints a human line and a ``JSON {...}`` line per result; both carry the 1-minute
load average at the time of the measurement (``load_1m``), because the machine the numbers in
BENCHMARKS.md come from is shared and timings move with its load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from diffusionret.models.diffusionret import DiffusionRet

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Real tokens (SOT and EOT included, max_words 32) of the 1,000 MSR-VTT 1k-A test captions, in
#: the order of the test list; recomputed by ``python benchmarks/_common.py caption-lengths``.
MSRVTT_LENGTHS_FILE = Path(__file__).resolve().parent / "data" / "msrvtt_1ka_caption_lengths.txt"
MSRVTT_TEST_LIST = REPO_ROOT / "tests" / "data" / "msrvtt" / "MSRVTT_JSFUSION_test.csv"


def compute_msrvtt_caption_lengths(csv_path: Path = MSRVTT_TEST_LIST, max_words: int = 32) -> list[int]:
    """Valid tokens per caption of the MSR-VTT 1k-A test list, with the project's tokenizer.

    Counts what the text mask counts: SOT, the BPE tokens (truncated as the reference truncates)
    and EOT, so a caption has between 2 and ``max_words`` tokens.
    """
    import csv

    from diffusionret import tokenize

    with open(csv_path, newline="") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f)]
    _, mask = tokenize(sentences, max_words=max_words)
    return mask.sum(dim=1).tolist()


def msrvtt_caption_lengths() -> torch.Tensor:
    """The shipped MSR-VTT 1k-A caption lengths (1,000 integers), as an int64 tensor."""
    return torch.tensor([int(line) for line in MSRVTT_LENGTHS_FILE.read_text().split()], dtype=torch.long)


def caption_lengths(n: int, distribution: str, max_words: int = 32,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) real caption lengths drawn from ``distribution``.

    ``msrvtt``: the 1k-A test lengths (capped at ``max_words``), repeated as often as needed and
    shuffled, so any n has the same distribution (n = 1000 is exactly the test set's).
    ``uniform``: uniform integers from 5 to 31 (capped at ``max_words``).
    """
    if distribution == "msrvtt":
        base = msrvtt_caption_lengths().clamp(max=max_words)
        reps = -(-n // len(base))
        return base.repeat(reps)[torch.randperm(reps * len(base), generator=generator)[:n]]
    if distribution == "uniform":
        return torch.randint(5, 32, (n,), generator=generator).clamp(max=max_words)
    raise ValueError(f"unknown caption length distribution {distribution!r} (msrvtt or uniform)")


def head_model(dim: int, *, denoisers: bool, text_layers: int = 1, vocab_size: int = 1000,
               generator: torch.Generator | None = None) -> "DiffusionRet":
    """A model whose WTI head (and denoisers) have full width ``dim`` on a token CLIP (eval mode).

    The benchmarks time the head, the re-ranking or the text tower; a 32-pixel, one-layer vision
    tower keeps construction cheap. Initialised from ``generator`` (default: the global RNG).
    """
    from diffusionret.models.config import ClipConfig, ModelConfig
    from diffusionret.models.diffusionret import DiffusionRet

    clip = ClipConfig(embed_dim=dim, image_size=32, vision_width=64, vision_layers=1, vision_patch_size=16,
                      text_width=dim, text_layers=text_layers, vocab_size=vocab_size)
    return DiffusionRet(ModelConfig(clip=clip, denoisers=denoisers, temporal_layers=1), generator=generator).eval()


def add_lengths_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", choices=("msrvtt", "uniform"), default="msrvtt",
                        help="caption length distribution: the MSR-VTT 1k-A test captions' real lengths "
                             "(default, benchmarks/data/msrvtt_1ka_caption_lengths.txt) or uniform 5-31 tokens")


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load_text()}")


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (``uptime``)."""
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return (math.nan, math.nan, math.nan)


def load_text() -> str:
    return " ".join(f"{v:.2f}" for v in load_average())


def add_thread_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default, one per core)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def parse_bench_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Add ``--threads``, parse, set torch's thread count and seed torch with 0: every benchmark's start."""
    add_thread_arg(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    torch.manual_seed(0)
    return args


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time in seconds over ``repeat`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    """This machine's measured float32 matmul throughput (GFLOP/s) on an n x n x n product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = timeit(lambda: a @ b, repeat=repeat)
    return 2 * n**3 / seconds / 1e9


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def proc_status_kib(*keys: str) -> dict[str, int]:
    """KiB figures of this process from ``/proc/self/status`` (Linux), e.g. ``"RssAnon", "RssFile"``."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0])
    return out


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a background thread.

    torch releases the GIL inside its kernels, so a 1 ms poll of ``/proc/self/statm`` sees the
    working set of the measured code (allocations shorter than a millisecond can be missed).

        with PeakRSS() as mem:
            work()
        mem.peak_mib  # MiB above the RSS at entry
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def report(name: str, **values: object) -> None:
    """Print a human line and a JSON line (for BENCHMARKS.md and scripts), with the current load average."""
    values = {**values, "load_1m": round(load_average()[0], 2)}
    human = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"{name}: {human}", flush=True)
    print("JSON " + json.dumps({"benchmark": name, **values}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Helpers for the benchmarks. caption-lengths: recompute "
                                     f"{MSRVTT_LENGTHS_FILE.relative_to(REPO_ROOT)} from the MSR-VTT 1k-A test list.")
    parser.add_argument("command", choices=("caption-lengths",))
    parser.parse_args()
    lengths = compute_msrvtt_caption_lengths()
    MSRVTT_LENGTHS_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = MSRVTT_LENGTHS_FILE.with_suffix(".tmp")
    tmp.write_text("".join(f"{n}\n" for n in lengths))
    os.replace(tmp, MSRVTT_LENGTHS_FILE)
    mean = sum(lengths) / len(lengths)
    print(f"{MSRVTT_LENGTHS_FILE}: {len(lengths)} captions, mean {mean:.3f} tokens (SOT and EOT included), "
          f"max {max(lengths)}")
