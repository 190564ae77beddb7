"""Helpers shared by the benchmark scripts (timing, machine description, result lines)."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable

import torch


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


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


def report(name: str, **values: object) -> None:
    """Print a human line and a JSON line (for BENCHMARKS.md and scripts)."""
    human = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"{name}: {human}")
    print("JSON " + json.dumps({"benchmark": name, **values}))
