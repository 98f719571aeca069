"""Spreads d_batches over teachers, with many requests in flight: runs in the pipeline process.

Every teacher has ``max_in_flight`` worker coroutines taking work from one shared priority queue,
so a faster teacher takes more work and a slow one never holds up the rest. The queue is ordered by
the position of the d_batch in the epoch, so the batch the consumer waits for goes first, retries
included.

What happens to a teacher, by what went wrong (see :mod:`distill_reader.teacher.client`):

* *Transient* (unreachable, timed out): the request goes back to the queue for any teacher; the
  teacher backs off (0.2 s doubling to 5 s) and is retried after it.
* *Unusable* (its metadata or answers do not match the config, it refuses the token, it is not an
  OIP server, it answers NaN or inf): the teacher is **quarantined**. One WARNING names it and
  what is wrong; its requests go to the other teachers without counting as attempts; its metadata
  is checked again after a back-off (2 s doubling to 60 s), at the start of each epoch, and when it
  registers again with discovery. Once its metadata passes, it is *on trial*: one request at a time
  (its answer, when right, is used) and it stays quarantined until one is answered right, since
  metadata cannot show wrong answers. Then it rejoins. When every teacher is quarantined,
  the epoch fails at once with the reasons of each.
* *A request answered with an error*: it counts as an attempt and goes to a teacher that has not
  failed it, if there is one; once it has failed ``max_attempts`` times and on every usable teacher,
  the epoch fails with the message.

While work is waiting and no teacher answers (including when there is no teacher at all, e.g. no
discovery server is reachable), a warning is logged every few seconds, and after
``teacher_timeout`` seconds the epoch fails with :class:`~distill_reader.errors.NoTeacherError`.
No failure outlives its epoch: the next epoch starts by checking every quarantined teacher again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from distill_reader.config import ReaderConfig
from distill_reader.errors import (
    NoTeacherError,
    TeacherAuthError,
    TeacherError,
    TeacherMismatchError,
    TeacherOutputError,
    TransientTeacherError,
)
from distill_reader.teacher.stats import LatencyWindow, TeacherStats
from distill_reader.teacher.transport import DBatch, TeacherRef, Transport, TransportFactory

log = logging.getLogger(__name__)

_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0
_QUARANTINE_FIRST = 2.0
_QUARANTINE_MAX = 60.0
_WARN_EVERY = 5.0
_PASS_OVER_DELAY = 0.05  # a worker that leaves an item to other teachers waits this long
_TRIAL_WAIT = 1.0  # longest sleep of a worker while another one's trial request is in flight
#: errors after which a teacher cannot serve the config until it changes: it is quarantined
UNUSABLE = (TeacherMismatchError, TeacherAuthError, TeacherOutputError)


def spawn(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """A task whose crash is reported to the event loop's exception handler at once, marked
    ``distill_reader`` (the pipeline process turns it into an error in the training loop), instead
    of waiting silently for garbage collection while the work it held is never finished."""
    task = asyncio.get_running_loop().create_task(coroutine)
    task.add_done_callback(_report_crash)
    return task


def _report_crash(task: asyncio.Task) -> None:
    if task.cancelled() or task.exception() is None:
        return
    task.get_loop().call_exception_handler(
        {
            "message": f"task {task.get_name()} crashed",
            "exception": task.exception(),
            "task": task,
            "distill_reader": True,
        }
    )


@dataclass(order=True)
class WorkItem:
    """Rows ``[start, start + count)`` of batch slot ``slot``, or the rows ``rows`` of it (a
    d_batch of rows grouped by length, ``start`` then orders the groups); ordered by position in
    the epoch."""

    sequence: int  # the batch's number in the epoch
    start: int
    epoch: int = field(compare=False)
    slot: int = field(compare=False)
    count: int = field(compare=False)
    rows: np.ndarray | None = field(default=None, compare=False)
    attempts: int = field(default=0, compare=False)  # answers that were errors, from any teacher
    failed_on: set[str] = field(default_factory=set, compare=False)  # endpoints that answered wrongly


@dataclass
class SchedulerOptions:
    max_in_flight: int = 4
    request_timeout: float = 30.0
    teacher_timeout: float = 120.0
    max_attempts: int = 3
    #: treat answers with NaN or inf in a floating-point output as wrong (quarantine the teacher)
    check_finite: bool = True
    #: variable-length rows: d_batches of rows of similar length (False: in input order)
    group_by_length: bool = True


class _Teacher:
    def __init__(self, ref: TeacherRef, client: Transport) -> None:
        self.ref = ref
        self.client = client
        self.failures = 0  # consecutive transient failures
        self.available_at = 0.0  # no request before this (back-off or quarantine)
        self.last_error = ""
        self.checked = False
        self.declares_tensors = True  # False: its metadata lists no tensors, only answers can be checked
        self.answered = False  # has answered a request correctly since it was last checked
        self.check_lock = asyncio.Lock()
        self.workers: list[asyncio.Task] = []
        self.removed = False
        self.quarantined: TeacherError | None = None  # why it cannot serve the config now
        self.warned = ""  # the reason last logged at WARNING; cleared when it answers well again
        self.quarantines = 0  # how often it was quarantined: the back-off grows with it
        self.on_trial = False  # quarantined, checked, and one request is in flight to see if it answers right
        self.in_flight = 0
        self.requests = 0
        self.failed_requests = 0
        self.rows = 0  # rows of its answers that were used
        self.latencies = LatencyWindow()
        self._nudge = asyncio.Event()

    def stats(self) -> TeacherStats:
        return TeacherStats(
            self.client.endpoint,
            not self.failing and self.quarantined is None,
            self.in_flight,
            self.requests,
            self.failed_requests,
            *self.latencies.percentiles_ms(),
            quarantined=str(self.quarantined) if self.quarantined is not None else None,
            rows=self.rows,
        )

    @property
    def failing(self) -> bool:
        return self.failures > 0

    async def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; :meth:`wake` ends it early."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._nudge.wait(), seconds)

    def wake(self) -> None:
        """End every worker's :meth:`sleep` now (a fresh event for the sleeps that follow)."""
        self._nudge.set()
        self._nudge = asyncio.Event()

    def recheck_now(self) -> None:
        """Check a quarantined teacher again at once instead of after its back-off."""
        self.checked = False
        if self.quarantined is not None:
            self.available_at = time.monotonic()
            self.wake()


