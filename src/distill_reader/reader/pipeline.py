"""The training loop's side of the pipeline: the pool, the slots, the pipeline process, the epochs.

Lifecycle (one owner for each):

* :class:`Pipeline` owns the shared pool, the slot bookkeeping and the pipeline process. It starts
  with the first epoch and lives across epochs; if its process dies it is replaced at the next epoch.
  ``close()`` (the reader's ``close()``, its finalizer, or interpreter exit) stops the process:
  ``Stop`` message, 2 s to exit (10 s unless ``shared_memory = off``: it unregisters its regions
  from the teachers; 60 s when it records into a knowledge store: it writes the rows it holds
  first), then SIGKILL. A forked copy of the training process (a DataLoader
  worker) never stops it.
* The channel (:mod:`distill_reader.reader.channel`): any thread sends through the one
  :class:`~distill_reader.reader.channel.Sender` (none holds it while the pipe is full); one
  receiver thread (a daemon, ending at the pipe's end-of-file when the process exits) is the only
  reader of the pipe from the pipeline process, and never waits for anything but that pipe and,
  briefly, the condition below. It hands the process's log records to the log thread, statistics
  to the :class:`~distill_reader.reader.stats.StatsTracker`, and records everything else (slots
  done, epoch errors, cancel acknowledgements, a fatal error, the end of the process) under one
  condition. Every wait (the training loop's, ``abort``'s, ``request_stats``'s) waits on that
  condition, woken by each message, by each item the feeder hands over and by ``mark_closed``.
* The log thread (:class:`_LogRelay`, a daemon) emits the pipeline process's records under their
  logger names, so the user's handlers run there: a slow one (a log shipper whose network is down)
  delays only the log. Beyond ``_LOG_BACKLOG`` records waiting, records are dropped and counted
  (with those the pipeline process dropped itself); once the handlers catch up, one WARNING says
  how many (:attr:`Pipeline.dropped_log_records` counts them all). Before the training loop raises
  an error of the pipeline process it gives the log thread up to ``_LOG_FLUSH`` seconds to emit the
  records that came before it; ``close()`` gives it ``_STOP_TIMEOUT`` to emit the last ones.
* :class:`Epoch` owns one pass over the user's reader: a feeder thread that writes samples into
  free slots and sends each d_batch to the pipeline process as soon as its rows are written. The
  consumer (the training loop's generator) takes sealed slots in order, waits until the pipeline
  process reports them done and yields views of them.
* A slot is free, then filled by the feeder, then queued (at the pipeline process and in the
  consumer's queue), then held by the consumer after it was yielded; it is freed once the consumer
  has taken ``occupied_capacity`` further batches (or at once with ``copy=True``). The
  :class:`~distill_reader.reader.slots.SlotLedger` records every slot's place and refuses a move
  from the wrong one.
* Early exit (``break``, an exception, Ctrl-C): the consumer's generator is closed and aborts the
  epoch: it stops the feeder, asks the pipeline process to cancel the epoch and waits for its
  acknowledgement (after which no teacher output is written for that epoch), then frees every
  slot of the epoch that the consumer does not hold (a slot it took but did not yield included).
  A feeder stuck inside the user's reader is left behind (it is a daemon thread) and frees its
  slot itself when the reader returns (the pipeline process ignores anything sent for a cancelled
  epoch).
* From another thread: ``abort(epoch, reason)`` (a newer epoch started) and ``mark_closed`` (the
  reader's ``close()``) make the consumer's next wait raise, at once if it is waiting.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from distill_reader._logging import handle_forwarded
from distill_reader.config import ReaderConfig
from distill_reader.errors import ChannelTimeout, DistillReaderError, PipelineError
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
)
from distill_reader.reader.filling import SlotFiller
from distill_reader.reader.pipeline_process import PipelineSpec
from distill_reader.reader.pool import PoolLayout, SharedBuffer
from distill_reader.reader.slots import SlotLedger
from distill_reader.reader.source import reader_function_error
from distill_reader.reader.stats import StatsTracker
from distill_reader.teacher.scheduler import SchedulerOptions

log = logging.getLogger("distill_reader")

_START_TIMEOUT = 60.0  # seconds for the pipeline process to import and map the pool
_ACK_TIMEOUT = 5.0  # seconds for the pipeline process to acknowledge a cancelled epoch
_STOP_TIMEOUT = 2.0
#: seconds a pipeline process that may have shared-memory regions on teachers may take to
#: unregister them (one call per region, each bounded by 5 s, all teachers at once)
_SHM_STOP_TIMEOUT = 10.0
#: seconds a pipeline process that records into a knowledge store may take to write its last chunk
_STORE_STOP_TIMEOUT = 60.0
_STATS_WAIT = 1.0  # seconds an unawaited StatsRequest may wait for the pipe
_STATS_RETRY = 5.0  # an unanswered StatsRequest is sent again after this
_WAIT_SLICE = 1.0  # waits on the condition wake at least this often (they also wake on every message)
_TICK = 0.05
_LOG_BACKLOG = 10_000  # records of the pipeline process waiting for the user's log handlers, at most
_LOG_FLUSH = 1.0  # seconds an error of the pipeline process waits for the records that came before it
_CLOSED_HINT = " (close() was called, maybe from another thread); a new epoch starts it again"
_CHILD_MAIN = "import sys; from distill_reader.reader.pipeline_process import main; sys.exit(main(sys.argv[1:]))"


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while slot bookkeeping changes, then deliver it.

    A KeyboardInterrupt in the middle would lose slots. It is delivered a moment after the block,
    from a timer thread: raised in the block itself it could be swallowed, because a generator that
    is garbage-collected (the consumer's epoch after a ``break``) ignores exceptions raised while
    it closes. Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            threading.Timer(0.01, _thread.interrupt_main).start()


def _enlarge_pipe(fd: int) -> None:
    """Give the pipe 1 MiB (Linux): a burst of messages never makes its writer wait."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(fd, set_size, 1 << 20)


