"""Run an untrusted job (decoding a video someone else made) in worker processes under a budget.

A hostile or broken file can make FFmpeg loop for hours, allocate without bound or crash the
process. :class:`IsolatedPool` runs ``func(item)`` in long-lived worker processes (started once,
reused for every item, so normal work pays no per-file start-up), each with an address-space limit
(``RLIMIT_AS``), and kills a worker whose job outlives the time budget. Whatever goes wrong with one
item (an exception, the time or memory budget, a crash of the worker) comes back as a
:class:`JobFailed` for that item; the pool replaces the worker and goes on with the next.

A flat time budget suits jobs of bounded size (a clip of a few sampled frames), not decoding a
recording end to end, whose honest cost grows with its length. A pool made with ``progress=True``
hands each job a :class:`ProgressReporter`; a job that reports how many seconds of media it has
decoded is then judged by its progress instead (:class:`JobWatch`): killed when it makes no progress
for the timeout, or when it falls below a minimum decoding speed. A job that never reports keeps the
flat budget.

Workers are started with ``forkserver`` (``spawn`` where that is missing), never by forking a parent
that may hold threads (torch, decoder pools), and they exit when the parent's end of their pipe
closes, so a parent killed with SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DecodeBudget", "IsolatedPool", "JobFailed", "JobWatch", "ProgressReporter"]


@dataclass(frozen=True)
class DecodeBudget:
    """What one job may use.

    Attributes:
        timeout_s: wall-clock seconds per item; a worker still busy after that is killed. For a job
            that reports progress: the longest it may go without progress (and the head start of
            the speed floor).
        memory_bytes: address-space limit of each worker process (``None``: no limit). Virtual
            memory, so it must leave room for the libraries' mappings (about 1 GiB with PyAV).
        min_speed: for a job that reports progress, the slowest decoding allowed, in seconds of media
            per second of wall time: after ``timeout_s + media_s / min_speed`` seconds it is killed.
            The default, 1 (real time), is what any player manages, so a genuine recording decodes
            several times faster on one core (an hour of HD video in a few minutes); a file that
            decodes slower than it plays is hostile, broken, or too heavy for this machine to index.
            Without it a file crafted to decode slowly but steadily would only meet the media cap.
    """

    timeout_s: float = 120.0
    memory_bytes: int | None = 4 * 2**30
    min_speed: float = 1.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"the decode timeout must be positive, got {self.timeout_s}")
        if not self.min_speed > 0:
            raise ValueError(f"the minimum decoding speed must be positive, got {self.min_speed}")
        if self.memory_bytes is not None and self.memory_bytes < 2**28:
            raise ValueError(f"the decode memory budget must be at least 256 MiB, got {self.memory_bytes} bytes")


@dataclass(frozen=True)
class JobFailed:
    """One item's job failed; ``error`` says how (the exception, the budget it exceeded, or the crash).

    ``limit`` names the budget it exceeded, if any: ``"time"`` (the flat timeout), ``"stall"`` (no
    progress for the timeout), ``"speed"`` (below the minimum speed) or ``"memory"``.
    """

    error: str
    limit: str | None = None


TIME, STALL, SPEED, MEMORY = "time", "stall", "speed", "memory"

# Messages on a worker's pipe: (kind, value).
_READY = "ready"
_DONE, _ERROR, _PROGRESS = "done", "error", "progress"
_OUT_OF_MEMORY = "out of memory (over the decode memory budget)"
# A job reports at most this often (and at least ten times per timeout, so one late report never
# looks like a stall): a pickled float on a pipe per second costs nothing next to decoding.
_REPORT_INTERVAL_S = 1.0


class ProgressReporter:
    """Handed to a job of a ``progress=True`` pool: ``reporter(media_s)`` says how many seconds of
    media the job has decoded so far (non-decreasing; only an increase counts as progress).

    Calls are cheap (a clock read); a report goes to the parent at most every ``interval_s``. Safe
    to call from a job's helper thread.
    """

    def __init__(self, send: Callable[[Any], None], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sent = 0.0  # media seconds last reported
        self._sent_at: float | None = None
        self._open = True

    def __call__(self, media_s: float) -> None:
        now = self._clock()
        if media_s <= self._sent or (self._sent_at is not None and now - self._sent_at < self._interval_s):
            return
        with self._lock:
            if self._open:
                self._send((_PROGRESS, float(media_s)))
                self._sent, self._sent_at = media_s, now

    def close(self) -> None:
        """No more reports (the job is over: its reply must be the next message on the pipe)."""
        with self._lock:
            self._open = False


@dataclass
class JobWatch:
    """The time budget of one running job, as the parent sees it (``now`` from the pool's clock).

    A job that never reports is killed ``timeout_s`` after it started (the flat budget). One that
    reports is killed when (a) ``timeout_s`` pass without its decoded media time increasing
    (a stall), or (b) ``timeout_s + media_s / min_speed`` seconds have passed since it started (the
    speed floor). With no report both limits are the flat one, so (a) and (b) generalise it.
    """

    budget: DecodeBudget
    started: float
    media_s: float = field(default=0.0, init=False)  # the most media decoded that was reported
    last_progress: float = field(init=False)  # when media_s last increased (``started`` until then)
    reported: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.last_progress = self.started

    def progress(self, media_s: float, now: float) -> None:
        if media_s > self.media_s:
            self.media_s, self.last_progress, self.reported = media_s, now, True

    @property
    def stall_deadline(self) -> float:
        return self.last_progress + self.budget.timeout_s

    @property
    def speed_deadline(self) -> float:
        return self.started + self.budget.timeout_s + self.media_s / self.budget.min_speed

    @property
    def deadline(self) -> float:
        """When the job is killed unless it reports progress first."""
        return min(self.stall_deadline, self.speed_deadline)

    def verdict(self, now: float) -> JobFailed | None:
        """``None`` while the job is within its budget, else why it is killed."""
        timeout = self.budget.timeout_s
        if not self.reported:
            if now >= self.deadline:
                return JobFailed(f"decoding took longer than {timeout:g} s (killed)", TIME)
            return None
        if now >= self.stall_deadline:
            return JobFailed(f"decoding made no progress for {timeout:g} s (stuck after {self.media_s:.1f} s of "
                             "media; killed)", STALL)
        if now >= self.speed_deadline:
            speed, elapsed, idle = self.budget.min_speed, now - self.started, now - self.last_progress
            return JobFailed(f"decoding ran slower than {speed:g}x real time ({self.media_s:.1f} s of media in "
                             f"{elapsed:.1f} s, the last progress {idle:.1f} s ago; {timeout:g} s + media / {speed:g} "
                             "allowed; killed)", SPEED)
        return None


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


def _worker_main(conn: Connection, func: Callable[..., Any], memory_bytes: int | None,
                 report_interval_s: float | None) -> None:
    """Serve jobs until the parent closes the pipe (``report_interval_s``: hand jobs a reporter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_malloc_arenas()
    _limit_memory(memory_bytes)
    conn.send(_READY)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        reporter = None if report_interval_s is None else ProgressReporter(conn.send, report_interval_s)
        try:
            reply: tuple[str, Any] = (_DONE, func(item) if reporter is None else func(item, reporter))
        except MemoryError:
            reply = (_ERROR, _OUT_OF_MEMORY)
        except BaseException as exc:  # noqa: BLE001 - every failure is the item's, reported to the parent
            reply = (_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            if reporter is not None:
                reporter.close()
        try:
            conn.send(reply)
        except MemoryError:
            conn.send((_ERROR, _OUT_OF_MEMORY))
        except (EOFError, OSError, BrokenPipeError):
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle
            conn.send((_ERROR, f"cannot return the result: {type(exc).__name__}: {exc}"))


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class _Worker:
    def __init__(self, func: Callable[..., Any], budget: DecodeBudget, progress: bool) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe(duplex=True)
        interval = min(_REPORT_INTERVAL_S, budget.timeout_s / 10) if progress else None
        self.process = ctx.Process(target=_worker_main, args=(child, func, budget.memory_bytes, interval),
                                   name="diffusionret-decode", daemon=True)
        self.process.start()
        child.close()
        self.job: int | None = None  # position of the item it is working on
        self.watch: JobWatch | None = None  # its budget
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
            returning a picklable result; with ``progress``, called as ``func(item, reporter)``.
        workers: worker processes (started on first use, reused).
        budget: time and memory per item.
        clock: monotonic seconds (tests may substitute it).
        progress: hand each job a :class:`ProgressReporter`; jobs that report are judged by their
            progress (:class:`JobWatch`).
    """

    def __init__(self, func: Callable[..., Any], *, workers: int = 2, budget: DecodeBudget | None = None,
                 clock: Callable[[], float] | None = None, progress: bool = False) -> None:
        if workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        self.func = func
        self.budget = budget or DecodeBudget()
        self._clock = clock or time.monotonic
        self._progress = progress
        self._size = workers
        self._workers: list[_Worker] = []

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """Results (or :class:`JobFailed`) in the order of ``items``; at most ``workers`` jobs run at once."""
        pending = deque(enumerate(items))
        results: dict[int, Any] = {}
        next_out = 0
        while not self._workers_ready():
            self._workers.append(self._new_worker())
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
        worker.job, worker.watch = position, JobWatch(self.budget, started=self._clock())

    def _collect(self, results: dict[int, Any]) -> None:
        busy = [w for w in self._workers if w.job is not None and w.watch is not None]
        if not busy:
            return
        wait_s = max(0.0, min(w.watch.deadline for w in busy) - self._clock())  # type: ignore[union-attr]
        ready = wait([w.conn for w in busy], timeout=wait_s)
        for worker in busy:
            position, watch = worker.job, worker.watch
            assert position is not None and watch is not None
            if worker.conn in ready:
                try:
                    kind, value = worker.conn.recv()
                except (EOFError, OSError):  # the worker died mid-job: a crash or the kernel's OOM killer
                    worker.process.join(timeout=5)
                    code = worker.process.exitcode
                    results[position] = JobFailed(f"the decoding worker crashed (exit status {code})")
                    self._replace(worker)
                    continue
                if kind == _PROGRESS:
                    watch.progress(float(value), self._clock())
                else:
                    results[position] = value if kind == _DONE else \
                        JobFailed(str(value), MEMORY if value == _OUT_OF_MEMORY else None)
                    worker.job, worker.watch = None, None
                    continue
            failed = watch.verdict(self._clock())
            if failed is not None:
                results[position] = failed
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        index = self._workers.index(worker)
        self._workers[index] = self._new_worker()

    def _new_worker(self) -> _Worker:
        return _Worker(self.func, self.budget, self._progress)

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`map` starts new ones)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
