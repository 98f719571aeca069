"""The pipeline process: talks to the teachers so the training loop's process does not.

Started by :class:`distill_reader.reader.pipeline.Pipeline` as a fresh interpreter running
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
  into the pool itself: over shared memory, answers go into an output ring, see docs/transports.md);
* ``StatsRequest()``, answered by ``StatsReport([TeacherStats], retries)``;
* ``Stop()``.

Child -> parent: ``Ready()``; ``SlotDone(epoch, slot, seconds_since_its_first_request)``;
``EpochError(epoch, exception)`` (the training loop raises it); ``Cancelled(epoch)``;
``Fatal(exception)`` (this process cannot go on: the next epoch starts a new one);
``StatsReport(...)``; ``LogMessage(...)``: every log record of this process, which the training
process emits under the same logger name (so the user's logging configuration applies). Only
when the parent is gone do records go to this process's stderr instead.

The event loop is the only reader of the input pipe; a lock serializes the writers of the output
pipe (the event loop, and logging from any thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
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
)
from distill_reader.reader.grouping import group_by_length
from distill_reader.reader.pool import PoolLayout, SharedBuffer
from distill_reader.teacher.scheduler import Scheduler, SchedulerOptions, TeacherRef, WorkItem, spawn

if TYPE_CHECKING:
    from distill_reader.knowledge.session import KnowledgeSession

log = logging.getLogger("distill_reader.pipeline")


@dataclass(frozen=True)
class PipelineSpec:
    config: ReaderConfig
    layout: PoolLayout
    shm_fd: int  # the pool's descriptor, inherited
    options: SchedulerOptions
    log_level: int
    parent_pid: int
    d_batch_size: int  # rows per request; variable rows are grouped by length into d_batches


class _ForwardingHandler(logging.Handler):
    """Sends every record to the training process; to stderr once the parent is gone."""

    def __init__(self, outbox: Sender) -> None:
        super().__init__()
        self._outbox = outbox
        self._parent_gone = False
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self._parent_gone:
                try:
                    self._outbox.send(LogMessage.from_record(record))
                    return
                except OSError:
                    self._parent_gone = True
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class _PipelineProcess:
    def __init__(self, spec: PipelineSpec, inbox: Receiver, outbox: Sender) -> None:
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
        self.feed_arrays = [[arrays[i] for i in config.predict_feed_ids] for arrays in slots]
        self.fetch_arrays = [arrays[n_feeds:n_vars] for arrays in slots]
        # The row lengths of the variable vars the teacher gets (the first one's group the rows).
        lengths = [n_vars + config.variable_feeds.index(i) for i in config.predict_feed_ids if config.feeds[i].variable]
        self.length_arrays = [[arrays[k] for k in lengths] for arrays in slots]
        self.d_batch_size = spec.d_batch_size
        self.done_rows = [0] * layout.capacity
        self.sealed_rows: list[int | None] = [None] * layout.capacity
        self.slot_started: list[float | None] = [None] * layout.capacity  # first request of the slot
        self.cancelled_upto = -1
        # [store]: rows looked up at the seal (read, cache), teachers' answers recorded (write, cache).
        self.knowledge: KnowledgeSession | None = None
        if config.store is not None:
            from distill_reader.knowledge.session import KnowledgeSession  # pyarrow: only when used

            self.knowledge = KnowledgeSession(config, slots, layout.batch_size)

    def send(self, message: Message) -> None:
        """Send a channel message.

        Written from the event loop. The training process reads its pipe in a thread of its own at
        all times (and the pipe holds 1 MiB), so this does not block while its loop is busy."""
        try:
            self.outbox.send(message)
        except OSError:
            self.stopped.set()  # the parent is gone

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self.send(Ready())
        self.scheduler = Scheduler(
            self.spec.config,
            self.feed_arrays,
            self.fetch_arrays,
            self.spec.options,
            on_done=self._on_done,
            on_error=lambda epoch, exc: self.send(EpochError(epoch, exc)),
            on_warning=lambda message: log.warning("%s", message),
            length_arrays=self.length_arrays if self.length_arrays[0] else (),
            pool=self.buffer if self.buffer.fd >= 0 else None,
        )
        loop.set_exception_handler(self._on_loop_error)
        tasks = [spawn(self._watch_parent())]
        config = self.spec.config
        if config.store is not None and config.store.policy == "read":
            pass  # never contacts a teacher (nor discovery): every row comes from the store
        elif config.mode == "fixed":
            self.scheduler.set_teachers([TeacherRef(endpoint) for endpoint in config.servers])
        else:
            tasks.append(spawn(self._follow_discovery()))
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
            await self.scheduler.close()
            if self.knowledge is not None:
                self.knowledge.close()  # writes what was recorded

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

    async def _follow_discovery(self) -> None:
        from distill_reader.discovery.client import StudentSession
        from distill_reader.security import ClientSecurity

        config = self.spec.config
        try:
            session = StudentSession(
                list(config.discovery),
                config.service_name or "",
                config.require_num,
                security=ClientSecurity(config.token, config.tls),
            )
            self.scheduler.describe_source = session.describe
            try:
                async for teachers in session.assignments():
                    log.info("discovery assigned %d teacher(s): %s", len(teachers), [t.endpoint for t in teachers])
                    self.scheduler.set_teachers(
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
        loop.default_exception_handler(context)  # the traceback, on this process's stderr
        if context.get("distill_reader"):
            exc = context.get("exception")
            self.send(Fatal(PipelineError(f"the pipeline process failed: {context['message']}: {exc!r}")))

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
        self.scheduler.submit(WorkItem(sequence, start, epoch=epoch, slot=slot, count=count))

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
                self.scheduler.submit(WorkItem(sequence, start, epoch=epoch, slot=slot, count=len(group), rows=group))
        self.sealed_rows[slot] = rows
        self._check_slot(epoch, slot)

    def _seal_from_store(self, epoch: int, slot: int, rows: int, sequence: int) -> None:
        """The slot's rows found in the knowledge store are done at once; the others go to the
        teachers (cache) in d_batches, grouped by length for variable rows."""
        assert self.knowledge is not None
        if self.slot_started[slot] is None:
            self.slot_started[slot] = time.perf_counter()
        self.sealed_rows[slot] = rows
        try:
            missing = self.knowledge.fill(slot, rows, sequence)
        except StoreError as exc:
            self.send(EpochError(epoch, exc))
            return
        self.done_rows[slot] += rows - len(missing)
        if len(missing):
            size = self.d_batch_size
            if self.length_arrays[slot] and self.spec.options.group_by_length:
                groups = [missing[g] for g in group_by_length(self.length_arrays[slot][0][missing], size)]
            else:
                groups = [missing[i : i + size] for i in range(0, len(missing), size)]
            for start, group in enumerate(groups):
                self.scheduler.submit(WorkItem(sequence, start, epoch=epoch, slot=slot, count=len(group), rows=group))
        self._check_slot(epoch, slot)

    def _on_stats_request(self, message: StatsRequest) -> None:
        self.send(StatsReport(self.scheduler.stats(), self.scheduler.retries))

    def _on_cancel(self, message: Cancel) -> None:
        epoch = message.epoch
        self.cancelled_upto = max(self.cancelled_upto, epoch)
        self.scheduler.cancel(epoch)  # no teacher writes into the pool: the slots are free at once
        if self.knowledge is not None:
            self.knowledge.cancelled()
        self.done_rows = [0] * len(self.done_rows)
        self.sealed_rows = [None] * len(self.sealed_rows)
        self.slot_started = [None] * len(self.slot_started)
        self.send(Cancelled(epoch))

    def _on_stop(self, message: Stop) -> None:
        self.stopped.set()

    def _on_done(self, item: WorkItem) -> None:
        if self.knowledge is not None and self.knowledge.records:
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
    outbox = Sender(Connection(int(argv[1]), readable=False))
    try:
        spec: PipelineSpec = inbox.recv()  # the one message that is not a channel message
    except EOFError:
        return 0
    root = logging.getLogger()
    root.handlers[:] = [_ForwardingHandler(outbox)]
    logging.getLogger("distill_reader").setLevel(spec.log_level)
    try:
        process = _PipelineProcess(spec, Receiver(inbox), outbox)
    except Exception as exc:  # report start-up failures to the training loop, not only to stderr
        with contextlib.suppress(OSError):
            outbox.send(Fatal(exc))
        return 1
    asyncio.run(process.run())
    return 0
