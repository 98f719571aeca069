"""The pipeline process: talks to the teachers so the training loop's process does not.

Started by :class:`distill_reader.reader.process.ProcessHandle` as a fresh interpreter running
:func:`main` with the two pipe descriptors as arguments (not ``multiprocessing``: its spawn would
import the user's script again, which the seed's unguarded example cannot survive). Lifecycle:

1. reads the :class:`PipelineSpec` from its input pipe, maps the shared pool, answers ``Ready``;
2. runs an asyncio loop: messages from the parent become work for the
   :class:`~distill_reader.teacher.scheduler.Scheduler`, which writes teacher outputs into the pool;
   when every row of a sealed slot is done it answers ``SlotDone``. With a ``[store]``, a
   :class:`~distill_reader.knowledge.session.KnowledgeSession` fills the rows of each sealed slot
   it has (``read``, ``cache``: the others go to the teachers, or fail the epoch for ``read``,
   which never contacts a teacher) and records what the teachers answer (``write``, ``cache``);
3. stops on ``Stop``, on end-of-file from the parent (the parent exited or was killed) or when its
   parent process changes (the pipe can stay open in processes the parent forked later).

It ignores SIGINT: Ctrl-C is the training loop's to handle, which then stops this process.

The messages (NamedTuples of :mod:`distill_reader.reader.channel`). Parent -> child:

* ``Work(epoch, sequence, slot, start, count)``: a d_batch is written, send it to a teacher;
* ``Seal(epoch, slot, rows)``: every d_batch of the slot was sent;
* ``Cancel(epoch)``: drop the work of that epoch and earlier, answered by ``Cancelled(epoch)``;
  nothing is written into the pool for it afterwards, so it is answered at once (no teacher writes
  into the pool itself: over shared memory, answers go into an output ring, see docs/transports.md),
  or once the knowledge store's reads into slots (in threads, off the event loop) have ended;
* ``StatsRequest()``, answered by ``StatsReport([TeacherStats], retries, store_hits)``;
* ``Stop()``.

Child -> parent: ``Ready()``; ``SlotDone(epoch, slot, seconds_since_its_first_request)``;
``EpochError(epoch, exception)`` (the training loop raises it); ``Cancelled(epoch)``;
``Fatal(exception)`` (this process cannot go on: the next epoch starts a new one);
``StatsReport(...)``; ``LogMessage(...)``: every log record of this process, which the training
process emits under the same logger name (so the user's logging configuration applies);
``LogsDropped(count)``: records this process dropped (below). Only when the parent is gone do
records go to this process's stderr instead.

The event loop is the only reader of the input pipe. Nothing here waits for the training process:
the event loop (and logging, from any thread) only puts messages on the :class:`_Outbox`, whose
thread is the one writer of the output pipe. Channel messages are always queued (how many can be
pending is bounded by what the training process asked for: a ``SlotDone`` per sealed slot, a
``Cancelled`` per ``Cancel``, a ``StatsReport`` per ``StatsRequest``); log records beyond
``_LOG_BACKLOG`` waiting are dropped and counted, and the count is sent as ``LogsDropped`` once
the pipe takes messages again. An exception this process cannot send as it is (it cannot be
pickled) is sent as its type, message and traceback text (see :mod:`~distill_reader.reader.channel`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from distill_reader._logging import FORMAT
from distill_reader.config import ReaderConfig
from distill_reader.errors import DistillReaderError, PipelineError, StoreError
from distill_reader.reader.channel import (
    Cancel,
    Cancelled,
    EpochError,
    Fatal,
    LogMessage,
    LogsDropped,
    Message,
    Ready,
    Receiver,
    Seal,
    Sender,
    SlotDone,
    StatsReport,
    StatsRequest,
    Stop,
    Work,
    as_text,
    encode,
)
from distill_reader.reader.grouping import group_by_length
from distill_reader.reader.pool import PoolLayout, SharedBuffer
from distill_reader.teacher.factory import transport_factory
from distill_reader.teacher.scheduler import Scheduler, SchedulerOptions, TeacherRef, WorkItem, spawn
from distill_reader.teacher.stats import TeacherStats

if TYPE_CHECKING:
    from distill_reader.knowledge.session import KnowledgeSession

log = logging.getLogger("distill_reader.pipeline")

_LOG_BACKLOG = 10_000  # log records waiting for the pipe beyond which more are dropped (and counted)
_FLUSH_TIMEOUT = 2.0  # seconds the last messages may take to leave when this process exits


@dataclass(frozen=True)
class PipelineSpec:
    config: ReaderConfig
    layout: PoolLayout
    shm_fd: int  # the pool's descriptor, inherited
    options: SchedulerOptions
    log_level: int
    parent_pid: int
    d_batch_size: int  # rows per request; variable rows are grouped by length into d_batches


class _Outbox:
    """The messages to the training process: queued by anyone without waiting, written into the pipe
    by a thread of their own (see the module docstring)."""

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self._queue: collections.deque[tuple[bytes, str, bool]] = collections.deque()  # data, name, is a log
        self._cond = threading.Condition()
        self._logs = 0  # log records in the queue
        self._dropped = 0  # log records dropped since the last LogsDropped
        self._sending = False
        self._closing = False
        self.gone = False  # the training process is gone (its end of the pipe is closed)
        self.failed = False  # the thread crashed (a bug of ours): nothing more can be sent
        self.on_gone: Callable[[], None] = lambda: None  # called once, from the outbox's thread
        self._thread = threading.Thread(target=self._run, name="distill-reader-outbox", daemon=True)
        self._thread.start()

    def put(self, message: Message) -> None:
        """Queue a channel message (an exception it carries is made sendable first)."""
        data = encode(message)
        with self._cond:
            self._queue.append((data, type(message).__name__, False))
            self._cond.notify()

    def put_log(self, message: LogMessage) -> bool:
        """Queue a log record, or count it as dropped when too many wait; False once the parent is gone."""
        if self.gone:
            return False
        data = encode(message)
        with self._cond:
            if self._logs >= _LOG_BACKLOG:
                self._dropped += 1
                return True
            self._logs += 1
            self._queue.append((data, "LogMessage", True))
            self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._dropped and not self._closing:
                    self._cond.wait()
                if self._queue:
                    data, what, is_log = self._queue.popleft()
                    self._logs -= is_log
                elif self._dropped:  # the pipe takes messages again: say how many were dropped
                    data, what = encode(LogsDropped(self._dropped)), "LogsDropped"
                    self._dropped = 0
                else:
                    return  # closing, and everything was sent
                self._sending = True
            try:
                self._sender.send_bytes(data, what)
            except OSError:
                self._parent_gone()
                return
            except BaseException:
                # A bug of ours. Without this thread no SlotDone reaches the training loop, which
                # would wait for good: the process ends instead (its traceback on stderr), and the
                # training loop reads the end of the pipe ("the pipeline process died").
                self.failed = True
                self._parent_gone()
                raise
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def _parent_gone(self) -> None:
        with self._cond:
            self.gone = True
            self._queue.clear()
            self._cond.notify_all()
        self.on_gone()

    def close(self, timeout: float) -> bool:
        """Send what is queued (at most ``timeout`` seconds), then stop the thread; True if all was sent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._queue or self._sending) and not self.gone:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False  # the training process does not read: its thread dies with us
                self._cond.wait(remaining)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self.gone


