"""The reader's statistics: what the training loop saw plus what the pipeline process reports."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from distill_reader.teacher.stats import TeacherStats

log = logging.getLogger("distill_reader")

_RATE_WINDOW = 10.0  # seconds over which samples_per_second is measured
# The pool is suspected of limiting throughput when, over a window, the training loop waited for
# teacher outputs at least this share of the time while the feeder waited for a free slot at least
# that share: neither the loop nor the user's reader is the bound, what is in flight is.
_POOL_WINDOW = 1.0
_LOOP_WAITING = 0.25
_FEEDER_BLOCKED = 0.5


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PoolShape:
    """The sizes that bound how much work can be in flight."""

    capacity: int
    occupied_capacity: int
    batch_size: int
    d_batch_size: int
    max_in_flight: int  # requests per teacher

    @property
    def requests_per_slot(self) -> int:
        return _ceil_div(self.batch_size, self.d_batch_size)

    @property
    def slots_in_flight(self) -> int:
        """Slots at the teachers at most: the training loop holds ``occupied_capacity`` earlier
        batches while it waits for the next one (and one more during a step)."""
        return self.capacity - self.occupied_capacity

    def capacity_for(self, requests: int) -> int:
        """The capacity that keeps ``requests`` requests in flight even during a training step."""
        return self.occupied_capacity + 1 + _ceil_div(requests, self.requests_per_slot)


@dataclass(frozen=True)
class ReaderStats:
    """A snapshot of :meth:`DistillReader.stats`.

    ``samples_per_second`` is measured over the last 10 s of batches; ``consumer_wait_seconds``
    is the total time the training loop spent waiting inside the reader; ``retries`` counts
    requests sent again after a failure; ``teachers`` has one entry per teacher in use (requests in
    flight now, totals and latency percentiles of its last 1024 requests), as of the last second.
    ``pool_limited`` is True once the pool was seen limiting throughput (the training loop waited
    for teacher outputs, the feeder for a free slot, while the teachers could take more requests
    than the pool can hold); ``suggested_capacity`` is then the ``capacity`` that would feed them.
    From the student's side a teacher that is busy with the requests it has (one sharing this
    machine's CPUs, say) looks the same: more capacity then gains nothing.
    """

    samples: int
    batches: int
    samples_per_second: float
    consumer_wait_seconds: float
    retries: int
    teachers: tuple[TeacherStats, ...]
    pool_limited: bool = False
    suggested_capacity: int | None = None
    #: of ``consumer_wait_seconds``, the time the loop waited for teacher outputs (reported to discovery)
    teacher_wait_seconds: float = 0.0
    #: tokens of the rows taken (variable-length rows: the first variable var the teacher is given)
    tokens: int = 0
    #: rows read from the knowledge store (``[store]``) in this reader's pipeline process
    store_hits: int = 0

    @property
    def groups(self) -> dict[str | None, tuple[TeacherStats, ...]]:
        """``teachers`` by teacher group (``[teacher NAME]``; the key None without groups)."""
        by_group: dict[str | None, tuple[TeacherStats, ...]] = {}
        for teacher in self.teachers:
            by_group[teacher.group] = (*by_group.get(teacher.group, ()), teacher)
        return by_group

    def summary(self) -> str:
        teachers = ", ".join(
            f"{t.name} {'ok' if t.healthy else 'FAILING'} in-flight {t.in_flight} "
            f"p50 {_ms(t.latency_ms_p50)} p99 {_ms(t.latency_ms_p99)}"
            for t in self.teachers
        )
        pool = ""
        if self.pool_limited:
            pool = f"; the pool may limit throughput (capacity={self.suggested_capacity} would feed the teachers)"
        return (
            f"{self.samples} samples in {self.batches} batches, {self.samples_per_second:,.0f} samples/s, "
            f"training loop waited {self.consumer_wait_seconds:.1f} s, {self.retries} retries; "
            f"teachers: {teachers or 'none'}{pool}"
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


class StatsTracker:
    """Counts batches on the training loop's side; logs a summary every ``log_interval`` seconds
    at INFO, and with ``DISTILL_READER_PROFILE=1`` prints one timing line per batch to stderr.

    Thread-safe: the training loop counts batches, the feeder its waits for a slot, the receiver
    thread hands in the pipeline process's reports, and any thread takes snapshots.
    """

    def __init__(self, log_interval: float, pool: PoolShape | None = None) -> None:
        self._lock = threading.Lock()
        self.samples = 0
        self.batches = 0
        self.wait_seconds = 0.0
        self.teacher_wait_seconds = 0.0
        self._waiting_since: float | None = None  # perf_counter(): the loop waits for teacher outputs now
        self.tokens = 0
        self.store_hits = 0
        self.retries = 0
        self.teachers: tuple[TeacherStats, ...] = ()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._log_interval = log_interval
        self._last_log = time.monotonic()
        self._log_pending = False
        self.profile = os.environ.get("DISTILL_READER_PROFILE", "") not in ("", "0")
        self._pool = pool
        self.pool_limited = False
        self.suggested_capacity: int | None = None
        self._window_start: float | None = None
        self._window_loop_waited = 0.0  # for teacher outputs
        self._window_feeder_blocked = 0.0
        self._pool_check_pending = False

    def batch(
        self, rows: int, wait: float, fill: float, teacher: float, teacher_wait: float = 0.0, tokens: int = 0
    ) -> bool:
        """Count a yielded batch (``wait``: seconds the loop waited for it, ``teacher_wait`` of them
        for teacher outputs). True when the pipeline process's statistics are wanted: a summary is
        due, or the pool is suspected of limiting throughput (both judged with the next report)."""
        now = time.monotonic()
        with self._lock:
            self.samples += rows
            self.batches += 1
            self.wait_seconds += wait
            self.tokens += tokens
            self._recent.append((now, self.samples))
            while self._recent and now - self._recent[0][0] > _RATE_WINDOW:
                self._recent.popleft()
            if now - self._last_log >= self._log_interval:
                self._last_log = now
                self._log_pending = True
            self._window_loop_waited += teacher_wait
            self._watch_pool(now)
            wanted = self._log_pending or self._pool_check_pending
            batches = self.batches
        if self.profile:
            print(
                f"distill-reader profile: batch {batches} rows {rows} | fill {fill * 1000:.1f} ms | "
                f"teachers {teacher * 1000:.1f} ms | training loop waited {wait * 1000:.1f} ms",
                file=sys.stderr,
            )
        return wanted

    def teachers_wait_began(self, since: float) -> None:
        """The training loop waits for teacher outputs since ``since`` (a perf_counter time):
        ``teacher_wait_seconds`` grows while it lasts, so that a long wait shows before it ends."""
        with self._lock:
            self._waiting_since = since

    def teachers_wait_ended(self, since: float) -> None:
        """The wait that began at ``since`` is over (the slot is done, or the wait raised)."""
        with self._lock:
            self.teacher_wait_seconds += time.perf_counter() - since
            self._waiting_since = None

    @contextlib.contextmanager
    def waiting_for_teachers(self, since: float) -> Iterator[None]:
        """:meth:`teachers_wait_began`, then :meth:`teachers_wait_ended` when the block ends."""
        self.teachers_wait_began(since)
        try:
            yield
        finally:
            self.teachers_wait_ended(since)

    def feeder_waited(self, seconds: float) -> None:
        """The feeder waited ``seconds`` for a free slot."""
        with self._lock:
            self._window_feeder_blocked += seconds

    def _watch_pool(self, now: float) -> None:
        if self._pool is None or self.pool_limited:
            return
        if self._window_start is None:
            self._window_start = now
            self._window_feeder_blocked = self._window_loop_waited = 0.0
            return
        elapsed = now - self._window_start
        if elapsed < _POOL_WINDOW:
            return
        if (
            self._window_loop_waited >= _LOOP_WAITING * elapsed
            and self._window_feeder_blocked >= _FEEDER_BLOCKED * elapsed
        ):
            self._pool_check_pending = True  # judged when the teachers' numbers arrive
        self._window_start = now
        self._window_feeder_blocked = self._window_loop_waited = 0.0

    def pipeline_report(self, teachers: list[TeacherStats], retries: int, store_hits: int = 0) -> None:
        """The pipeline process's statistics arrived."""
        warning = None
        with self._lock:
            self.teachers = tuple(teachers)
            self.retries = retries
            self.store_hits = store_hits
            log_summary, self._log_pending = self._log_pending, False
            if self._pool_check_pending:
                self._pool_check_pending = False
                warning = self._judge_pool()
        if warning:
            log.warning("%s", warning)
        if log_summary:
            log.info("distill-reader: %s", self.snapshot().summary())

    def _judge_pool(self) -> str | None:
        """The loop waited for teachers and the feeder for slots: is the pool what limits?"""
        pool = self._pool
        assert pool is not None
        # Every d_batch is one request to each teacher group: the pool feeds each group as much
        # as a reader of one group, so the group whose teachers take the most requests sizes it.
        groups: dict[str | None, list[TeacherStats]] = {}
        for teacher in self.teachers:
            groups.setdefault(teacher.group, []).append(teacher)
        at_most = pool.slots_in_flight * pool.requests_per_slot
        starved = [
            (len(members) * pool.max_in_flight, len(members))
            for members in groups.values()
            if at_most < len(members) * pool.max_in_flight > sum(t.in_flight for t in members)
        ]
        if not starved:
            return None  # the teachers are the bound: they have all the requests they take
        could_take, n = max(starved)
        self.pool_limited = True
        self.suggested_capacity = pool.capacity_for(could_take)
        return (
            "the pool limits throughput unless the teachers are busy already: "
            f"with capacity={pool.capacity}, occupied_capacity={pool.occupied_capacity} "
            f"and batch_size={pool.batch_size}, at most {pool.slots_in_flight} batches "
            f"({at_most} requests of d_batch_size={pool.d_batch_size}) can be at the teachers while the training "
            f"loop waits, and only {pool.slots_in_flight - 1} during a step, while the {n} teacher(s) could take "
            f"{could_take} (max_in_flight={pool.max_in_flight} each); "
            f"capacity={self.suggested_capacity} would feed them (a teacher that computes all the time with "
            "fewer requests, e.g. one sharing this machine's CPUs, gains nothing from more: compare samples/s)"
        )

    def snapshot(self) -> ReaderStats:
        with self._lock:
            rate = 0.0
            if len(self._recent) >= 2:
                (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
                rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
            return ReaderStats(
                self.samples,
                self.batches,
                rate,
                self.wait_seconds,
                self.retries,
                self.teachers,
                self.pool_limited,
                self.suggested_capacity,
                self.teacher_wait_seconds
                + (time.perf_counter() - self._waiting_since if self._waiting_since is not None else 0.0),
                self.tokens,
                self.store_hits,
            )
