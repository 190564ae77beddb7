"""The search batcher: its size and wait bounds (fake clock, no sleeps) and its shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError

import pytest

from diffusionret.serve.batcher import REGROUP_FRACTION, BatchConfig, BatcherClosed, SearchBatcher


class FakeTime:
    """A clock that only moves when a worker waits with a timeout (the timeout elapses at once)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timed_waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        if timeout is None:
            condition.wait()  # no request yet: block until one is submitted (or close)
            return
        self.timed_waits.append(timeout)
        self.now += timeout


class Recorder:
    """A search_batch that records its batches; ``gate`` (when set) holds each batch until released."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, queries: list[str], ks: list[int]) -> list[str]:
        self.batches.append(list(zip(queries, ks, strict=True)))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=60)
        return [f"{q}@{k}" for q, k in zip(queries, ks, strict=True)]


def test_a_full_batch_runs_without_waiting() -> None:
    fake, search = FakeTime(), Recorder()
    batcher = SearchBatcher(search, BatchConfig(max_batch=4, max_wait_s=5.0), clock=fake.clock, wait=fake.wait,
                            start="manual")
    futures = [batcher.submit(f"q{i}", i + 1) for i in range(6)]
    batcher.start()
    assert [f.result(timeout=30) for f in futures[:4]] == ["q0@1", "q1@2", "q2@3", "q3@4"]
    assert search.batches[0] == [("q0", 1), ("q1", 2), ("q2", 3), ("q3", 4)]
    # The remaining two wait out the bound from their arrival (time 0): one timed wait of 5 s.
    assert [f.result(timeout=30) for f in futures[4:]] == ["q4@5", "q5@6"]
    assert search.batches[1] == [("q4", 5), ("q5", 6)]
    assert fake.timed_waits == [5.0] and fake.now == 5.0  # the full batch never waited
    batcher.close()


def test_a_partial_batch_runs_after_the_wait_bound() -> None:
    fake, search = FakeTime(), Recorder()
    batcher = SearchBatcher(search, BatchConfig(max_batch=8, max_wait_s=0.005), clock=fake.clock, wait=fake.wait,
                            start="manual")
    fake.now = 10.0
    first = batcher.submit("a", 3)
    fake.now = 10.002  # a second request 2 ms later joins the same batch
    second = batcher.submit("b", 5)
    batcher.start()
    assert (first.result(timeout=30), second.result(timeout=30)) == ("a@3", "b@5")
    assert search.batches == [[("a", 3), ("b", 5)]]
    # It waited exactly what remained of the first request's 5 ms, then ran what it had.
    assert fake.timed_waits == [pytest.approx(0.003)] and fake.now == pytest.approx(10.005)
    batcher.close()


def test_batch_size_one_never_waits() -> None:
    fake, search = FakeTime(), Recorder()
    batcher = SearchBatcher(search, BatchConfig(max_batch=1, max_wait_s=1.0), clock=fake.clock, wait=fake.wait,
                            start="manual")
    futures = [batcher.submit(q, 1) for q in "xyz"]
    batcher.start()
    assert [f.result(timeout=30) for f in futures] == ["x@1", "y@1", "z@1"]
    assert search.batches == [[("x", 1)], [("y", 1)], [("z", 1)]] and fake.timed_waits == []
    batcher.close()


def test_a_cancelled_request_is_dropped_from_the_queue() -> None:
    fake, search = FakeTime(), Recorder()
    batcher = SearchBatcher(search, BatchConfig(max_batch=2, max_wait_s=0.0), clock=fake.clock, wait=fake.wait,
                            start="manual")
    gone, kept = batcher.submit("gone", 1), batcher.submit("kept", 2)
    assert gone.cancel()  # e.g. its request timed out while queued
    batcher.start()
    assert kept.result(timeout=30) == "kept@2"
    assert search.batches == [[("kept", 2)]]
    with pytest.raises(CancelledError):
        gone.result(timeout=0)
    batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on() -> None:
    calls = []

    def search(queries: list[str], ks: list[int]) -> list[str]:
        calls.append(queries)
        if len(calls) == 1:
            raise RuntimeError("broken index")
        return queries

    batcher = SearchBatcher(search, BatchConfig(max_batch=1, max_wait_s=0.0))
    with pytest.raises(RuntimeError, match="broken index"):
        batcher.submit("a", 1).result(timeout=30)
    assert batcher.submit("b", 1).result(timeout=30) == "b"
    batcher.close()


def test_close_fails_queued_requests_finishes_the_running_batch_and_joins() -> None:
    release = threading.Event()
    search = Recorder(gate=release)
    batcher = SearchBatcher(search, BatchConfig(max_batch=1, max_wait_s=0.0), workers=1)
    running = batcher.submit("running", 1)
    assert search.entered.wait(timeout=30)  # the worker is inside the first batch
    queued = [batcher.submit(f"q{i}", 1) for i in range(3)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    for future in queued:  # failed at once, before the running batch ends
        with pytest.raises(BatcherClosed):
            future.result(timeout=30)
    release.set()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert running.result(timeout=0) == "running@1"
    assert all(not t.is_alive() for t in batcher._threads)
    assert search.batches == [[("running", 1)]]
    with pytest.raises(BatcherClosed):
        batcher.submit("late", 1)


def test_close_of_an_idle_batcher_ends_its_threads() -> None:
    batcher = SearchBatcher(Recorder(), BatchConfig(), workers=2)
    batcher.close()
    assert all(not t.is_alive() for t in batcher._threads)


class TimedSearch:
    """A search_batch that takes ``duration`` seconds of the fake clock and records when each batch started."""

    def __init__(self, fake: FakeTime, duration: float) -> None:
        self.fake, self.duration = fake, duration
        self.batches: list[list[str]] = []
        self.started: list[float] = []

    def __call__(self, queries: list[str], ks: list[int]) -> list[str]:
        self.batches.append(list(queries))
        self.started.append(self.fake.now)
        self.fake.now += self.duration
        return list(queries)


def timed_batcher(duration: float = 1.0, max_batch: int = 8,
                  regroup_s: float = 0.02) -> tuple[FakeTime, TimedSearch, SearchBatcher]:
    """A manually started batcher on a fake clock whose every batch takes ``duration`` seconds."""
    fake = FakeTime()
    search = TimedSearch(fake, duration=duration)
    batcher = SearchBatcher(search, BatchConfig(max_batch=max_batch, max_wait_s=0.0, regroup_s=regroup_s),
                            clock=fake.clock, wait=fake.wait, start="manual")
    return fake, search, batcher


def test_the_answered_requests_coming_back_join_the_queued_ones() -> None:
    # A batch of 2 ran 1 s while "c" queued; its two clients send their next searches 4 ms after
    # the answers: the next batch waits for them instead of running "c" alone (a half batch).
    fake, search, batcher = timed_batcher()
    first = [batcher.submit(q, 1) for q in "ab"]
    returning: list = []
    queued_while_running: list = []
    original_call = search.__call__

    def run(queries: list[str], ks: list[int]) -> list[str]:
        out = original_call(queries, ks)
        if len(search.batches) == 1:
            queued_while_running.append(batcher.submit("c", 1))
        return out

    def wait(condition: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and not returning and len(search.batches) == 1:
            fake.now += 0.004
            returning.extend(batcher.submit(q, 1) for q in ("a2", "b2"))  # notify: the wait ends early
            return
        fake.wait(condition, timeout)

    batcher._search, batcher._wait = run, wait
    batcher.start()
    assert [f.result(timeout=30) for f in first] == ["a", "b"]
    assert queued_while_running[0].result(timeout=30) == "c"
    assert [f.result(timeout=30) for f in returning] == ["a2", "b2"]
    assert search.batches == [["a", "b"], ["c", "a2", "b2"]]
    assert search.started[1] == pytest.approx(1.004)  # it ran as soon as the expected 3 were there
    batcher.close()


def test_a_regrouping_wait_is_bounded_by_regroup_s_and_a_share_of_the_batch_time() -> None:
    for duration, bound in ((1.0, 0.02), (0.04, 0.04 * REGROUP_FRACTION)):
        fake, search, batcher = timed_batcher(duration)
        first = [batcher.submit(q, 1) for q in "ab"]
        batcher.start()
        assert [f.result(timeout=30) for f in first] == ["a", "b"]
        late = batcher.submit("c", 1)  # the clients of "a" and "b" never come back; "c" waits at most the bound
        assert late.result(timeout=30) == "c"
        assert search.batches == [["a", "b"], ["c"]]
        # (After "c" the worker waits for its client in turn: only the first wait is checked.)
        assert fake.timed_waits[0] == pytest.approx(bound)
        assert search.started[1] == pytest.approx(duration + bound)
        batcher.close()


def test_a_lone_client_is_not_delayed_by_regrouping() -> None:
    # Concurrency 1: a batch of one answered, its client comes back after 3 ms and runs at once.
    fake, search, batcher = timed_batcher()
    futures = [batcher.submit("a", 1)]

    def wait(condition: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and len(futures) == 1:
            fake.now += 0.003
            futures.append(batcher.submit("b", 1))
            return
        fake.wait(condition, timeout)

    batcher._wait = wait
    batcher.start()
    assert [f.result(timeout=30) for f in futures[:1]] == ["a"]
    for _ in range(600):
        if len(futures) == 2:
            break
        time.sleep(0.01)
    assert futures[1].result(timeout=30) == "b"
    assert search.batches == [["a"], ["b"]] and search.started[1] == pytest.approx(1.003)
    batcher.close()


def test_regrouping_takes_a_full_queue_at_once_and_can_be_turned_off() -> None:
    for regroup_s in (0.02, 0.0):
        fake, search, batcher = timed_batcher(max_batch=2, regroup_s=regroup_s)
        futures = [batcher.submit(q, 1) for q in "abcde"]
        batcher.start()
        assert [f.result(timeout=30) for f in futures] == list("abcde")
        # Full batches run at once; the last one ("e") waits for the answered two only with regrouping.
        assert search.batches == [["a", "b"], ["c", "d"], ["e"]]
        assert search.started == pytest.approx([0.0, 1.0, 2.0 + regroup_s])
        assert fake.timed_waits[:1] == ([pytest.approx(0.02)] if regroup_s else [])
        batcher.close()


def test_an_idle_worker_leaves_the_requests_a_regrouping_worker_waits_for() -> None:
    search = Recorder()
    batcher = SearchBatcher(search, BatchConfig(max_batch=8), start="manual")
    with batcher._condition:
        batcher._reserved = 2  # another worker is regrouping: it expects two requests
    reserved = [batcher.submit(q, 1) for q in "ab"]
    batcher.start()
    assert not search.entered.wait(timeout=0.2)  # the idle worker does not split the group
    with batcher._condition:  # the regrouping worker gives up its reservation (its wait ended)
        batcher._reserved = 0
        batcher._condition.notify_all()
    assert [f.result(timeout=30) for f in reserved] == ["a@1", "b@1"]
    assert search.batches == [[("a", 1), ("b", 1)]]
    batcher.close()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        BatchConfig(max_batch=0)
    with pytest.raises(ValueError):
        BatchConfig(max_wait_s=-1)
    with pytest.raises(ValueError):
        BatchConfig(regroup_s=-0.001)


class _Backend:
    """A backend whose batched search blocks on the query "hang" until released."""

    def __init__(self) -> None:
        self.release, self.entered = threading.Event(), threading.Event()
        self.batches: list[list[str]] = []

    def search(self, query: str, k: int = 10) -> list[str]:
        return self.search_batch([query], [k])[0]

    def search_batch(self, queries: list[str], ks: list[int]) -> list[list[str]]:
        self.batches.append(list(queries))
        if "hang" in queries:
            self.entered.set()
            assert self.release.wait(timeout=60)
        return [[q] * k for q, k in zip(queries, ks, strict=True)]


def test_a_request_timing_out_in_the_queue_frees_its_slot_at_once() -> None:
    from diffusionret.serve.app import ApiError, InferenceGate

    backend = _Backend()
    batcher = SearchBatcher(backend.search_batch, BatchConfig(max_batch=4, max_wait_s=0.0), start="on_submit")
    gate = InferenceGate(1, 8, timeout_s=0.2, batcher=batcher)

    async def scenario() -> None:
        running = asyncio.ensure_future(gate.search(backend, "hang", 1))
        assert await asyncio.get_running_loop().run_in_executor(None, backend.entered.wait, 60)
        with pytest.raises(ApiError) as queued:
            await gate.search(backend, "queued", 2)  # waits behind the hung batch, then times out
        assert queued.value.status == 504
        with pytest.raises(ApiError) as hung:
            await running
        assert hung.value.status == 504
        for _ in range(100):  # the cancellation reaches the event loop on its next iterations
            await asyncio.sleep(0)
        # The queued request left the queue and its slot; the running one keeps its slot (stuck).
        assert (gate.pending, gate.stuck, batcher.queued) == (1, 1, 0)
        backend.release.set()
        for _ in range(600):
            if gate.pending == 0:
                break
            await asyncio.sleep(0.05)
        assert (gate.pending, gate.stuck) == (0, 0)
        assert await gate.search(backend, "next", 3) == ["next"] * 3
        assert backend.batches == [["hang"], ["next"]]  # "queued" never ran

    try:
        asyncio.run(scenario())
    finally:
        backend.release.set()
        gate.shutdown()
    assert all(not t.is_alive() for t in batcher._threads)


def test_the_app_batches_through_the_backend_and_shuts_the_batcher_down() -> None:
    from fastapi.testclient import TestClient

    from diffusionret.serve.app import ServeConfig, create_app

    backend = _Backend()
    backend.index = []  # type: ignore[attr-defined]
    app = create_app(backend, ServeConfig(batch_max_size=8, batch_max_wait_ms=0.0))  # type: ignore[arg-type]
    batcher = app.state.gate.batcher
    assert batcher is not None and batcher.config == BatchConfig(8, 0.0)
    assert create_app(backend, ServeConfig(batch_max_size=1)).state.gate.batcher is None  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert app.state.gate.search is not None
        hits = asyncio.run(app.state.gate.search(backend, "x", 2))
        assert hits == ["x", "x"] and backend.batches == [["x"]]
        del client
    assert all(not t.is_alive() for t in batcher._threads)
    with pytest.raises(BatcherClosed):
        batcher.submit("late", 1)
