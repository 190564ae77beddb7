"""The decode time budget that follows progress: a timeline decode reports the media it has decoded and
is killed when it stalls or falls below the minimum speed, not for being long; a job that never reports
keeps the flat timeout.

The policy (:class:`JobWatch`), the reporter's throttle and the media meter are tested on synthetic
clocks; the pool with fake jobs that sleep in worker processes (short budgets, no wall-clock upper bounds).
The same limits on real videos, through the index encoder, are in ``test_segments_build.py``.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import paced_job
from diffusionret.data.isolate import (SPEED, STALL, TIME, DecodeBudget, IsolatedPool, JobFailed, JobWatch,
                                       ProgressReporter)
from diffusionret.index.segment_job import MAX_FRAME_CREDIT_S, MediaMeter


# ------------------------------------------------------------------------------------ the policy
def test_a_job_that_never_reports_keeps_the_flat_timeout() -> None:
    watch = JobWatch(DecodeBudget(timeout_s=120.0), started=1000.0)
    assert watch.deadline == 1120.0
    assert watch.verdict(1119.9) is None
    failed = watch.verdict(1120.0)
    assert failed is not None and failed.limit == TIME and "longer than 120 s" in failed.error


def test_a_stall_is_killed_one_timeout_after_the_last_progress() -> None:
    watch = JobWatch(DecodeBudget(timeout_s=10.0), started=0.0)
    for t in range(1, 31):  # 30 s of wall time, 30 s of media: three flat timeouts, never killed
        watch.progress(float(t), now=float(t))
        assert watch.verdict(float(t)) is None
    watch.progress(30.0, now=35.0)  # the same position again is no progress
    assert watch.verdict(39.9) is None
    failed = watch.verdict(40.0)
    assert failed is not None and failed.limit == STALL
    assert "no progress for 10 s" in failed.error and "30.0 s of media" in failed.error


def test_a_steady_job_below_the_minimum_speed_is_killed_by_the_floor() -> None:
    watch = JobWatch(DecodeBudget(timeout_s=10.0, min_speed=2.0), started=0.0)
    verdict = None
    for t in range(1, 100):  # 1 s of media per second: half the floor; progress every second, no stall
        watch.progress(float(t), now=float(t))
        verdict = watch.verdict(float(t))
        if verdict is not None:
            break
    # allowed = 10 + media / 2 = 10 + t / 2 -> killed at t = 20
    assert verdict is not None and verdict.limit == SPEED and t == 20
    assert "slower than 2x real time" in verdict.error


@settings(max_examples=200, deadline=None)
@given(timeout=st.floats(0.5, 300), min_speed=st.floats(0.1, 10), speed_ratio=st.floats(1.0, 50),
       gaps=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=60))
def test_a_job_at_least_as_fast_as_the_floor_that_never_stalls_is_never_killed(
        timeout: float, min_speed: float, speed_ratio: float, gaps: list[float]) -> None:
    watch = JobWatch(DecodeBudget(timeout_s=timeout, min_speed=min_speed), started=0.0)
    now, media = 0.0, 0.0
    for gap in gaps:  # each report comes less than a timeout after the last, at >= min_speed overall
        now += gap * timeout
        assert watch.verdict(now) is None
        media = now * min_speed * speed_ratio + 1e-9
        watch.progress(media, now)
        assert watch.verdict(now) is None
    assert watch.deadline > now


@settings(max_examples=200, deadline=None)
@given(timeout=st.floats(0.5, 300), reports=st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 1e5)), max_size=30))
def test_every_job_is_killed_by_its_deadline(timeout: float, reports: list[tuple[float, float]]) -> None:
    """Whatever it reports, a job is killed at the latest ``timeout`` after its last progress, and never
    earlier than the flat timeout."""
    watch = JobWatch(DecodeBudget(timeout_s=timeout), started=0.0)
    now = 0.0
    for step, media in reports:
        now += step
        if watch.verdict(now) is not None:
            assert now >= timeout
            return
        watch.progress(media, now)
    assert watch.deadline <= watch.last_progress + timeout
    assert watch.verdict(watch.deadline) is not None


# ------------------------------------------------------------------------- reporter and meter
def test_the_reporter_sends_increases_at_most_once_an_interval_and_nothing_once_closed() -> None:
    sent: list[tuple[str, float]] = []
    clock = iter([0.0, 0.1, 0.5, 1.0, 1.2, 2.5, 3.0]).__next__
    report = ProgressReporter(sent.append, interval_s=1.0, clock=clock)
    report(1.0)  # t=0.0: sent
    report(2.0)  # t=0.1: too soon
    report(3.0)  # t=0.5: too soon
    report(4.0)  # t=1.0: sent
    report(4.0)  # t=1.2: no increase
    report(3.0)  # t=2.5: backwards
    report.close()
    report(9.0)  # t=3.0: closed
    assert [value for _, value in sent] == [1.0, 4.0]


def test_the_meter_credits_forward_steps_capped_per_frame_over_passes() -> None:
    totals: list[float] = []
    meter = MediaMeter(totals.append)
    for t in [0.0, 0.5, 1.0, 0.8, 1.5]:  # a frame that goes back earns nothing
        meter(t)
    assert meter.total == pytest.approx(1.5)
    meter(1.5 + 10 * 365 * 86400)  # a timestamp 10 years ahead earns one frame's cap, not 10 years
    assert meter.total == pytest.approx(1.5 + MAX_FRAME_CREDIT_S)
    meter.next_pass()  # a second pass through the file (timeline after shot detection) counts again
    meter(1.0)
    assert meter.total == pytest.approx(2.5 + MAX_FRAME_CREDIT_S)
    assert totals == sorted(totals) and totals[-1] == meter.total


def test_the_meter_credits_no_more_than_the_cap_per_pass() -> None:
    meter = MediaMeter(None, limit_s=25.0)
    for t in range(100):
        meter(float(t))
    assert meter.total == 25.0


# --------------------------------------------------------------------- the pool, real workers
@pytest.mark.slow  # starts processes
def test_pool_kills_a_stalled_job_after_the_stall_timeout_and_goes_on() -> None:
    budget = DecodeBudget(timeout_s=1.0)
    with IsolatedPool(paced_job, workers=1, budget=budget, progress=True) as pool:
        # steps longer than the report interval (0.1 s): the parent hears of each one
        stalled, after = pool.map([(10, 0.15, 1.0, 3), (2, 0.0, 1.0, None)])
    assert isinstance(stalled, JobFailed) and stalled.limit == STALL, stalled
    assert "no progress for 1 s" in stalled.error and "3.0 s of media" in stalled.error
    assert after == "done"


@pytest.mark.slow  # starts processes
def test_pool_lets_a_long_job_run_while_it_progresses() -> None:
    """Three times the flat timeout, progressing all along (13x real time): not killed. The 2 s budget
    leaves a loaded CI machine room to deschedule the worker between two reports."""
    budget = DecodeBudget(timeout_s=2.0)
    with IsolatedPool(paced_job, workers=1, budget=budget, progress=True) as pool:
        start = time.monotonic()
        [result] = pool.map([(80, 0.075, 1.0, None)])
        elapsed = time.monotonic() - start
    assert result == "done"
    assert elapsed >= 3 * budget.timeout_s  # the sleeps alone: the old flat budget would have killed it


@pytest.mark.slow  # starts processes
def test_pool_kills_a_job_below_the_minimum_speed() -> None:
    """0.5 s of media a second against a floor of 2x real time: killed after about 1.3 s, not 10 s."""
    budget = DecodeBudget(timeout_s=1.0, min_speed=2.0)
    with IsolatedPool(paced_job, workers=1, budget=budget, progress=True) as pool:
        [slow] = pool.map([(100, 0.1, 0.05, None)])
    assert isinstance(slow, JobFailed) and slow.limit == SPEED, slow
    assert "slower than 2x real time" in slow.error


@pytest.mark.slow  # starts processes
def test_a_pool_without_progress_keeps_the_flat_timeout() -> None:
    with IsolatedPool(time.sleep, workers=1, budget=DecodeBudget(timeout_s=1.0)) as pool:
        [failed] = pool.map([600])
    assert isinstance(failed, JobFailed) and failed.limit == TIME and "longer than 1 s" in failed.error


def test_budget_rejects_a_non_positive_minimum_speed() -> None:
    with pytest.raises(ValueError, match="minimum decoding speed"):
        DecodeBudget(min_speed=0.0)


def test_the_index_commands_take_the_budget_options() -> None:
    from diffusionret.cli import build_parser
    from diffusionret.commands.index import decode_budget

    base = ["index", "build", "--model", "m.safetensors", "--videos", "videos", "--out", "idx"]
    args = build_parser().parse_args(base + ["--decode-timeout", "30", "--decode-min-speed", "0.5"])
    assert decode_budget(args) == DecodeBudget(timeout_s=30.0, memory_bytes=4 * 2**30, min_speed=0.5)
    update = build_parser().parse_args(["index", "update", "idx"])
    assert decode_budget(update) == DecodeBudget()  # the library's defaults
    for option in ["--decode-min-speed", "--decode-timeout"]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + [option, "0"])