class _ForwardingHandler(logging.Handler):
    """Sends every record to the training process; to stderr once the parent is gone."""

    def __init__(self, outbox: _Outbox) -> None:
        super().__init__()
        self._outbox = outbox
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._outbox.put_log(LogMessage.from_record(record)):
                return
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


@dataclass
class _Group:
    """A teacher group's (the one teacher set of a config without groups) scheduler and the views
    of the pool it reads and writes: its model's inputs, its fetch vars and its inputs' lengths."""

    name: str | None
    config: ReaderConfig  # what its teachers are asked with (see ReaderConfig.group_views)
    feed_arrays: list[list[np.ndarray]]  # [slot][its predict var]
    fetch_arrays: list[list[np.ndarray]]  # [slot][its fetch var]
    length_arrays: list[list[np.ndarray]]  # [slot][its variable predict var]
    scheduler: Scheduler | None = None

    def named(self, message: str) -> str:
        return message if self.name is None else f"[teacher {self.name}] {message}"


@dataclass
class _Join:
    """A d_batch sent to every group: done once each group answered it."""

    item: WorkItem
    waiting: int  # groups yet to answer
    record: bool = True  # the knowledge store records the rows once done (not rows it gave itself)


class _PipelineProcess:
    def __init__(self, spec: PipelineSpec, inbox: Receiver, outbox: _Outbox) -> None:
        self.spec = spec
        self.inbox = inbox
        self.outbox = outbox
        self._handlers = {
            Work: self._on_work,
            Seal: self._on_seal,
            Cancel: self._on_cancel,
            StatsRequest: self._on_stats_request,
            Stop: self._on_stop,
        }
        self.buffer = SharedBuffer.from_fd(spec.shm_fd, spec.layout.nbytes)
        if spec.config.shared_memory == "off":
            self.buffer.close_fd()  # else kept: a co-located teacher maps the pool by a name it gets
        config, layout = spec.config, spec.layout
        n_feeds, n_vars = len(config.feeds), len(config.feeds) + len(config.fetches)
        slots = [layout.slot_arrays(self.buffer.mmap, s) for s in range(layout.capacity)]

        def length_indices(ids: tuple[int, ...]) -> list[int]:
            return [n_vars + config.variable_feeds.index(i) for i in ids if config.feeds[i].variable]

        # The row lengths of the variable vars any teacher gets (the first one's group the rows).
        self.length_arrays = [[arrays[k] for k in length_indices(config.predict_feed_ids)] for arrays in slots]
        #: one per teacher group; every d_batch goes to a teacher of each (see _submit)
        self.groups = [
            _Group(
                name,
                view,
                [[arrays[i] for i in view.predict_feed_ids] for arrays in slots],
                [[arrays[n_feeds + j] for j in fetch_ids] for arrays in slots],
                [[arrays[k] for k in length_indices(view.predict_feed_ids)] for arrays in slots],
            )
            for name, view, fetch_ids in config.group_views()
        ]
        self._joins: dict[int, _Join] = {}  # id of a group's WorkItem -> the d_batch it is part of
        self.d_batch_size = spec.d_batch_size
        self.done_rows = [0] * layout.capacity
        self.sealed_rows: list[int | None] = [None] * layout.capacity
        self.slot_started: list[float | None] = [None] * layout.capacity  # first request of the slot
        self.cancelled_upto = -1
        # [store]: rows looked up at the seal (read, cache), teachers' answers recorded (write, cache).
        self.knowledge: KnowledgeSession | None = None
        self._store_reads: set[asyncio.Task] = set()  # tasks waiting for store reads (off the loop)
        #: the groups whose outputs always come from their teachers: with [store] groups, those it does
        #: not keep (asked live also for the rows the store has)
        self.live_groups = self.groups
        if config.store is not None:
            from distill_reader.knowledge.session import KnowledgeSession  # pyarrow: only when used

            stored, kept = config.stored_view()
            stored_groups = config.store.groups  # None: the store keeps every group's outputs
            self.live_groups = (
                [] if stored_groups is None else [group for group in self.groups if group.name not in stored_groups]
            )
            # The session sees the slots as its config lays them out: feeds, kept fetches, lengths.
            n_lengths = len(config.variable_feeds)
            stored_slots = [
                [*arrays[:n_feeds], *(arrays[n_feeds + j] for j in kept), *arrays[n_vars : n_vars + n_lengths]]
                for arrays in slots
            ]
            self.knowledge = KnowledgeSession(stored, stored_slots, layout.batch_size)

    def send(self, message: Message) -> None:
        """Send a channel message: queued on the outbox, never waits for the training process."""
        if self.outbox.gone:
            self.stopped.set()  # the parent is gone
            return
        self.outbox.put(message)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self.outbox.on_gone = lambda: loop.call_soon_threadsafe(self.stopped.set)
        self.send(Ready())
        for group in self.groups:
            group.scheduler = self._scheduler(group)
        loop.set_exception_handler(self._on_loop_error)
        tasks = [spawn(self._watch_parent())]
        config = self.spec.config
        for group in self.groups:
            if config.store is not None and config.store.policy == "read" and group not in self.live_groups:
                pass  # never contacts a teacher (nor discovery): every row comes from the store
            elif config.mode == "fixed":
                self._scheduler_of(group).set_teachers([TeacherRef(endpoint) for endpoint in group.config.servers])
            else:
                tasks.append(spawn(self._follow_discovery(group)))
        if self.knowledge is not None:
            tasks.append(spawn(self._tick_knowledge()))
        loop.add_reader(self.inbox.fileno(), self._on_readable)
        try:
            await self.stopped.wait()
        finally:
            loop.remove_reader(self.inbox.fileno())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(self._scheduler_of(group).close() for group in self.groups))
            if self.knowledge is not None:
                self.knowledge.close()  # writes what was recorded

    def _scheduler(self, group: _Group) -> Scheduler:
        """The group's scheduler, with the transports of its teachers (its protocol, its model's
        inputs and outputs); its answers, errors and warnings name the group."""
        options = self.spec.options
        transports = transport_factory(
            group.config,
            options.request_timeout,
            options.check_finite,
            self.buffer if self.buffer.fd >= 0 else None,  # no descriptor: shared_memory = off
            rows=self.d_batch_size,
            in_flight=options.max_in_flight,
        )
        return Scheduler(
            group.config,
            group.feed_arrays,
            group.fetch_arrays,
            self.spec.options,
            on_done=self._on_group_done,
            on_error=lambda epoch, exc: self._on_group_error(group, epoch, exc),
            on_warning=lambda message: log.warning("%s", group.named(message)),
            length_arrays=group.length_arrays if group.length_arrays[0] else (),
            transports=transports,
        )

    @staticmethod
    def _scheduler_of(group: _Group) -> Scheduler:
        assert group.scheduler is not None  # made as the event loop starts (run)
        return group.scheduler

    def _submit(self, item: WorkItem, groups: list[_Group] | None = None) -> None:
        """Send a d_batch to a teacher of every group (of ``groups``: the live groups, for rows the
        knowledge store gave the others); done (``_on_done``) once each answered."""
        record = groups is None
        groups = self.groups if groups is None else groups
        if len(groups) == 1:
            self._joins[id(item)] = _Join(item, 1, record)
            self._scheduler_of(groups[0]).submit(item)
            return
        join = _Join(item, len(groups), record)
        for group in groups:
            # Its own copy: attempts and the teachers that failed it are the group's.
            part = dataclasses.replace(item, attempts=0, failed_on=set())
            self._joins[id(part)] = join
            self._scheduler_of(group).submit(part)

    def _on_group_done(self, part: WorkItem) -> None:
        join = self._joins.pop(id(part), None)
        if join is None:
            return  # its epoch was cancelled meanwhile
        join.waiting -= 1
        if join.waiting == 0:
            self._on_done(join.item, join.record)

    def _on_group_error(self, group: _Group, epoch: int, exc: Exception) -> None:
        """The epoch failed in ``group``: the error names it (the training loop raises the first
        error of an epoch, whichever group's)."""
        if group.name is not None:
            with contextlib.suppress(TypeError):  # an error not made from its message alone: sent as it is
                exc = type(exc)(group.named(str(exc)))
        self.send(EpochError(epoch, exc))

    async def _watch_parent(self) -> None:
        while os.getppid() == self.spec.parent_pid:
            await asyncio.sleep(0.5)
        log.debug("parent process %d is gone; stopping", self.spec.parent_pid)
        self.stopped.set()

    async def _tick_knowledge(self) -> None:
        assert self.knowledge is not None
        while True:
            await asyncio.sleep(0.25)
            self.knowledge.tick()

    async def _follow_discovery(self, group: _Group) -> None:
        """Register with the group's service (once per group: the same student id in each) and use
        the teachers discovery assigns."""
        from distill_reader.discovery.client import StudentSession
        from distill_reader.security import ClientSecurity

        config = group.config
        scheduler = self._scheduler_of(group)
        try:
            session = StudentSession(
                list(config.discovery),
                config.service_name or "",
                config.require_num,
                config.student_id,  # the id the training process reports under
                security=ClientSecurity(config.token, config.tls),
            )
            scheduler.describe_source = session.describe
            try:
                async for teachers in session.assignments():
                    log.info(
                        "%s",
                        group.named(f"discovery assigned {len(teachers)} teacher(s): {[t.endpoint for t in teachers]}"),
                    )
                    scheduler.set_teachers(
                        [
                            TeacherRef(t.endpoint, t.model_name or None, t.registration, t.protocol or None)
                            for t in teachers
                        ]
                    )
            finally:
                await session.close()
        except DistillReaderError as exc:  # e.g. discovery rejected the student: the training loop must know
            self.send(Fatal(exc))

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A crash of ours (marked by :func:`spawn`) must reach the training loop: the work the
        task held would otherwise never finish and the epoch would wait for it forever."""
        loop.default_exception_handler(context)  # the traceback, logged (to the training process)
        if context.get("distill_reader"):
            exc = context.get("exception")
            what = f"the pipeline process failed: {context['message']}"
            # Its type, message and traceback as text: whatever it holds, it cannot fail to be sent.
            self.send(Fatal(as_text(exc, what) if exc is not None else PipelineError(what)))

    def _on_readable(self) -> None:
        try:
            while self.inbox.poll():
                self._handle(self.inbox.recv())
        except (EOFError, OSError):
            self.stopped.set()  # the parent closed its end: it exited or was killed
        except Exception as exc:  # a bug of ours handling a message: that message's work is lost
            self._on_loop_error(
                asyncio.get_running_loop(),
                {"message": "handling a message failed", "exception": exc, "distill_reader": True},
            )

    def _handle(self, message: Message) -> None:
        self._handlers[type(message)](message)

    def _on_work(self, message: Work) -> None:
        epoch, sequence, slot, start, count = message
        if epoch <= self.cancelled_upto:
            return
        if self.slot_started[slot] is None:
            self.slot_started[slot] = time.perf_counter()
        self._submit(WorkItem(sequence, start, epoch=epoch, slot=slot, count=count))

    def _on_seal(self, message: Seal) -> None:
        epoch, slot, rows, sequence = message
        if epoch <= self.cancelled_upto:
            return
        if self.knowledge is not None and self.knowledge.reads:
            self._seal_from_store(epoch, slot, rows, sequence)
            return
        if self.length_arrays[slot] and self.spec.options.group_by_length:  # d_batches of similar lengths
            if self.slot_started[slot] is None:
                self.slot_started[slot] = time.perf_counter()
            for start, group in enumerate(group_by_length(self.length_arrays[slot][0][:rows], self.d_batch_size)):
                self._submit(WorkItem(sequence, start, epoch=epoch, slot=slot, count=len(group), rows=group))
        self.sealed_rows[slot] = rows
        self._check_slot(epoch, slot)

    def _seal_from_store(self, epoch: int, slot: int, rows: int, sequence: int) -> None:
        """The slot's rows found in the knowledge store are read into it off the event loop (then
        they are done); the others go to the teachers (cache) at once, in d_batches grouped by
        length for variable rows, as do those found whose inputs changed once they are known."""
        assert self.knowledge is not None
        if self.slot_started[slot] is None:
            self.slot_started[slot] = time.perf_counter()
        self.sealed_rows[slot] = rows
        try:
            missing, reading = self.knowledge.fill(slot, rows, sequence)
        except StoreError as exc:
            self.send(EpochError(epoch, exc))
            return
        start = self._ask_teachers(epoch, slot, sequence, missing, 0)
        if reading is None:
            self._check_slot(epoch, slot)
            return
        found = np.setdiff1d(np.arange(rows), missing)
        task = spawn(self._read_from_store(epoch, slot, sequence, found, start, reading))
        self._store_reads.add(task)
        task.add_done_callback(self._store_reads.discard)

    async def _read_from_store(
        self, epoch: int, slot: int, sequence: int, found: np.ndarray, start: int, reading: concurrent.futures.Future
    ) -> None:
        try:
            again = await asyncio.wrap_future(reading)
        except StoreError as exc:
            if epoch > self.cancelled_upto:
                self.send(EpochError(epoch, exc))
            return
        if epoch <= self.cancelled_upto:
            return
        start = self._ask_teachers(epoch, slot, sequence, again, start)
        if self.live_groups:  # the groups the store does not keep are asked for the rows it gave
            self._ask_teachers(epoch, slot, sequence, np.setdiff1d(found, again), start, self.live_groups)
        else:
            self.done_rows[slot] += len(found) - len(again)
        self._check_slot(epoch, slot)

    def _ask_teachers(
        self, epoch: int, slot: int, sequence: int, rows: np.ndarray, start: int, groups: list[_Group] | None = None
    ) -> int:
        """Submit ``rows`` of ``slot`` in d_batches numbered from ``start`` (to ``groups``, default
        all, see :meth:`_submit`); the next number."""
        size = self.d_batch_size
        if self.length_arrays[slot] and self.spec.options.group_by_length:
            batches = [rows[g] for g in group_by_length(self.length_arrays[slot][0][rows], size)]
        else:
            batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        for batch in batches:
            self._submit(WorkItem(sequence, start, epoch=epoch, slot=slot, count=len(batch), rows=batch), groups)
            start += 1
        return start

    def _on_stats_request(self, message: StatsRequest) -> None:
        hits = self.knowledge.from_store if self.knowledge is not None else 0
        teachers: list[TeacherStats] = []
        for group in self.groups:
            stats = self._scheduler_of(group).stats()
            teachers += stats if group.name is None else [dataclasses.replace(t, group=group.name) for t in stats]
        retries = sum(self._scheduler_of(group).retries for group in self.groups)
        self.send(StatsReport(teachers, retries, hits))

    def _on_cancel(self, message: Cancel) -> None:
        epoch = message.epoch
        self.cancelled_upto = max(self.cancelled_upto, epoch)
        for group in self.groups:  # no teacher writes into the pool: the slots are free at once
            self._scheduler_of(group).cancel(epoch)
        self._joins = {key: join for key, join in self._joins.items() if join.item.epoch > epoch}
        self.done_rows = [0] * len(self.done_rows)
        self.sealed_rows = [None] * len(self.sealed_rows)
        self.slot_started = [None] * len(self.slot_started)
        reading = self.knowledge.reading() if self.knowledge is not None else []
        if reading:  # store reads still write into slots: acknowledged once they end
            task = spawn(self._cancelled_after(epoch, reading))
            self._store_reads.add(task)
            task.add_done_callback(self._store_reads.discard)
            return
        if self.knowledge is not None:
            self.knowledge.cancelled()
        self.send(Cancelled(epoch))

    async def _cancelled_after(self, epoch: int, reading: list[concurrent.futures.Future]) -> None:
        await asyncio.gather(*(asyncio.wrap_future(future) for future in reading), return_exceptions=True)
        assert self.knowledge is not None
        self.knowledge.cancelled()
        self.send(Cancelled(epoch))

    def _on_stop(self, message: Stop) -> None:
        self.stopped.set()

    def _on_done(self, item: WorkItem, record: bool = True) -> None:
        if record and self.knowledge is not None and self.knowledge.records:
            rows = item.rows if item.rows is not None else np.arange(item.start, item.start + item.count)
            try:
                self.knowledge.record(item.slot, rows, item.sequence)
            except StoreError as exc:
                self.send(EpochError(item.epoch, exc))
        self.done_rows[item.slot] += item.count
        self._check_slot(item.epoch, item.slot)

    def _check_slot(self, epoch: int, slot: int) -> None:
        if self.sealed_rows[slot] is not None and self.done_rows[slot] == self.sealed_rows[slot]:
            started = self.slot_started[slot]
            seconds = time.perf_counter() - started if started is not None else 0.0
            self.done_rows[slot] = 0
            self.sealed_rows[slot] = None
            self.slot_started[slot] = None
            self.send(SlotDone(epoch, slot, seconds))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox = Connection(int(argv[0]), writable=False)
    outbox = _Outbox(Sender(Connection(int(argv[1]), readable=False)))
    try:
        spec: PipelineSpec = inbox.recv()  # the one message that is not a channel message
    except EOFError:
        return 0
    root = logging.getLogger()
    root.handlers[:] = [_ForwardingHandler(outbox)]
    logging.getLogger("distill_reader").setLevel(spec.log_level)
    try:
        try:
            process = _PipelineProcess(spec, Receiver(inbox), outbox)
        except Exception as exc:  # report start-up failures to the training loop, not only to stderr
            outbox.put(Fatal(exc))  # (an exception that cannot be pickled goes as text)
            return 1
        try:
            asyncio.run(process.run())
        except Exception as exc:  # a bug of ours outside any task: the training loop must know why
            log.error("the pipeline process failed", exc_info=True)
            outbox.put(Fatal(as_text(exc, "the pipeline process failed")))
            return 1
        return 1 if outbox.failed else 0
    finally:
        outbox.close(_FLUSH_TIMEOUT)
