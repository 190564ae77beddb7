"""Run an untrusted job (decoding a video someone else made) in worker processes under a budget.

A hostile or broken file can make FFmpeg loop for hours, allocate without bound or crash the
process. :class:`IsolatedPool` runs ``func(item)`` in long-lived worker processes (started once,
reused for every item, so normal work pays no per-file start-up), each with an address-space limit
(``RLIMIT_AS``), and kills a worker whose job outlives the time budget. Whatever goes wrong with one
item (an exception, the time or memory budget, a crash of the worker) comes back as a
:class:`JobFailed` for that item; the pool replaces the worker and goes on with the next.

Workers are started with ``forkserver`` (``spawn`` where that is missing), never by forking a parent
that may hold threads (torch, decoder pools), and they exit when the parent's end of their pipe
closes, so a parent killed with SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DecodeBudget", "IsolatedPool", "JobFailed"]


@dataclass(frozen=True)
class DecodeBudget:
    """What one job may use.

    Attributes:
        timeout_s: wall-clock seconds per item; a worker still busy after that is killed.
        memory_bytes: address-space limit of each worker process (``None``: no limit). Virtual
            memory, so it must leave room for the libraries' mappings (about 1 GiB with PyAV).
    """

    timeout_s: float = 120.0
    memory_bytes: int | None = 4 * 2**30

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"the decode timeout must be positive, got {self.timeout_s}")
        if self.memory_bytes is not None and self.memory_bytes < 2**28:
            raise ValueError(f"the decode memory budget must be at least 256 MiB, got {self.memory_bytes} bytes")


@dataclass(frozen=True)
class JobFailed:
    """One item's job failed; ``error`` says how (the exception, the budget it exceeded, or the crash)."""

    error: str


_READY = "ready"
# Starting a worker imports NumPy and the job's module (a second or two on a busy machine).
_START_TIMEOUT_S = 120.0


def _limit_memory(memory_bytes: int | None) -> None:
    if memory_bytes is None:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _limit_malloc_arenas() -> None:
    """Each decoder thread would get its own glibc malloc arena (64 MiB of address space each, counted
    by RLIMIT_AS though never used); two are plenty for one decode at a time. Best effort."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _worker_main(conn: Connection, func: Callable[[Any], Any], memory_bytes: int | None) -> None:
    """Serve jobs until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_malloc_arenas()
    _limit_memory(memory_bytes)
    conn.send(_READY)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[bool, Any] = (True, func(item))
        except MemoryError:
            reply = (False, "out of memory (over the decode memory budget)")
        except BaseException as exc:  # noqa: BLE001 - every failure is the item's, reported to the parent
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except MemoryError:
            conn.send((False, "out of memory (over the decode memory budget)"))
        except (EOFError, OSError, BrokenPipeError):
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle
            conn.send((False, f"cannot return the result: {type(exc).__name__}: {exc}"))


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class _Worker:
    def __init__(self, func: Callable[[Any], Any], budget: DecodeBudget) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, func, budget.memory_bytes),
                                   name="diffusionret-decode", daemon=True)
        self.process.start()
        child.close()
        self.job: int | None = None  # position of the item it is working on
        self.deadline = 0.0
        # A worker that cannot start (e.g. its interpreter cannot import the job) fails the run, not
        # every file: no file would decode in it.
        try:
            ready = self.conn.poll(_START_TIMEOUT_S) and self.conn.recv() == _READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"a decoding worker process did not start (exit status {self.process.exitcode}); "
                               "see its error above")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        self.conn.close()  # the worker sees EOF and returns
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.kill()


class IsolatedPool:
    """``func`` applied to items in worker processes, each item under ``budget``.

    Args:
        func: a module-level function (it is pickled by reference) taking one picklable item and
            returning a picklable result.
        workers: worker processes (started on first use, reused).
        budget: time and memory per item.
        clock: monotonic seconds (tests may substitute it).
    """

    def __init__(self, func: Callable[[Any], Any], *, workers: int = 2, budget: DecodeBudget | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        import time

        self.func = func
        self.budget = budget or DecodeBudget()
        self._clock = clock or time.monotonic
        self._size = workers
        self._workers: list[_Worker] = []

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """Results (or :class:`JobFailed`) in the order of ``items``; at most ``workers`` jobs run at once."""
        pending = deque(enumerate(items))
        results: dict[int, Any] = {}
        next_out = 0
        while not self._workers_ready():
            self._workers.append(_Worker(self.func, self.budget))
        try:
            while pending or any(w.job is not None for w in self._workers):
                for worker in self._workers:
                    if worker.job is None and pending:
                        position, item = pending.popleft()
                        self._dispatch(worker, position, item, results)
                self._collect(results)
                while next_out in results:
                    yield results.pop(next_out)
                    next_out += 1
        finally:
            # Abandoned early (an exception in the consumer): a reply still on its way would be taken
            # for the next job's, so workers with a job in flight go.
            for worker in [w for w in self._workers if w.job is not None]:
                worker.kill()
                self._workers.remove(worker)

    def _workers_ready(self) -> bool:
        self._workers = [w for w in self._workers if w.process.is_alive()]
        return len(self._workers) >= self._size

    def _dispatch(self, worker: _Worker, position: int, item: Any, results: dict[int, Any]) -> None:
        try:
            worker.conn.send(item)
        except (OSError, BrokenPipeError) as exc:
            results[position] = JobFailed(f"the decoding worker died ({exc})")
            self._replace(worker)
            return
        worker.job, worker.deadline = position, self._clock() + self.budget.timeout_s

    def _collect(self, results: dict[int, Any]) -> None:
        busy = [w for w in self._workers if w.job is not None]
        if not busy:
            return
        wait_s = max(0.0, min(w.deadline for w in busy) - self._clock())
        ready = wait([w.conn for w in busy], timeout=wait_s)
        for worker in busy:
            position = worker.job
            assert position is not None
            if worker.conn in ready:
                try:
                    ok, value = worker.conn.recv()
                except (EOFError, OSError):  # the worker died mid-job: a crash or the kernel's OOM killer
                    worker.process.join(timeout=5)
                    code = worker.process.exitcode
                    results[position] = JobFailed(f"the decoding worker crashed (exit status {code})")
                    self._replace(worker)
                    continue
                results[position] = value if ok else JobFailed(str(value))
                worker.job = None
            elif self._clock() >= worker.deadline:
                results[position] = JobFailed(f"decoding took longer than {self.budget.timeout_s:g} s (killed)")
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        index = self._workers.index(worker)
        self._workers[index] = _Worker(self.func, self.budget)

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`map` starts new ones)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
