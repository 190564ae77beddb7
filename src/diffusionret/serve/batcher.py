"""Micro-batching of concurrent searches: the queries that arrive within a few milliseconds run as one batch.

One query at 1M videos spends about half its time in the text tower, mostly reading the tower's
weights for a dozen tokens; a batch reads them once for all its queries (and makes one first-stage
call and one re-ranking call, :meth:`~diffusionret.index.searcher.Searcher.search_batch`).

A request enqueues ``(query, k)`` and gets a :class:`concurrent.futures.Future`. Each worker thread
waits for a first request, then collects more until ``max_batch`` are queued or ``max_wait_s`` has
passed since the first one arrived, runs one batched search and resolves the futures. A request
withdrawn while still queued (:meth:`SearchBatcher.withdraw`: its client timed out) leaves the queue. :meth:`close` fails
the queued requests with :class:`BatcherClosed` and joins the threads.

Regrouping: the clients a batch has just answered tend to send their next search at once (a
closed loop: a page, a script, a load test). Taking only what is queued when a batch ends would
split them from the requests that queued meanwhile, and a server at concurrency 8 would settle
into two alternating half batches, each paying the per-batch costs (BENCHMARKS.md). So when a
batch ends, the worker waits up to ``regroup_s`` (and at most a quarter of that batch's run time)
for as many requests as the batch answered plus those queued, up to ``max_batch``; it stops as
soon as they are there, and meanwhile other idle workers leave that many queued requests to it.
It never delays a lone client: its next request is all it expects.

Splitting (``split``, the default with several workers): one batch runs at a time, its queries
divided into one part per worker, each part a ``search_batch`` call on its own thread (torch ops
release the GIL, so the parts run on separate cores). Independent workers that each take their
own batch drift apart in a closed loop: a request that arrives just after every worker took a
batch waits for a whole batch before its own starts, which made the tail at concurrency 8 about
twice the median (BENCHMARKS.md). Split, every batch takes about half the time on two cores, its
parts are answered together when the last ends, its clients come back together and regroup into
the next one, and the latency spread narrows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

logger = logging.getLogger(__name__)

#: ``search_batch(queries, ks) -> one result per query``.
SearchBatch = Callable[[list[str], list[int]], Sequence[Any]]
#: ``wait(condition, timeout_s)``: block on ``condition`` (held) for at most ``timeout_s`` (None: until notified).
Wait = Callable[[threading.Condition, "float | None"], Any]


#: A regrouping wait is at most this share of the run time of the batch that just ended, so that
#: it costs little throughput even when the answered clients do not come back.
REGROUP_FRACTION = 0.25


class BatcherClosed(RuntimeError):
    """The batcher was closed before this request ran."""


@dataclass(frozen=True)
class BatchConfig:
    """How requests are grouped.

    Attributes:
        max_batch: most queries per batch (1: every query runs alone, as without a batcher).
        max_wait_s: longest time the first query of a batch waits for others. 0 (default): a batch
            takes what is queued when a worker is free; under load, the requests that arrive while
            a batch runs form the next one, and a lone query never waits (BENCHMARKS.md: a 5 ms
            wait added latency at concurrency 1 and no throughput at 8).
        regroup_s: after a batch, the longest wait for the requests it answered to come back
            (module docstring), also bounded by :data:`REGROUP_FRACTION` of the batch's run time;
            0 turns regrouping off.
        split: with several workers, run one batch at a time split into one part per worker
            (module docstring); ``False``: each worker runs its own batches.
    """

    max_batch: int = 16
    max_wait_s: float = 0.0
    regroup_s: float = 0.02
    split: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.regroup_s < 0:
            raise ValueError(f"regroup_s must be >= 0, got {self.regroup_s}")


@dataclass
class _Request:
    query: str
    k: int
    future: Future
    arrived: float


def _condition_wait(condition: threading.Condition, timeout: float | None) -> None:
    condition.wait(timeout)


class SearchBatcher:
    """Runs searches in batches on ``workers`` threads (module docstring).

    Args:
        search_batch: the batched search (e.g. a backend's ``search_batch``).
        config: batch size and wait bound.
        workers: search threads. With ``config.split`` (default) one batch runs at a time, split
            into one part per thread; otherwise each thread runs its own batches.
        clock: monotonic seconds (tests inject a fake clock).
        wait: how a worker blocks on the queue's condition (tests inject one that advances the
            fake clock instead of sleeping).
        start: ``"now"``; ``"on_submit"``: with the first request (an app that is built but never
            served starts no threads); ``"manual"``: at :meth:`start` (tests queue requests first).
    """

    def __init__(self, search_batch: SearchBatch, config: BatchConfig | None = None, *, workers: int = 1,
                 clock: Callable[[], float] = time.monotonic, wait: Wait = _condition_wait,
                 start: Literal["now", "on_submit", "manual"] = "now") -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._search = search_batch
        self.config = config or BatchConfig()
        self._clock, self._wait = clock, wait
        self._queue: deque[_Request] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._reserved = 0  # queued requests that regrouping workers wait for (see _next_batch)
        self.workers = workers
        # Split: one dispatching thread runs a part of each batch itself and the others on a pool.
        self._parts: ThreadPoolExecutor | None = None
        if self.config.split and workers > 1:
            self._parts = ThreadPoolExecutor(workers - 1, thread_name_prefix="diffusionret-batch-part")
        self._threads = [threading.Thread(target=self._run, name=f"diffusionret-batch-{i}", daemon=True)
                         for i in range(1 if self._parts is not None else workers)]
        self.batches = 0  # batches run, and the queries in them (the mean batch size, for /api/info)
        self.batched_queries = 0
        self._start_on_submit = start == "on_submit"
        self._started = False
        if start == "now":
            self.start()

    def start(self) -> None:
        """Start the worker threads (once)."""
        with self._condition:
            if self._started:
                return
            self._started = True
        for thread in self._threads:
            thread.start()

    def submit(self, query: str, k: int) -> Future:
        """Queue one search; the future resolves to its result (or its exception)."""
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise BatcherClosed("the search service is shutting down")
            self._queue.append(_Request(query, k, future, self._clock()))
            self._condition.notify_all()
        if self._start_on_submit:
            self.start()
        return future

    def withdraw(self, future: Future) -> bool:
        """Take a request that has not started out of the queue and cancel it; ``False`` once it runs."""
        with self._condition:
            for request in self._queue:
                if request.future is future:
                    self._queue.remove(request)
                    return future.cancel()
        return False

    @property
    def queued(self) -> int:
        with self._condition:
            return len(self._queue)

    def _next_batch(self, answered: int = 0, regroup_s: float = 0.0) -> list[_Request] | None:
        """Block until a batch is due; ``None`` once closed.

        Args:
            answered: requests the worker's previous batch answered (0: none, or it failed).
            regroup_s: how long to wait for them to come back (module docstring).
        """
        cfg = self.config
        with self._condition:
            if answered and regroup_s > 0:
                # A lone client (answered 1, nothing queued) expects just its own next request:
                # this waits for nothing more than the plain path below would.
                # Requests other regrouping workers wait for are theirs, not counted here.
                expected = min(cfg.max_batch, max(0, len(self._queue) - self._reserved) + answered)
                # Reserved: an idle worker leaves these for this one (it would take the first
                # to come back alone, splitting the group this wait is for).
                self._reserved += expected
                try:
                    deadline = self._clock() + regroup_s
                    while len(self._queue) - (self._reserved - expected) < expected and not self._closed:
                        remaining = deadline - self._clock()
                        if remaining <= 0:
                            break
                        self._wait(self._condition, remaining)
                finally:
                    self._reserved -= expected
                    self._condition.notify_all()
            while True:
                while len(self._queue) <= self._reserved and not self._closed:
                    self._wait(self._condition, None)
                if self._closed:
                    return None
                # The wait bound counts from the first request's arrival, not from when a worker woke.
                deadline = self._queue[0].arrived + cfg.max_wait_s
                while len(self._queue) < cfg.max_batch and not self._closed:
                    remaining = deadline - self._clock()
                    if remaining <= 0 or not self._queue:
                        break
                    self._wait(self._condition, remaining)
                if self._closed:
                    return None
                batch = []
                while self._queue and len(batch) < cfg.max_batch:
                    request = self._queue.popleft()
                    # False: cancelled while queued (its client gave up); skip it.
                    if request.future.set_running_or_notify_cancel():
                        batch.append(request)
                if batch:
                    if self._queue:
                        self._condition.notify_all()  # another worker may take the rest
                    return batch

    def _run(self) -> None:
        answered, regroup_s = 0, 0.0
        while (batch := self._next_batch(answered, regroup_s)) is not None:
            self.batches += 1
            self.batched_queries += len(batch)
            started = self._clock()
            if self._parts is None or len(batch) == 1:
                outcomes = [(batch, self._run_part(batch))]
            else:
                parts = split_balanced(batch, self.workers)
                others = [self._parts.submit(self._run_part, part) for part in parts[1:]]
                outcomes = [(parts[0], self._run_part(parts[0]))]
                outcomes += [(part, other.result()) for part, other in zip(parts[1:], others, strict=True)]
            # All parts are answered together, after the last: answering the first part early would
            # have the event loop send its responses and parse its clients' next requests on the
            # cores the other parts still compute on (and those requests would wait for the
            # regrouping anyway). So no client of this batch is back before all are answered.
            answered = 0
            for part, outcome in outcomes:
                if isinstance(outcome, Exception):
                    for request in part:
                        request.future.set_exception(outcome)
                else:
                    answered += len(part)
                    for request, result in zip(part, outcome, strict=True):
                        request.future.set_result(result)
            regroup_s = min(self.config.regroup_s, REGROUP_FRACTION * (self._clock() - started))
            if answered < len(batch):
                answered = 0  # after a failure the clients do not come back together: no regrouping wait

    def _run_part(self, batch: list[_Request]) -> Sequence[Any] | Exception:
        """Search one batch (or part of one): its results, or the exception that failed it."""
        try:
            results = self._search([r.query for r in batch], [r.k for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"search_batch returned {len(results)} results for {len(batch)} queries")
            return results
        except Exception as exc:  # every request of the batch gets the failure; the worker keeps going
            logger.exception("a batch of %d searches failed", len(batch))
            return exc

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Fail the queued requests with :class:`BatcherClosed` and join the threads.

        A batch already running finishes (its requests get their results); ``timeout_s`` bounds
        the join, so a stuck search cannot block shutdown forever.
        """
        with self._condition:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._condition.notify_all()
        for request in pending:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(BatcherClosed("the search service shut down before this search ran"))
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout_s)
        if self._parts is not None:
            # The dispatcher waits for its parts, so after its join nothing runs there unless it is stuck.
            self._parts.shutdown(wait=False)


def split_balanced(items: list[_Request], parts: int) -> list[list[_Request]]:
    """``items`` in at most ``parts`` non-empty groups of about equal search cost, each in arrival order.

    A split batch ends when its slowest part does, so the parts are balanced by an estimate of
    each query's cost (greedy: the costliest query first, each to the least loaded part). The text
    tower's share grows with the query's length, the rest (first stage, WTI, re-ranking) is about
    the same for every query: at 1M videos one word cost about 1.5 ms and the rest about 15 ms
    (BENCHMARKS.md), hence ``words + 10``. Whitespace words are a cheap stand-in for tokens.
    """
    parts = min(parts, len(items))
    loads = [0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    costs = [len(item.query.split()) + 10 for item in items]
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        least = min(range(parts), key=lambda j: (loads[j], len(groups[j]), j))
        loads[least] += costs[i]
        groups[least].append(i)
    return [[items[i] for i in sorted(group)] for group in groups]


def loop_search_batch(search: Callable[[str, int], Any]) -> SearchBatch:
    """A ``search_batch`` for a backend that only searches one query at a time."""

    def search_batch(queries: list[str], ks: list[int]) -> list[Any]:
        return [search(q, k) for q, k in zip(queries, ks, strict=True)]

    return search_batch
