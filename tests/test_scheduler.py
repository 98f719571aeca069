"""The scheduler through the transport seam: in-process teachers (``InProcessTransport``) that
answer, fail transiently, answer errors, answer wrongly, hang and recover. Every d_batch must be
answered exactly once, with its own rows' answer, and the retries and quarantines show in the
stats; a crash of ours is reported, never silently lost."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from reader_models import make_sample, tag

from distill_reader.config import load_config
from distill_reader.errors import (
    NoTeacherError,
    TeacherError,
    TeacherMismatchError,
    TeacherOutputError,
    TransientTeacherError,
)
from distill_reader.teacher.scheduler import Scheduler, SchedulerOptions, TeacherRef, WorkItem
from distill_reader.teacher.stats import TeacherStats
from distill_reader.teacher.transport import Handler, InProcessTransport

pytestmark = pytest.mark.timeout(60)

ROWS, D_BATCH = 16, 2


@dataclass
class Run:
    """What a scheduler run left: the items done (in order), the epoch errors, the crashes reported
    to the loop, each teacher's stats (read before closing) and the scheduler's retries."""

    done: list[WorkItem] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    crashes: list[dict] = field(default_factory=list)
    stats: dict[str, TeacherStats] = field(default_factory=dict)
    retries: int = 0


def right(inputs, lengths):
    """A teacher that answers right: the tag model."""
    return [tag({"img": inputs[0]})["prediction"]]


def fails_first(times: int, error: Exception) -> Handler:
    """A teacher that raises ``error`` on its first ``times`` requests, then answers right."""
    failures = iter(range(times))

    def handler(inputs, lengths):
        if next(failures, None) is not None:
            raise error
        return right(inputs, lengths)

    return handler


def run_teachers(
    config,
    handlers: dict[str, Handler],
    items: list[WorkItem],
    *,
    feed: list | None = None,
    fetch: list | None = None,
    options: SchedulerOptions | None = None,
    request_timeout: float | None = None,
    until: Callable[[Run], bool] | None = None,
    limit: float = 15.0,
) -> Run:
    """Run a scheduler with one in-process teacher per ``handlers`` entry on ``items`` until
    ``until(run)`` (default: every item done, or an epoch error), failing past ``limit`` seconds."""
    run = Run()
    until = until or (lambda r: len(r.done) >= len(items) or bool(r.errors))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: run.crashes.append(context))
        scheduler = Scheduler(
            config,
            feed,
            fetch,
            options or SchedulerOptions(max_in_flight=1),
            run.done.append,
            lambda epoch, exc: run.errors.append(exc),
            lambda message: None,
            transports=lambda ref: InProcessTransport(
                ref.endpoint, handlers[ref.endpoint], request_timeout=request_timeout
            ),
        )
        scheduler.set_teachers([TeacherRef(endpoint) for endpoint in handlers])
        for item in items:
            scheduler.submit(item)
        deadline = time.monotonic() + limit
        while not (run.crashes or until(run)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        run.stats = {s.endpoint: s for s in scheduler.stats()}
        run.retries = scheduler.retries
        await scheduler.close()

    asyncio.run(main())
    return run


@pytest.fixture
def batch(write_config):
    """(config, feed, fetch, items): one slot of ``ROWS`` tag rows in d_batches of ``D_BATCH``."""
    config = load_config(write_config(["127.0.0.1:1"]))
    feed = [[np.stack([make_sample(i)[0] for i in range(ROWS)])]]
    fetch = [[np.zeros((ROWS, 10), np.float32)]]
    items = [WorkItem(k, D_BATCH * k, epoch=0, slot=0, count=D_BATCH) for k in range(ROWS // D_BATCH)]
    return config, feed, fetch, items


def assert_all_answered_once(run: Run, batch) -> None:
    """Every d_batch done exactly once, no error, no crash, and each row holds its own answer."""
    _, feed, fetch, items = batch
    assert not run.errors and not run.crashes, (run.errors, run.crashes)
    assert sorted(item.start for item in run.done) == [item.start for item in items]
    np.testing.assert_array_equal(fetch[0][0], tag({"img": feed[0][0]})["prediction"])


def test_every_d_batch_gets_its_own_rows_answer(batch):
    config, feed, fetch, items = batch
    run = run_teachers(config, {"a": right, "b": right}, items, feed=feed, fetch=fetch)
    assert_all_answered_once(run, batch)
    assert run.retries == 0
    assert sum(s.rows for s in run.stats.values()) == ROWS
    assert all(s.healthy and s.quarantined is None for s in run.stats.values())


def test_transient_failures_go_back_to_the_queue_without_counting_as_attempts(batch):
    """A teacher unreachable twice, then back: its requests are retried (on it, after its back-off)
    and never count as attempts (max_attempts=1 would fail the epoch)."""
    config, feed, fetch, items = batch
    flaky = fails_first(2, TransientTeacherError("teacher flaky: UNAVAILABLE"))
    options = SchedulerOptions(max_in_flight=1, max_attempts=1)
    run = run_teachers(config, {"flaky": flaky}, items, feed=feed, fetch=fetch, options=options)
    assert_all_answered_once(run, batch)
    assert run.retries == 2
    stats = run.stats["flaky"]
    assert (stats.requests, stats.failures, stats.rows) == (len(items) + 2, 2, ROWS)
    assert stats.healthy and stats.quarantined is None


def test_a_hanging_teacher_times_out_and_its_work_goes_to_another(batch):
    """A teacher that never answers: each request times out (transient) and is answered by the other."""
    config, feed, fetch, items = batch
    hung = asyncio.Event()  # never set

    async def hangs(inputs, lengths):
        await hung.wait()

    run = run_teachers(config, {"hangs": hangs, "b": right}, items, feed=feed, fetch=fetch, request_timeout=0.2)
    assert_all_answered_once(run, batch)
    assert run.stats["hangs"].rows == 0 and run.stats["b"].rows == ROWS
    assert run.stats["hangs"].failures >= 1
    assert run.retries == run.stats["hangs"].failures  # each timed-out request was sent again
    assert not run.stats["hangs"].healthy  # backing off


def test_when_every_teacher_hangs_the_epoch_fails_after_teacher_timeout(batch):
    config, feed, fetch, items = batch

    async def hangs(inputs, lengths):
        await asyncio.Event().wait()

    options = SchedulerOptions(max_in_flight=1, teacher_timeout=1.0)
    run = run_teachers(config, {"hangs": hangs}, items, feed=feed, fetch=fetch, options=options, request_timeout=0.2)
    assert not run.done and len(run.errors) == 1, run.errors
    assert isinstance(run.errors[0], NoTeacherError)
    assert "no teacher answered for 1 s" in str(run.errors[0]) and "no answer in 0.2 s" in str(run.errors[0])


def test_an_error_answer_is_retried_on_a_teacher_that_has_not_failed_it(batch):
    """One request answered with an error: it counts as an attempt and is answered by the other
    teacher; the failing teacher stays in use."""
    config, feed, fetch, items = batch
    errs_once = fails_first(1, TeacherError("teacher errs: model failed"))

    # max_attempts=1: attempts run out, but not every usable teacher has failed it: not fatal.
    options = SchedulerOptions(max_in_flight=1, max_attempts=1)
    run = run_teachers(config, {"errs": errs_once, "b": right}, items, feed=feed, fetch=fetch, options=options)
    assert_all_answered_once(run, batch)
    assert run.retries == 1 and run.stats["errs"].failures == 1
    assert run.stats["errs"].quarantined is None
    (failed,) = [item for item in run.done if item.attempts]
    assert (failed.attempts, failed.failed_on) == (1, {"errs"})


def test_a_d_batch_failing_max_attempts_times_on_every_teacher_fails_the_epoch(batch):
    """Both teachers answer one d_batch with an error: the epoch fails after exactly max_attempts,
    naming the error; the other d_batches are answered once."""
    config, feed, fetch, items = batch
    tries: Counter[str] = Counter()
    poisoned = items[-1]  # the last: the d_batches before it are all answered when the epoch fails

    def errs_on_one(name: str) -> Handler:
        def handler(inputs, lengths):
            if np.array_equal(inputs[0], feed[0][0][poisoned.start : poisoned.start + poisoned.count]):
                tries[name] += 1
                raise TeacherError(f"teacher {name}: model failed on this d_batch")
            return right(inputs, lengths)

        return handler

    options = SchedulerOptions(max_in_flight=1, max_attempts=3)
    run = run_teachers(
        config,
        {"a": errs_on_one("a"), "b": errs_on_one("b")},
        items,
        feed=feed,
        fetch=fetch,
        options=options,
        until=lambda r: bool(r.errors) and len(r.done) >= len(items) - 1,
    )
    assert len(run.errors) == 1 and isinstance(run.errors[0], TeacherError), run.errors
    assert "model failed on this d_batch (after 3 attempts)" in str(run.errors[0])
    assert sum(tries.values()) == 3 and set(tries) == {"a", "b"}
    assert sorted(item.start for item in run.done) == [i.start for i in items if i is not poisoned]


@pytest.mark.parametrize(
    "wrong",
    [
        TeacherMismatchError("teacher wrong returned FP32[2, 7] for fetch var 'prediction', expected FP32[2, 10]"),
        TeacherOutputError("teacher wrong answered NaN or inf in fetch var 'prediction' for 2 of 2 rows"),
    ],
    ids=["mismatch", "nan"],
)
def test_a_teacher_answering_wrongly_is_quarantined_and_its_work_goes_to_another(batch, wrong):
    config, feed, fetch, items = batch

    def answers_wrongly(inputs, lengths):
        raise wrong

    options = SchedulerOptions(max_in_flight=1, max_attempts=1)  # a quarantine is no attempt
    run = run_teachers(config, {"wrong": answers_wrongly, "b": right}, items, feed=feed, fetch=fetch, options=options)
    assert_all_answered_once(run, batch)
    stats = run.stats["wrong"]
    assert stats.quarantined == str(wrong) and not stats.healthy
    assert (stats.requests, stats.failures, stats.rows) == (1, 1, 0)  # not asked again while quarantined
    assert run.retries == 1 and run.stats["b"].rows == ROWS


def test_when_every_teacher_is_quarantined_the_epoch_fails_at_once(batch):
    config, feed, fetch, items = batch

    def answers_nan(inputs, lengths):
        raise TeacherOutputError("teacher only answered NaN")

    options = SchedulerOptions(max_in_flight=1, teacher_timeout=60.0)  # not waited for: within `limit`
    run = run_teachers(config, {"only": answers_nan}, items, feed=feed, fetch=fetch, options=options, limit=5.0)
    assert len(run.errors) == 1 and isinstance(run.errors[0], TeacherOutputError), run.errors
    assert str(run.errors[0]) == "no usable teacher: teacher only answered NaN" and not run.done


def test_a_quarantined_teacher_rejoins_once_it_answers_right(batch):
    """Wrong once, then right: after its back-off (2 s) its metadata is checked, one trial request
    is answered right and it is used again; every d_batch still answered once."""
    config, feed, fetch, items = batch
    recovers = fails_first(1, TeacherOutputError("teacher recovers answered NaN"))

    async def slow(inputs, lengths):  # keeps the epoch going past the quarantine's back-off
        await asyncio.sleep(0.5)
        return right(inputs, lengths)

    run = run_teachers(config, {"recovers": recovers, "slow": slow}, items, feed=feed, fetch=fetch)
    assert_all_answered_once(run, batch)
    stats = run.stats["recovers"]
    assert stats.quarantined is None and stats.healthy and stats.failures == 1
    assert stats.rows > 0 and stats.rows + run.stats["slow"].rows == ROWS
    assert run.retries == 1


def test_a_crashed_worker_is_reported_to_the_loop(batch):
    config, feed, fetch, items = batch

    def broken(inputs, lengths):
        raise ValueError("a bug in the request path")

    run = run_teachers(config, {"broken": broken}, items[:1], feed=feed, fetch=fetch, limit=5.0)
    assert not run.done and not run.errors
    assert len(run.crashes) == 1 and run.crashes[0]["distill_reader"]
    assert isinstance(run.crashes[0]["exception"], ValueError)
