"""DistillReader: the seed's API over the pipeline."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from distill_reader.config import ReaderConfig, load_config, validate_reader_args
from distill_reader.errors import ConfigError
from distill_reader.reader.epoch import Epoch
from distill_reader.reader.pipeline import Pipeline
from distill_reader.reader.pool import PoolLayout, check_fits
from distill_reader.reader.source import ReaderSource
from distill_reader.reader.stats import PoolShape, ReaderStats, StatsTracker
from distill_reader.teacher.scheduler import SchedulerOptions

log = logging.getLogger("distill_reader")

Batch = list[np.ndarray]

#: rows each teacher should have in flight by default (max_in_flight = this / d_batch_size, >= 4)
DEFAULT_ROWS_IN_FLIGHT = 128

_STOPPED_BY_NEWER = "this epoch was stopped: a newer epoch of the same reader started (one epoch runs at a time)"


class DistillReader(ReaderSource):
    """Streams the user's samples through teacher servers and yields them with the teacher outputs.

    ``DistillReader(conf_file, batch_size, d_batch_size, capacity, occupied_capacity)``:

    * ``batch_size``: rows of each yielded batch (the last batch of an epoch may be shorter);
    * ``d_batch_size``: rows of each request to a teacher;
    * ``capacity``: batch slots in the shared-memory pool (bounds memory);
    * ``occupied_capacity``: how many earlier batches the consumer may still be using. A yielded
      batch's arrays are views into the pool and stay valid until the consumer has taken
      ``occupied_capacity`` further batches; pass ``copy=True`` to get copies instead.

    Keyword options: ``copy``; ``max_in_flight`` requests per teacher (default: enough for 128 rows,
    at least 4);
    ``request_timeout`` seconds per request (30); ``teacher_timeout``: seconds without any teacher
    answering before the epoch fails with :class:`~distill_reader.NoTeacherError` (120);
    ``max_attempts`` for a request a teacher answers with an error (3); ``log_interval``: seconds
    between statistics lines logged at INFO (60); ``check_finite``: treat teacher answers with NaN
    or inf in a floating-point output, for rows whose inputs are finite, as wrong (True);
    ``group_by_length``: send variable-length rows in d_batches of similar lengths, not in input
    order (True). See :meth:`stats`.

    A batch is a list of arrays: every feed var in config order, then every fetch var.

    Threads: :meth:`stats` may be called from any thread at any time. :meth:`close` may be called
    from any thread: an epoch being iterated elsewhere raises :class:`~distill_reader.DistillReaderError`
    ("the reader was closed") at its next wait for a batch, and a later epoch starts the reader
    again. One epoch runs at a time: starting an epoch (from any thread) stops an unfinished one,
    whose next wait raises ``DistillReaderError`` ("this epoch was stopped: a newer epoch ...").
    """

    def __init__(
        self,
        conf_file: str | os.PathLike[str],
        batch_size: int,
        d_batch_size: int,
        capacity: int,
        occupied_capacity: int,
        *,
        copy: bool = False,
        max_in_flight: int | None = None,
        request_timeout: float = 30.0,
        teacher_timeout: float = 120.0,
        max_attempts: int = 3,
        log_interval: float = 60.0,
        check_finite: bool = True,
        group_by_length: bool = True,
    ) -> None:
        validate_reader_args(batch_size, d_batch_size, capacity, occupied_capacity)
        if max_in_flight is None:
            # Enough rows in flight to fill a teacher's dynamic batches twice over.
            max_in_flight = max(4, -(-DEFAULT_ROWS_IN_FLIGHT // int(d_batch_size)))
        for name, value in (("max_in_flight", max_in_flight), ("max_attempts", max_attempts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        for name, value in (
            ("request_timeout", request_timeout),
            ("teacher_timeout", teacher_timeout),
            ("log_interval", log_interval),
        ):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name}: must be a number of seconds > 0, got {value!r}")
        self.config: ReaderConfig = load_config(conf_file)
        if self.config.mode == "discover" or self.config.report_to:
            from distill_reader.discovery.client import default_student_id

            # One id for the reader's life: its registration and its reports to discovery.
            self.config = dataclasses.replace(self.config, student_id=default_student_id())
        if self.config.store is not None:
            from distill_reader.knowledge.layout import prepare_knowledge_store

            # A store of another config is refused here, before any epoch ([store] groups: only theirs).
            prepare_knowledge_store(self.config.stored_view()[0])
        self.batch_size = int(batch_size)
        self.d_batch_size = int(d_batch_size)
        self.capacity = int(capacity)
        self.occupied_capacity = int(occupied_capacity)
        self.copy = bool(copy)
        self._options = SchedulerOptions(
            max_in_flight=max_in_flight,
            request_timeout=float(request_timeout),
            teacher_timeout=float(teacher_timeout),
            max_attempts=max_attempts,
            check_finite=bool(check_finite),
            group_by_length=bool(group_by_length),
        )
        self._layout = PoolLayout(self.config.pool_specs, len(self.config.feeds), self.batch_size, self.capacity)
        check_fits(self._layout)
        self._stats = StatsTracker(
            float(log_interval),
            PoolShape(self.capacity, self.occupied_capacity, self.batch_size, self.d_batch_size, max_in_flight),
        )
        self._holder = _PipelineHolder()
        self._active: Epoch | None = None
        self._lock = threading.Lock()
        # Stops the pipeline process when the reader is dropped or the interpreter exits.
        weakref.finalize(self, self._holder.close)

    def stats(self, timeout: float = 1.0) -> ReaderStats:
        """Throughput, time the training loop waited, retries, per-teacher requests in flight and
        latency percentiles, and whether the pool limits throughput. A summary is also logged at
        INFO every ``log_interval`` seconds.

        Safe from any thread, e.g. a monitoring thread while the training loop iterates; it waits at
        most ``timeout`` seconds for the pipeline process's numbers (the last ones it sent if they do
        not come in time)."""
        pipeline = self._holder.pipeline
        if pipeline is not None:
            pipeline.request_stats(wait=timeout)
        return self._stats.snapshot()

    def distill_reader(self, skip_rows: int = 0) -> Callable[[], Iterator[Batch]]:
        """A callable; each call runs one epoch (calling the user's reader again) as a generator.

        ``skip_rows``: each epoch drops the first ``skip_rows`` rows the user's reader yields before
        they reach the pool, a teacher or a store: to resume a run where it stopped. The reader
        function still makes those rows (it is called as always); nothing else is done with them.
        A list or a batch that straddles the cut is cut (its later rows are kept)."""
        epoch = super().distill_reader()
        if isinstance(skip_rows, bool) or not isinstance(skip_rows, int) or skip_rows < 0:
            raise ConfigError(f"skip_rows: must be an integer >= 0, got {skip_rows!r}")
        return functools.partial(self._epoch, skip_rows=skip_rows) if skip_rows else epoch

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the pipeline process and free the pool (bounded: a few seconds at worst; up to 60 s
        while a ``[store]`` writer writes its last rows). The reader can be used again afterwards.

        Safe from any thread: an epoch another thread iterates raises ``DistillReaderError`` ("the
        reader was closed") at its next wait, at once if it is waiting now."""
        pipeline = self._holder.pipeline
        if pipeline is not None and not pipeline.owned:
            return  # a forked copy of the training process: the pipeline is its parent's
        if pipeline is not None:
            pipeline.mark_closed()  # wakes the training loop's wait first: it must not wait for us
        with self._lock:
            pipeline = self._holder.pipeline
            if self._active is not None and pipeline is not None:
                pipeline.abort(self._active)
            self._active = None
            self._holder.pipeline = None
        self._holder.stop_reporter()
        if pipeline is not None:
            pipeline.close()

    def __enter__(self) -> DistillReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _ensure_pipeline(self) -> Pipeline:
        holder = self._holder
        if holder.pipeline is not None and not holder.pipeline.alive:
            if not holder.pipeline.closed:  # (closed: close() from another thread is under way)
                log.warning("the pipeline process stopped (%s); starting a new one", holder.pipeline.broken)
            holder.close()
        if holder.pipeline is None:
            holder.pipeline = Pipeline(self.config, self._layout, self.d_batch_size, self._options, self._stats)
        if not holder.reporters and self.config.student_id is not None:
            holder.start_reporter(self.config, self._stats)
        return holder.pipeline

    def _epoch(self, skip_rows: int = 0) -> Iterator[Batch]:
        assert self._reader is not None
        kind, reader = self._reader
        if skip_rows:
            reader = _skipping(kind, reader, skip_rows)
        with self._lock:
            if self._active is not None and self._holder.pipeline is not None:
                # An earlier epoch's generator was left unfinished and is still referenced (or is
                # being iterated by another thread: its next wait raises).
                self._holder.pipeline.abort(self._active, _STOPPED_BY_NEWER)
                self._active = None
            pipeline = self._ensure_pipeline()
            epoch = pipeline.start_epoch(kind, reader, self.occupied_capacity, self.copy)
            self._active = epoch
        finished = False
        try:
            while True:
                # Stopped or closed since the last batch raises; the batch is the pool's views
                # (valid until occupied_capacity further batches are taken) or copies.
                batch = epoch.next_batch()
                if batch is None:
                    finished = True
                    return
                yield batch
        finally:
            with self._lock:
                if self._active is epoch:
                    self._active = None
                    if finished:
                        pipeline.finish(epoch)
                    else:
                        pipeline.abort(epoch)


def _skipping(kind: str, reader: Callable[[], Iterable[Any]], rows: int) -> Callable[[], Iterator[Any]]:
    """``reader`` (of ``kind``: sample, sample_list, batch) without its first ``rows`` rows."""

    def skipped() -> Iterator[Any]:
        left = rows
        source = iter(reader())
        for item in source:
            if kind == "sample":
                left -= 1
            else:
                # a list of samples, or a batch: fields (arrays, or lists of per-row arrays) whose
                # first dimension is the rows
                count = len(item) if kind == "sample_list" else len(item[0])
                if count > left:
                    yield item[left:] if kind == "sample_list" else [field[left:] for field in item]
                    left = 0
                else:
                    left -= count
            if left == 0:
                break
        yield from source

    return skipped


class _PipelineHolder:
    """The reader's pipeline, reachable from its finalizer without keeping the reader alive."""

    pipeline: Pipeline | None = None
    reporters: list | None = None  # StudentReporters while the reader reports to discovery
    instance_id = ""  # the reader's, in its reports: its counts go on across reporters

    def start_reporter(self, config: ReaderConfig, stats: StatsTracker) -> None:
        """Report the reader's figures to discovery (its own servers, or ``[conf] report_to``): in
        discover mode with teacher groups, once to each group's service, with that group's teachers
        (the fleet view shows the student under each service)."""
        from distill_reader.discovery.client import StudentReporter
        from distill_reader.security import ClientSecurity

        def sample(group: str | None = None) -> ReaderStats:
            pipeline = self.pipeline
            if pipeline is not None:
                pipeline.request_stats(wait=0.5)
            snapshot = stats.snapshot()
            if group is None:
                return snapshot
            return dataclasses.replace(snapshot, teachers=tuple(t for t in snapshot.teachers if t.group == group))

        assert config.student_id is not None
        self.instance_id = self.instance_id or uuid.uuid4().hex
        if config.mode == "discover" and config.groups:
            targets = [(g.name, list(g.discovery), g.service_name) for g in config.groups]
        else:
            service = config.service_name if config.mode == "discover" else None
            targets = [(None, list(config.discovery or config.report_to), service)]
        self.reporters = [
            StudentReporter(
                endpoints,
                service_name,
                config.student_id,
                functools.partial(sample, group),
                security=ClientSecurity(config.token, config.tls),
                instance_id=self.instance_id,
            ).start()
            for group, endpoints, service_name in targets
        ]

    def stop_reporter(self) -> None:
        reporters, self.reporters = self.reporters, None
        for reporter in reporters or ():
            reporter.close()

    def close(self) -> None:
        self.stop_reporter()
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close()
