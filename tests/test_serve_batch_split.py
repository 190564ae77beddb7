"""Split batches: one batch at a time, its queries divided across the workers (serve/batcher.py)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.serve.batcher import BatchConfig, SearchBatcher, _Request, split_balanced


class PartRecorder:
    """A search_batch that records each call's queries and thread, and holds every call until all ``parts`` are in.

    Holding proves the parts run at once, on different threads (a sequential run would deadlock
    until the barrier's timeout and fail).
    """

    def __init__(self, parts: int, fail_on: str | None = None) -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.barrier = threading.Barrier(parts, timeout=30)
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, queries: list[str], ks: list[int]) -> list[str]:
        with self.lock:
            self.calls.append((list(queries), threading.current_thread().name))
        self.barrier.wait()
        if self.fail_on in queries:
            raise RuntimeError("broken shard")
        return [f"{q}@{k}" for q, k in zip(queries, ks, strict=True)]


def test_a_batch_runs_split_across_the_workers_at_once() -> None:
    search = PartRecorder(parts=2)
    batcher = SearchBatcher(search, BatchConfig(max_batch=8), workers=2, start="manual")
    queries = ["a b c", "d", "e f", "g h i j"]
    futures = [batcher.submit(q, i + 1) for i, q in enumerate(queries)]
    batcher.start()
    assert [f.result(timeout=30) for f in futures] == [f"{q}@{i + 1}" for i, q in enumerate(queries)]
    assert batcher.batches == 1 and batcher.batched_queries == 4  # one batch, run as two parts
    parts = sorted(sorted(q) for q, _ in search.calls)
    assert sorted(q for part in parts for q in part) == sorted(queries) and len(parts) == 2
    assert len({thread for _, thread in search.calls}) == 2
    batcher.close()
    assert all(not t.is_alive() for t in batcher._threads)


def test_a_failing_part_fails_only_its_own_requests() -> None:
    search = PartRecorder(parts=2, fail_on="bad")
    batcher = SearchBatcher(search, BatchConfig(max_batch=8), workers=2, start="manual")
    futures = {q: batcher.submit(q, 1) for q in ("bad", "x", "y y", "z")}
    batcher.start()
    with pytest.raises(RuntimeError, match="broken shard"):
        futures["bad"].result(timeout=30)
    failed_part = next(q for q, _ in search.calls if "bad" in q)
    for query, future in futures.items():
        if query in failed_part:
            with pytest.raises(RuntimeError):
                future.result(timeout=30)
        else:
            assert future.result(timeout=30) == f"{query}@1"
    batcher.close()


def test_no_split_gives_each_worker_its_own_batches() -> None:
    batcher = SearchBatcher(PartRecorder(parts=1), BatchConfig(split=False), workers=3, start="manual")
    assert len(batcher._threads) == 3 and batcher._parts is None
    split = SearchBatcher(PartRecorder(parts=1), BatchConfig(), workers=3, start="manual")
    assert len(split._threads) == 1 and split._parts is not None
    batcher.close()
    split.close()


def test_the_parts_of_a_batch_are_answered_together_when_the_last_ends() -> None:
    fast_returned = threading.Event()
    seen_by_slow_part: list[bool] = []

    def search(queries: list[str], ks: list[int]) -> list[str]:
        if "slow" in queries:
            # Let the fast part return first; 0.1 s later, answered early, its futures would be done.
            assert fast_returned.wait(timeout=30)
            threading.Event().wait(0.1)
            seen_by_slow_part.append(any(futures[q].done() for q in fast))
        else:
            fast.extend(queries)
            threading.Timer(0.0, fast_returned.set).start()  # set once this part has returned
        return list(queries)

    fast: list[str] = []
    batcher = SearchBatcher(search, BatchConfig(max_batch=8), workers=2, start="manual")
    futures = {q: batcher.submit(q, 1) for q in ("slow", "x", "fast words here", "y")}
    batcher.start()
    assert {q: f.result(timeout=30) for q, f in futures.items()} == {q: q for q in futures}
    assert fast and seen_by_slow_part == [False]
    batcher.close()


def _requests(queries: list[str]) -> list[_Request]:
    from concurrent.futures import Future

    return [_Request(q, 1, Future(), float(i)) for i, q in enumerate(queries)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=24), st.integers(1, 6))
def test_split_balanced_is_a_balanced_partition_in_arrival_order(words: list[int], parts: int) -> None:
    items = _requests([" ".join(["w"] * n) for n in words])
    groups = split_balanced(items, parts)
    assert len(groups) == min(parts, len(items)) and all(groups)
    assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in items)  # each exactly once
    for group in groups:
        assert [r.arrived for r in group] == sorted(r.arrived for r in group)
    loads = [sum(len(r.query.split()) + 10 for r in g) for g in groups]
    # Greedy costliest-first: no part exceeds another by more than one query's cost.
    assert max(loads) - min(loads) <= max(n + 10 for n in words)


def test_the_app_splits_batches_across_its_workers_unless_told_not_to() -> None:
    from diffusionret.serve.app import ServeConfig, create_app

    class Backend:
        index: list = []

        def search_batch(self, queries: list[str], ks: list[int]) -> list[list[str]]:
            return [[q] for q in queries]

    split = create_app(Backend(), ServeConfig(workers=2)).state.gate.batcher  # type: ignore[arg-type]
    apart_config = ServeConfig(workers=2, batch_split=False)
    apart = create_app(Backend(), apart_config).state.gate.batcher  # type: ignore[arg-type]
    assert split.config.split and split.workers == 2 and len(split._threads) == 1
    assert not apart.config.split and len(apart._threads) == 2
    split.close()
    apart.close()


def test_settle_heap_exempts_what_is_loaded_from_the_cyclic_collector() -> None:
    import gc

    from diffusionret.commands.serve import settle_heap

    loaded = [{"record": i} for i in range(1000)]
    try:
        assert settle_heap(loaded) is loaded
        assert gc.get_freeze_count() >= len(loaded)
        assert not any(gc.is_tracked(x) and any(x is y for y in gc.get_objects(generation=2)) for x in loaded[:5])
    finally:
        gc.unfreeze()
