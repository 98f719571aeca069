"""The reader's statistics: what the training loop saw plus what the pipeline process reports."""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from dataclasses import dataclass

from distill_reader.teacher.stats import TeacherStats

log = logging.getLogger("distill_reader")

_RATE_WINDOW = 10.0  # seconds over which samples_per_second is measured


@dataclass(frozen=True)
class ReaderStats:
    """A snapshot of :meth:`DistillReader.stats`.

    ``samples_per_second`` is measured over the last 10 s of batches; ``consumer_wait_seconds``
    is the total time the training loop spent waiting inside the reader; ``retries`` counts
    requests sent again after a failure; ``teachers`` has one entry per teacher in use (requests in
    flight now, totals and latency percentiles of its last 1024 requests), as of the last second.
    """

    samples: int
    batches: int
    samples_per_second: float
    consumer_wait_seconds: float
    retries: int
    teachers: tuple[TeacherStats, ...]

    def summary(self) -> str:
        teachers = ", ".join(
            f"{t.endpoint} {'ok' if t.healthy else 'FAILING'} in-flight {t.in_flight} "
            f"p50 {_ms(t.latency_ms_p50)} p99 {_ms(t.latency_ms_p99)}"
            for t in self.teachers
        )
        return (
            f"{self.samples} samples in {self.batches} batches, {self.samples_per_second:,.0f} samples/s, "
            f"training loop waited {self.consumer_wait_seconds:.1f} s, {self.retries} retries; "
            f"teachers: {teachers or 'none'}"
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


class StatsTracker:
    """Counts batches on the training loop's side; logs a summary every ``log_interval`` seconds
    at INFO, and with ``DISTILL_READER_PROFILE=1`` prints one timing line per batch to stderr."""

    def __init__(self, log_interval: float) -> None:
        self.samples = 0
        self.batches = 0
        self.wait_seconds = 0.0
        self.retries = 0
        self.teachers: tuple[TeacherStats, ...] = ()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._log_interval = log_interval
        self._last_log = time.monotonic()
        self._log_pending = False
        self.profile = os.environ.get("DISTILL_READER_PROFILE", "") not in ("", "0")

    def batch(self, rows: int, wait: float, fill: float, teacher: float) -> bool:
        """Count a yielded batch; True when a summary is due (it is logged with the next report)."""
        now = time.monotonic()
        self.samples += rows
        self.batches += 1
        self.wait_seconds += wait
        self._recent.append((now, self.samples))
        while self._recent and now - self._recent[0][0] > _RATE_WINDOW:
            self._recent.popleft()
        if self.profile:
            print(
                f"distill-reader profile: batch {self.batches} rows {rows} | fill {fill * 1000:.1f} ms | "
                f"teachers {teacher * 1000:.1f} ms | training loop waited {wait * 1000:.1f} ms",
                file=sys.stderr,
            )
        if now - self._last_log >= self._log_interval:
            self._last_log = now
            self._log_pending = True
        return self._log_pending

    def pipeline_report(self, teachers: list[TeacherStats], retries: int) -> None:
        """The pipeline process's statistics arrived."""
        self.teachers = tuple(teachers)
        self.retries = retries
        if self._log_pending:
            self._log_pending = False
            log.info("distill-reader: %s", self.snapshot().summary())

    def snapshot(self) -> ReaderStats:
        rate = 0.0
        if len(self._recent) >= 2:
            (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
            rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
        return ReaderStats(self.samples, self.batches, rate, self.wait_seconds, self.retries, self.teachers)