@dataclass(frozen=True)
class _Sealed:
    sequence: int
    slot: int
    rows: int
    fill_seconds: float  # from taking the free slot to sealing it


@dataclass(frozen=True)
class _Unsealed:  # a slot the feeder stopped filling; freed once the epoch is cancelled
    slot: int


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


class _LogRelay:
    """The log thread: emits the pipeline process's records (see the module docstring)."""

    def __init__(self) -> None:
        self._queue: collections.deque[LogMessage] = collections.deque()
        self._cond = threading.Condition()
        self._dropped = 0  # since the last warning
        self.dropped_total = 0
        self._busy = False  # a record is in the handlers
        self._ended = False
        self.thread = threading.Thread(target=self._run, name="distill-reader-log", daemon=True)

    def put(self, message: LogMessage) -> None:
        with self._cond:
            if len(self._queue) >= _LOG_BACKLOG:
                self._dropped += 1
                self.dropped_total += 1
            else:
                self._queue.append(message)
            self._cond.notify_all()

    def dropped(self, count: int) -> None:
        """``count`` records were dropped before they got here (by the pipeline process)."""
        with self._cond:
            self._dropped += count
            self.dropped_total += count
            self._cond.notify_all()

    def end(self) -> None:
        """No more records: the thread ends once it has emitted those it has."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every record received so far was emitted."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy) and self.thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._dropped and not self._ended:
                    self._cond.wait()
                message = self._queue.popleft() if self._queue else None
                dropped = 0
                if message is None:
                    if not self._dropped:
                        return  # ended, and everything was emitted
                    dropped, self._dropped = self._dropped, 0  # caught up: say how many were lost
                self._busy = True
            try:
                # A user's filter or handler failing is not the channel's concern.
                with contextlib.suppress(Exception):
                    if message is not None:
                        handle_forwarded(message.to_record())
                    else:
                        log.warning(
                            "%d log record(s) of the pipeline process were dropped: the log handlers did not "
                            "keep up (the pipeline never waits for them)",
                            dropped,
                        )
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class Pipeline:
    """See the module docstring."""

    def __init__(
        self,
        config: ReaderConfig,
        layout: PoolLayout,
        d_batch_size: int,
        options: SchedulerOptions,
        stats: StatsTracker,
    ) -> None:
        self.config = config
        self.d_batch_size = d_batch_size
        #: no Work sent: the pipeline process cuts each sealed slot's rows into d_batches itself, by
        #: length (variable rows), or after looking them up in the knowledge store ([store] read, cache)
        self.work_at_seal = (options.group_by_length and config.length_source is not None) or (
            config.store is not None and config.store.policy != "write"
        )
        self.stats = stats
        self.layout = layout
        self._owner_pid = os.getpid()
        # Everything the receiver thread learns, and every epoch's sealed slots, under one condition
        # that the training loop, abort() and request_stats() wait on.
        self._cond = threading.Condition()
        self.broken: BaseException | None = None  # set once: the next epoch starts a new pipeline
        self._closed = False
        self._ready = False
        self._fatal: BaseException | None = None
        self._eof = False
        self._done: dict[tuple[int, int], float] = {}  # (epoch, slot) reported done -> teacher seconds
        self._errors: dict[int, BaseException] = {}
        self._acks: set[int] = set()
        self._stats_asked_at: float | None = None  # a StatsRequest is unanswered since then
        self._stats_reports = 0
        self._process: subprocess.Popen | None = None
        self._sender: Sender | None = None
        self._receiver_thread: threading.Thread | None = None
        self._logs = _LogRelay()
        self._buffer = SharedBuffer.create(layout.nbytes)
        try:
            self._start_process(options)
        finally:
            self._buffer.close_fd()  # mapped on both sides (or failed): the descriptor is not needed
        self.slots = [layout.slot_arrays(self._buffer.mmap, s) for s in range(layout.capacity)]
        self.ledger = SlotLedger(layout.capacity, _TICK * 2)  # where every slot is
        self._next_epoch = 0

    # -- process -----------------------------------------------------------------------------
    def _start_process(self, options: SchedulerOptions) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        _enlarge_pipe(from_child_w)
        _enlarge_pipe(to_child_w)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w, self._buffer.fd),
                stdin=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C goes to the training loop, which stops it.
                start_new_session=True,
            )
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        os.close(to_child_r)
        os.close(from_child_w)
        to_child = Connection(to_child_w, readable=False)
        receiver = Receiver(Connection(from_child_r, writable=False))
        spec = PipelineSpec(
            config=self.config,
            layout=self.layout,
            shm_fd=self._buffer.fd,
            options=options,
            log_level=logging.getLogger("distill_reader").getEffectiveLevel(),
            parent_pid=os.getpid(),
            d_batch_size=self.d_batch_size,
        )
        process = self._process
        self._receiver_thread = threading.Thread(
            target=self._receive, args=(receiver, process), name="distill-reader-receiver", daemon=True
        )
        try:
            self._logs.thread.start()
            self._receiver_thread.start()
            to_child.send(spec)  # the one message that is not a channel message: no sender exists yet
            self._sender = Sender(to_child)
            deadline = time.monotonic() + _START_TIMEOUT
            with self._cond:
                while not self._ready:
                    if self._fatal is not None:
                        raise PipelineError(f"the pipeline process failed to start: {self._fatal}") from self._fatal
                    if self._eof or process.poll() is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            process.wait(_TICK)
                        raise PipelineError(f"the pipeline process exited with code {process.returncode} on start")
                    if time.monotonic() > deadline:
                        raise PipelineError(f"the pipeline process did not start within {_START_TIMEOUT:.0f} s")
                    self._cond.wait(_TICK)
        except BaseException:
            if self._sender is None:
                to_child.close()
            self.close()
            raise

    @property
    def dropped_log_records(self) -> int:
        """Log records of the pipeline process dropped because the log handlers did not keep up."""
        return self._logs.dropped_total

    @property
    def alive(self) -> bool:
        return self.broken is None and not self._closed and self._process is not None and self._process.poll() is None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def owned(self) -> bool:
        """False in a forked copy of the training process (e.g. a DataLoader worker)."""
        return os.getpid() == self._owner_pid

    def send(self, message: Message, timeout: float | None = None) -> None:
        """Send to the pipeline process (from any thread); OSError once it is gone."""
        if self._sender is None:
            raise OSError("the pipeline process is not started")
        self._sender.send(message, timeout)

    def mark_closed(self) -> None:
        """Make every wait on this pipeline raise "the reader was closed" (from any thread)."""
        if not self.owned:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the pipeline process (bounded: 2 s, 10 s while it may hold shared-memory regions on
        teachers, 60 s while it writes a knowledge store; then SIGKILL). Idempotent; any thread."""
        if not self.owned:
            return  # a forked copy of the training process (e.g. a DataLoader worker) exiting: not ours
        self.mark_closed()
        process, self._process = self._process, None
        if process is None:
            return
        if self._sender is not None:
            with contextlib.suppress(OSError, ChannelTimeout):
                self._sender.send(Stop(), timeout=_STOP_TIMEOUT)
        records = self.config.store is not None and self.config.store.policy != "read"
        if records:
            stop_timeout = _STORE_STOP_TIMEOUT
        elif self.config.shared_memory != "off":
            stop_timeout = _SHM_STOP_TIMEOUT
        else:
            stop_timeout = _STOP_TIMEOUT
        try:
            process.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT)
        # The process is gone: a feeder still writing gets EPIPE, and the receiver thread reads
        # end-of-file and closes its end.
        if self._sender is not None:
            self._sender.close(_STOP_TIMEOUT)
        thread = self._receiver_thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(_STOP_TIMEOUT)
        self._logs.end()  # (the receiver ends it too, once it read the end of the pipe)
        if self._logs.thread.is_alive() and self._logs.thread is not threading.current_thread():
            self._logs.thread.join(_STOP_TIMEOUT)  # the last records; a stuck handler is left behind

    # -- the receiver thread: the one reader of the pipe from the pipeline process -----------
    def _receive(self, receiver: Receiver, process: subprocess.Popen) -> None:
        try:
            while True:
                try:
                    message = receiver.recv()
                except (EOFError, OSError):
                    return  # the pipeline process exited, or was killed
                kind = type(message)
                if kind is LogMessage:
                    self._logs.put(message)  # the user's handlers run on the log thread
                    continue
                if kind is LogsDropped:
                    self._logs.dropped(message.count)
                    continue
                if kind is StatsReport:
                    self.stats.pipeline_report(message.teachers, message.retries, message.store_hits)
                with self._cond:
                    self._dispatch(message)
                    self._cond.notify_all()
        except BaseException as exc:  # a bug of ours, or an unreadable message: the channel is lost
            with self._cond:
                self.broken = self.broken or PipelineError(f"reading from the pipeline process failed: {exc!r}")
            log.error("reading from the pipeline process failed", exc_info=True)
        finally:
            receiver.close()
            self._logs.end()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_TICK)  # for the exit code
            with self._cond:
                self._eof = True
                self.broken = self.broken or PipelineError(f"the pipeline process died (exit code {process.poll()})")
                self._cond.notify_all()

    def _dispatch(self, message: Message) -> None:
        kind = type(message)
        if kind is SlotDone:
            self._done[(message.epoch, message.slot)] = message.seconds
        elif kind is EpochError:
            self._errors.setdefault(message.epoch, message.error)
        elif kind is Cancelled:
            self._acks.add(message.epoch)
        elif kind is StatsReport:
            self._stats_asked_at = None
            self._stats_reports += 1
        elif kind is Ready:
            self._ready = True
        elif kind is Fatal:
            self._fatal = self._fatal or message.error
            self.broken = self.broken or message.error

    def request_stats(self, wait: float) -> None:
        """Ask the pipeline process for its statistics; wait up to ``wait`` seconds for them. Any
        thread; concurrent callers share one request."""
        if not self.owned:
            return
        now = time.monotonic()
        with self._cond:
            if not self.alive:
                return
            # One request at a time; asked again if an answer got lost (it never should).
            ask = self._stats_asked_at is None or now - self._stats_asked_at > _STATS_RETRY
            if ask:
                self._stats_asked_at = now
            target = self._stats_reports + 1
        if ask:
            try:
                self.send(StatsRequest(), timeout=wait if wait > 0 else _STATS_WAIT)
            except (OSError, ChannelTimeout):  # the feeder or the next wait reports a lost process
                with self._cond:
                    self._stats_asked_at = None
                return
        deadline = now + wait
        with self._cond:
            while self._stats_reports < target and not self._closed and self.broken is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _check(self, epoch: Epoch) -> None:
        """Raise what ends ``epoch`` early (under the condition): stopped, closed, failed, lost."""
        if epoch.stopped is not None:
            raise DistillReaderError(epoch.stopped)
        if self._closed:
            raise DistillReaderError(f"the reader was closed{_CLOSED_HINT}")

    def _raise_if_failed(self, epoch: Epoch) -> None:
        error = self._errors.get(epoch.number)
        if error is not None:
            raise error
        if self.broken is not None:
            raise self.broken

    def check(self, epoch: Epoch) -> None:
        """Raise if ``epoch`` was stopped (a newer epoch started) or the reader was closed."""
        with self._cond:
            self._check(epoch)

    # -- epochs ------------------------------------------------------------------------------
    def start_epoch(self, kind: str, reader: Callable[[], Iterable[Any]]) -> Epoch:
        epoch = Epoch(self, self._next_epoch, kind, reader)
        self._next_epoch += 1
        epoch.start()
        return epoch

    def wait_sealed(self, epoch: Epoch) -> Any:
        """The feeder's next item for ``epoch`` (a sealed slot, the end, or a failure). Wakes on
        every message and every item; raises when the epoch fails, is stopped, or the reader closed."""
        try:
            with self._cond:
                while True:
                    self._check(epoch)
                    error = self._errors.get(epoch.number)
                    if error is not None:
                        raise error
                    if epoch.items:
                        return epoch.items.popleft()
                    if self.broken is not None:
                        raise self.broken
                    self._cond.wait(_WAIT_SLICE)
        except Exception:
            self._logs.flush(_LOG_FLUSH)  # the pipeline process's records from before the error first
            raise

    def wait_done(self, epoch: Epoch, item: _Sealed) -> float:
        """Wait until the teachers have answered for every row of ``item``'s slot; returns the seconds
        from its first request to its last answer. If it raises, the slot goes back to the epoch,
        which frees it once the pipeline process acknowledged the epoch's cancellation."""
        key = (epoch.number, item.slot)
        try:
            with self._cond:
                try:
                    while key not in self._done:
                        self._check(epoch)
                        self._raise_if_failed(epoch)
                        self._cond.wait(_WAIT_SLICE)
                    return self._done.pop(key)
                except BaseException:
                    epoch.give_back(item)
                    raise
        except Exception:
            self._logs.flush(_LOG_FLUSH)  # the pipeline process's records from before the error first
            raise

    def hand_over(self, epoch: Epoch, item: Any) -> None:
        """The feeder's item for the consumer (under the condition, waking the consumer)."""
        with self._cond:
            if epoch.reclaimed and isinstance(item, (_Sealed, _Unsealed)):
                self.ledger.release(item.slot)  # a late feeder: the epoch is over and cancelled
            else:
                if isinstance(item, (_Sealed, _Unsealed)):
                    self.ledger.queue(item.slot)
                epoch.items.append(item)
                self._cond.notify_all()

    def yielded(self, slot: int, copied: bool) -> None:
        """The consumer yields ``slot``'s batch: a copy frees it now, views hold it until the
        consumer has taken ``occupied_capacity`` further batches (:meth:`release_held`)."""
        if copied:
            self.ledger.release(slot)
        else:
            self.ledger.hold(slot)

    def release_held(self, keep: int) -> None:
        if self.ledger.held_count <= keep:
            return  # the common case on the hot path: no signal handler swap
        with deferred_interrupt():
            self.ledger.release_held(keep)

    def abort(self, epoch: Epoch, reason: str | None = None) -> None:
        """Stop ``epoch`` early and take back its slots; see the module docstring. With ``reason``
        (another thread may be iterating it), that thread's next wait raises it."""
        with deferred_interrupt():
            if reason is not None:
                with self._cond:
                    epoch.stopped = reason
                    self._cond.notify_all()
            epoch.stop.set()
            settled = False  # the pipeline process will write nothing more for this epoch
            try:
                if self.alive:
                    self.send(Cancel(epoch.number), timeout=_ACK_TIMEOUT)
                    deadline = time.monotonic() + _ACK_TIMEOUT
                    with self._cond:
                        # A closed pipeline is never used again: no need to wait for it.
                        while epoch.number not in self._acks and not self._closed:
                            if self.broken is not None:
                                raise self.broken
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                raise PipelineError("the pipeline process did not acknowledge a cancelled epoch")
                            self._cond.wait(remaining)
                settled = True
            except (DistillReaderError, OSError, ChannelTimeout) as exc:
                if not isinstance(exc, DistillReaderError):
                    exc = PipelineError(f"lost the pipeline process while cancelling an epoch: {exc}")
                with self._cond:
                    self.broken = self.broken or exc
            finally:
                if not settled:
                    with self._cond:
                        # Interrupted while cancelling: the pool can no longer be trusted. The next
                        # epoch starts a new pipeline instead of reusing slots that may still be written.
                        self.broken = self.broken or PipelineError(
                            "an epoch was interrupted while it was being cancelled"
                        )
            epoch.thread.join(_STOP_TIMEOUT)
            if epoch.thread.is_alive():
                log.warning(
                    "the reader function did not return within %.0f s after the epoch stopped; "
                    "its batch slot is freed when it does",
                    _STOP_TIMEOUT,
                )
            with self._cond:
                epoch.reclaim()
                self._acks.discard(epoch.number)
                self._errors.pop(epoch.number, None)
                self._done = {key: value for key, value in self._done.items() if key[0] != epoch.number}

    def finish(self, epoch: Epoch) -> None:
        epoch.thread.join(_STOP_TIMEOUT)
        with self._cond:
            self._errors.pop(epoch.number, None)