class Scheduler:
    """Owns the teacher clients and their workers; see the module docstring."""

    def __init__(
        self,
        config: ReaderConfig,
        feed_arrays: Sequence[Sequence[np.ndarray]],
        fetch_arrays: Sequence[Sequence[np.ndarray]],
        options: SchedulerOptions,
        on_done: Callable[[WorkItem], None],
        on_error: Callable[[int, Exception], None],
        on_warning: Callable[[str], None],
        length_arrays: Sequence[Sequence[np.ndarray]] = (),
        *,
        transports: TransportFactory,
    ) -> None:
        r"""``feed_arrays``/``fetch_arrays``/``length_arrays``: per slot, the views of the pool a
        :class:`WorkItem` names; ``transports``: makes the transport of each :class:`TeacherRef`
        given to :meth:`set_teachers` (the pipeline process's is
        :func:`~distill_reader.teacher.factory.transport_factory`; tests give
        :class:`~distill_reader.teacher.transport.InProcessTransport`\ s). The scheduler knows
        nothing of protocols or shared memory."""
        self._config = config
        self._transports = transports
        self._feed_arrays = feed_arrays  # [slot][predict var] views
        self._fetch_arrays = fetch_arrays  # [slot][fetch var] views
        self._length_arrays = length_arrays  # [slot][variable predict var] views of the row lengths
        #: per predict var: the axes (of a batch array) of its variable dimensions
        self._feed_axes = [tuple(1 + a for a, d in enumerate(s.shape) if d == -1) for s in config.predict_feeds]
        self._fetch_axes = [tuple(1 + a for a, d in enumerate(s.shape) if d == -1) for s in config.fetches]
        self._options = options
        self._on_done = on_done
        self._on_error = on_error
        self._on_warning = on_warning
        self._queue: asyncio.PriorityQueue[WorkItem] = asyncio.PriorityQueue()
        self._teachers: dict[str, _Teacher] = {}
        self._active_epoch = -1
        self._cancelled_upto = -1
        self._outstanding = 0  # items of the active epoch not yet done
        self._stalled_since: float | None = None
        self._last_warning = 0.0
        self._failed_epoch = -1
        self._watchdog: asyncio.Task | None = None
        #: says why there is no teacher at all (e.g. discovery unreachable), for warnings and errors
        self.describe_source: Callable[[], str] = lambda: "no teacher assigned"
        self.retries = 0  # requests sent again after a failure

    # -- teacher set -------------------------------------------------------------------------
    def set_teachers(self, teachers: Sequence[TeacherRef]) -> None:
        """Use exactly these teachers from now on (one transport each, made by the factory)."""
        wanted = {ref.endpoint: ref for ref in teachers}
        for endpoint, teacher in list(self._teachers.items()):
            ref = wanted.get(endpoint)
            if ref is None or replace(ref, registration="") != replace(teacher.ref, registration=""):
                # Gone, or another model or protocol: another transport.
                self._remove(endpoint)
            elif ref.registration != teacher.ref.registration:
                # It registered again (restarted, reconfigured): check it again before using it.
                teacher.ref = ref
                teacher.recheck_now()
        for endpoint, ref in wanted.items():
            if endpoint not in self._teachers:
                teacher = _Teacher(ref, self._transports(ref))
                teacher.workers = [spawn(self._worker(teacher)) for _ in range(self._options.max_in_flight)]
                self._teachers[endpoint] = teacher
        self._ensure_watchdog()
        self._fail_if_none_usable()

    def _remove(self, endpoint: str) -> None:
        teacher = self._teachers.pop(endpoint)
        teacher.removed = True  # its workers finish their current request, then stop
        teacher.wake()
        spawn(self._close_later(teacher))

    def stats(self) -> list[TeacherStats]:
        return [teacher.stats() for teacher in self._teachers.values()]

    async def _close_later(self, teacher: _Teacher) -> None:
        await asyncio.gather(*teacher.workers, return_exceptions=True)
        await teacher.client.close()

    async def close(self) -> None:
        for teacher in self._teachers.values():
            teacher.removed = True
            for task in teacher.workers:
                task.cancel()
        if self._watchdog:
            self._watchdog.cancel()
        # All at once: a transport's close may make calls (shared memory unregisters its regions),
        # and the pipeline process has a bounded time to stop.
        await asyncio.gather(*(self._close_later(t) for t in self._teachers.values()), return_exceptions=True)
        self._teachers.clear()

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = spawn(self._watch())

    # -- work --------------------------------------------------------------------------------
    def submit(self, item: WorkItem) -> None:
        if item.epoch <= self._cancelled_upto:
            return
        if item.epoch != self._active_epoch:
            self._active_epoch = item.epoch
            self._outstanding = 0
            self._stalled_since = None
            # No failure outlives its epoch: a teacher fixed meanwhile must not wait out its back-off.
            for teacher in self._teachers.values():
                if teacher.quarantined is not None:
                    teacher.recheck_now()
        if item.epoch == self._failed_epoch:
            return
        self._ensure_watchdog()
        self._outstanding += 1
        self._queue.put_nowait(item)
        self._fail_if_none_usable()

    def cancel(self, epoch: int) -> None:
        """Drop all work of ``epoch`` and earlier: from now on nothing is written into the pool for
        it (no transport writes into the pool while a request is in flight: see DBatch.live), so its
        slots may be reused at once."""
        self._cancelled_upto = max(self._cancelled_upto, epoch)
        if self._active_epoch <= epoch:
            self._outstanding = 0
            self._stalled_since = None

    def _live(self, item: WorkItem) -> bool:
        return item.epoch > self._cancelled_upto and item.epoch != self._failed_epoch

    def _usable(self, teacher: _Teacher) -> bool:
        return not teacher.removed and teacher.quarantined is None

    async def _worker(self, teacher: _Teacher) -> None:
        while not teacher.removed:
            delay = teacher.available_at - time.monotonic()
            if delay > 0:
                await teacher.sleep(delay)
                continue
            if not teacher.checked and not await self._check(teacher):
                continue
            trial = teacher.quarantined is not None  # checked but still quarantined: one request tells
            if trial:
                if teacher.on_trial:
                    await teacher.sleep(_TRIAL_WAIT)  # another worker's trial request is in flight
                    continue
                teacher.on_trial = True
            try:
                await self._take_and_run(teacher, trial)
            finally:
                if trial:
                    teacher.on_trial = False
                    teacher.wake()

    async def _take_and_run(self, teacher: _Teacher, trial: bool) -> None:
        item = await self._queue.get()
        if not self._live(item):
            return
        if teacher.removed:
            self._queue.put_nowait(item)
            return
        quarantined_meanwhile = teacher.quarantined is not None and not trial
        if teacher.available_at > time.monotonic() or quarantined_meanwhile or self._better_elsewhere(teacher, item):
            # This teacher failed or was quarantined meanwhile, or answered this item wrongly while
            # another teacher has not tried it yet: leave the item to the others.
            self._queue.put_nowait(item)
            await asyncio.sleep(_PASS_OVER_DELAY)
            return
        await self._run(teacher, item)

    def _better_elsewhere(self, teacher: _Teacher, item: WorkItem) -> bool:
        endpoint = teacher.client.endpoint
        return endpoint in item.failed_on and any(
            name not in item.failed_on and self._usable(other) for name, other in self._teachers.items()
        )

    async def _check(self, teacher: _Teacher) -> bool:
        """Read the teacher's metadata once (all its workers wait for the one check)."""
        async with teacher.check_lock:
            if teacher.checked:
                return True
            if teacher.available_at > time.monotonic():
                return False  # the check another worker just made failed
            try:
                teacher.declares_tensors = await teacher.client.check_metadata()
            except TransientTeacherError as exc:
                self._teacher_failed(teacher, str(exc))
                return False
            except UNUSABLE as exc:
                self._quarantine(teacher, exc, again=True)
                return False
            except TeacherError as exc:  # an error answer to the metadata call: try again later
                self._teacher_failed(teacher, str(exc))
                return False
            teacher.checked = True
            teacher.answered = False
            if not teacher.declares_tensors:
                log.info(
                    "teacher %s declares no tensors in its metadata; its answers are checked instead",
                    teacher.client.endpoint,
                )
            if teacher.quarantined is not None:
                log.info(
                    "teacher %s passed its metadata check; back in use once it answers one request right",
                    teacher.client.endpoint,
                )
            return True

    def _request(self, item: WorkItem) -> DBatch:
        """The d_batch's inputs (variable vars cut to its longest row), its rows' lengths and, when
        its rows are contiguous, their place in the pool's fetch vars."""
        rows = slice(item.start, item.start + item.count) if item.rows is None else item.rows
        inputs = [a[rows] for a in self._feed_arrays[item.slot]]
        # Rows picked by index would be copies: only contiguous rows can be written in place.
        outputs = [a[rows] for a in self._fetch_arrays[item.slot]] if item.rows is None else []
        if not self._length_arrays:
            return DBatch(inputs, [], outputs, live=lambda: self._live(item))
        lengths = [a[rows] for a in self._length_arrays[item.slot]]
        lengths_of = iter(lengths)
        for k, axes in enumerate(self._feed_axes):
            if axes:
                longest = int(next(lengths_of).max(initial=0))
                inputs[k] = inputs[k][
                    tuple(slice(0, longest) if a in axes else slice(None) for a in range(inputs[k].ndim))
                ]
        return DBatch(inputs, lengths, outputs, live=lambda: self._live(item))

    def _write(self, item: WorkItem, outputs: Sequence[np.ndarray]) -> None:
        """Teacher outputs into the pool; a variable var's space past the answer is zeroed (the
        answer itself is zero past each row's length: see the client)."""
        rows = slice(item.start, item.start + item.count) if item.rows is None else item.rows
        for dst, src, axes in zip(self._fetch_arrays[item.slot], outputs, self._fetch_axes):
            if not axes:
                dst[rows] = src
                continue
            head = tuple(slice(0, src.shape[a]) if a in axes else slice(None) for a in range(1, src.ndim))
            dst[(rows, *head)] = src
            for a in axes:
                dst[(rows, *(slice(src.shape[a], None) if b == a else slice(None) for b in range(1, src.ndim)))] = 0

    async def _run(self, teacher: _Teacher, item: WorkItem) -> None:
        batch = self._request(item)
        trial = teacher.quarantined is not None  # sent while quarantined: its answer decides
        teacher.in_flight += 1
        teacher.requests += 1
        started = time.perf_counter()
        try:
            outputs = await teacher.client.infer(batch)
        except TransientTeacherError as exc:
            self._teacher_failed(teacher, str(exc))
            self._requeue(item)
            return
        except UNUSABLE as exc:
            self._quarantine(teacher, exc, again=trial)
            self._requeue(item)
            return
        except TeacherError as exc:
            if not teacher.declares_tensors and not teacher.answered:
                # Nothing was declared and nothing answered yet: the request itself does not fit it.
                error = TeacherMismatchError(f"{exc} (it declares no tensors to check against)")
                self._quarantine(teacher, error, again=trial)
                self._requeue(item)
                return
            self._teacher_failed(teacher, str(exc))
            item.attempts += 1
            item.failed_on.add(teacher.client.endpoint)
            tried_by_all = all(
                endpoint in item.failed_on for endpoint, other in self._teachers.items() if self._usable(other)
            )
            if item.attempts >= self._options.max_attempts and tried_by_all:
                self._fail(item.epoch, TeacherError(f"{exc} (after {item.attempts} attempts)"))
            else:
                self._requeue(item)
            return
        finally:
            teacher.in_flight -= 1
        teacher.latencies.add(time.perf_counter() - started)
        if teacher.failing:
            log.info("teacher %s answers again", teacher.client.endpoint)
        teacher.failures = 0
        teacher.answered = True
        teacher.warned = ""
        if teacher.quarantined is not None:
            log.info("teacher %s answered right again; back in use", teacher.client.endpoint)
            teacher.quarantined = None
            teacher.wake()
        self._stalled_since = None
        if not self._live(item):
            return  # the epoch was cancelled while the request was in flight
        teacher.rows += item.count
        if outputs is not None:  # None: the transport wrote them into the pool
            self._write(item, outputs)
        self._outstanding -= 1
        self._on_done(item)

    def _requeue(self, item: WorkItem) -> None:
        if self._live(item):
            self.retries += 1
            self._queue.put_nowait(item)

    def _teacher_failed(self, teacher: _Teacher, message: str) -> None:
        teacher.failed_requests += 1
        teacher.last_error = message
        now = time.monotonic()
        if now < teacher.available_at:
            return  # another request in flight failed with it: one back-off step per failure episode
        if not teacher.failing:
            others = "its requests go to the other teachers" if len(self._teachers) > 1 else "retrying"
            log.warning("%s; %s", message, others)
        teacher.failures += 1
        backoff = min(_BACKOFF_FIRST * 2 ** (teacher.failures - 1), _BACKOFF_MAX)
        teacher.available_at = now + backoff
        teacher.checked = teacher.checked and teacher.failures < 2  # re-read metadata after a restart

    def _quarantine(self, teacher: _Teacher, error: TeacherError, *, again: bool = False) -> None:
        """Take a teacher that cannot serve the config out of use until it passes a check and a trial
        request again. ``again``: it failed its check or trial (not a request sent before it was
        quarantined), so its back-off grows."""
        teacher.failed_requests += 1
        teacher.last_error = str(error)
        if teacher.quarantined is not None and not again:
            return  # answers to requests that were in flight when it was quarantined
        repeated = teacher.warned == str(error)
        teacher.warned = str(error)
        teacher.quarantines += 1
        backoff = min(_QUARANTINE_FIRST * 2 ** (teacher.quarantines - 1), _QUARANTINE_MAX)
        teacher.quarantined = error
        teacher.checked = False
        teacher.available_at = time.monotonic() + backoff
        if repeated:  # one WARNING per reason, not one per check
            log.info("teacher %s is still quarantined; checked again in %.0f s", teacher.client.endpoint, backoff)
        else:
            others = sum(1 for t in self._teachers.values() if self._usable(t))
            where = f"its requests go to the {others} other teacher(s)" if others else "no other teacher is usable"
            log.warning("quarantined: %s; %s, checked again in %.0f s", error, where, backoff)
        self._fail_if_none_usable()

    def _fail_if_none_usable(self) -> None:
        """Fail the epoch at once when every teacher is quarantined and none is due for a check:
        waiting for ``teacher_timeout`` cannot help, only a fixed teacher or config can."""
        teachers = list(self._teachers.values())
        if not teachers or self._outstanding <= 0 or self._active_epoch in (self._failed_epoch, -1):
            return
        if self._active_epoch <= self._cancelled_upto:
            return
        now = time.monotonic()
        if any(t.quarantined is None or t.available_at <= now for t in teachers):
            return
        errors = [t.quarantined for t in teachers if t.quarantined is not None]
        kinds = {type(e) for e in errors}
        cls = kinds.pop() if len(kinds) == 1 else TeacherError
        if len(errors) == 1:
            message = f"no usable teacher: {errors[0]}"
        else:
            message = f"none of the {len(errors)} teachers can serve this config: " + "; ".join(map(str, errors))
        self._fail(self._active_epoch, cls(message))

    def _fail(self, epoch: int, exc: Exception) -> None:
        if epoch < 0 or epoch <= self._cancelled_upto or epoch == self._failed_epoch:
            return
        self._failed_epoch = epoch
        self._on_error(epoch, exc)

    async def _watch(self) -> None:
        """Warn while no teacher answers and give up after teacher_timeout."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            teachers = list(self._teachers.values())
            stalled = (
                self._outstanding > 0
                and self._active_epoch > self._cancelled_upto
                and self._active_epoch != self._failed_epoch
                and all(t.failing or t.quarantined is not None for t in teachers)
            )
            if not stalled:
                self._stalled_since = None
                continue
            if self._stalled_since is None:
                self._stalled_since = now
                self._last_warning = 0.0
            waited = now - self._stalled_since
            detail = "; ".join(t.last_error for t in teachers if t.last_error) or self.describe_source()
            timeout = self._options.teacher_timeout
            if waited >= timeout:
                # The limit, not ``waited``: a late tick on a busy machine must not change the message.
                self._fail(
                    self._active_epoch,
                    NoTeacherError(
                        f"no teacher answered for {timeout:g} s (teacher_timeout={timeout:g}); last errors: {detail}"
                    ),
                )
            elif now - self._last_warning >= _WARN_EVERY:
                self._last_warning = now
                self._on_warning(
                    f"no teacher answers ({detail}); retrying, giving up in "
                    f"{self._options.teacher_timeout - waited:.0f} s"
                )