class Epoch:
    """One pass over the user's reader; the feeder thread runs :meth:`_feed`."""

    def __init__(
        self,
        pipeline: Pipeline,
        number: int,
        kind: str,
        reader: Callable[[], Iterable[Any]],
    ) -> None:
        self.pipeline = pipeline
        self.number = number
        # Guarded by the pipeline's condition: the feeder's items for the consumer, in order.
        self.items: collections.deque[Any] = collections.deque()
        self.reclaimed = False  # the epoch was cancelled and its slots taken back
        self.stopped: str | None = None  # why the consumer's next wait raises (stopped by another thread)
        self.stop = threading.Event()  # tells the feeder to stop
        self._kind = kind
        self._reader = reader
        self._sequence = 0
        self._acquired_at = 0.0
        self.thread = threading.Thread(target=self._feed, name=f"distill-reader-feeder-{number}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def reclaim(self) -> None:
        """Free every slot of this epoch that is not yet the consumer's (after the cancel ack; under
        the pipeline's condition)."""
        self.reclaimed = True
        while self.items:
            item = self.items.popleft()
            if isinstance(item, (_Sealed, _Unsealed)):
                self.pipeline.ledger.release(item.slot)

    def give_back(self, item: _Sealed) -> None:
        """The consumer took ``item`` but will not yield it (under the pipeline's condition): it is
        freed with the epoch's other slots once the epoch is cancelled, or now if it already is."""
        if self.reclaimed:
            self.pipeline.ledger.release(item.slot)
        else:
            self.items.appendleft(item)

    # -- feeder thread: the SlotFiller's sink --------------------------------------------------
    def acquire(self) -> tuple[int, list[np.ndarray]] | None:
        asked_at = time.perf_counter()
        slot = self.pipeline.ledger.acquire(self.stop)
        if slot is None:
            return None
        self._acquired_at = time.perf_counter()
        self.pipeline.stats.feeder_waited(self._acquired_at - asked_at)
        config, arrays = self.pipeline.config, self.pipeline.slots[slot]
        # The feed vars, then the row lengths of the variable ones (after the fetch vars in the slot).
        return slot, arrays[: len(config.feeds)] + arrays[len(config.feeds) + len(config.fetches) :]

    def written(self, slot: int, start: int, count: int) -> None:
        if not self.pipeline.work_at_seal:  # the pipeline process makes the d_batches at the seal
            self.pipeline.send(Work(self.number, self._sequence, slot, start, count))

    def sealed(self, slot: int, rows: int) -> None:
        self.pipeline.send(Seal(self.number, slot, rows, self._sequence))
        self.pipeline.hand_over(self, _Sealed(self._sequence, slot, rows, time.perf_counter() - self._acquired_at))
        self._sequence += 1

    def _feed(self) -> None:
        filler = SlotFiller(
            self.pipeline.config.feeds,
            self.pipeline.layout.batch_size,
            self.pipeline.d_batch_size,
            self,
            self.pipeline.config.max_length,
        )
        add = filler.adder(self._kind)
        source: Iterator[Any] | None = None
        try:
            try:
                source = iter(self._reader())
            except Exception as exc:
                raise reader_function_error(exc) from exc
            while not self.stop.is_set():
                try:
                    value = next(source)
                except StopIteration:
                    filler.finish()
                    self.pipeline.hand_over(self, _END)
                    return
                except Exception as exc:
                    raise reader_function_error(exc, filler.position) from exc
                if not add(value):
                    return
        except (DistillReaderError, OSError) as exc:
            if isinstance(exc, OSError):  # the pipe to the pipeline process broke
                exc = PipelineError(f"lost the pipeline process: {exc}")
            self.pipeline.hand_over(self, _Failed(exc))
        except BaseException as exc:  # a bug of ours: still reach the consumer, never die silently
            self.pipeline.hand_over(self, _Failed(PipelineError(f"feeder failed: {type(exc).__name__}: {exc}")))
            raise
        finally:
            if filler.slot is not None:  # requests may be in flight: freed once the epoch is cancelled
                self.pipeline.hand_over(self, _Unsealed(filler.slot))
            close = getattr(source, "close", None)
            if close is not None and self.stop.is_set():
                try:
                    close()  # run the user's generator's finally blocks
                except Exception:
                    log.debug("closing the reader's generator raised", exc_info=True)


def is_end(item: Any) -> bool:
    return item is _END


def failure_of(item: Any) -> BaseException | None:
    return item.error if isinstance(item, _Failed) else None
