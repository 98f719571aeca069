"""The training process's side of the pipeline, and its lifecycle: the one place that tells it.

The way of a sample is one direction; each module below is entered once per slot::

    user's reader ─► feeder.Feeder ─► filling.SlotFiller ─► feeder.SlotOutbox ─── Work, Seal ──► pipeline process
                     (its thread;      (writes the rows      │ the sealed slot                         │ SlotDone
                      a free slot      into the pool)        ▼                                         ▼
                      from the ledger)               epoch.Epoch ◄── slot done ── receiver.PipelineReceiver
                                                             │ in order, once done
    training loop ◄── views of the slot (or copies) ◄── Epoch.next_batch

Only free slots go back (the :class:`~distill_reader.reader.slots.SlotLedger`), when the consumer
has taken ``occupied_capacity`` further batches, or at once with ``copy=True``.

Threads of the training process:

* the training loop (the consumer): iterates the reader's epoch generator, which calls
  :meth:`Epoch.next_batch` once per batch; it waits only on its epoch's lock.
* one feeder thread per epoch (:mod:`.feeder`, a daemon);
* the receiver thread (:mod:`.receiver`, a daemon): the one reader of the pipe from the pipeline
  process; it ends at the pipe's end-of-file when the process exits;
* the log thread (:mod:`.log_relay`, a daemon): runs the user's log handlers on the pipeline
  process's records, so a slow handler delays only the log. Before the training loop raises an
  error of the pipeline process it gives the log thread up to 1 s to emit the records from before.

Any thread sends to the pipeline process through its one
:class:`~distill_reader.reader.channel.Sender` (none holds it while the pipe is full).

Start: the first epoch creates the :class:`Pipeline`: the shared pool (its descriptor passed to
the child, then closed here), the pipeline process (:mod:`.process`), the log and receiver threads;
it sends the spec and waits up to 60 s for ``Ready``. The pipeline lives across epochs; one that
was lost (its process died, a fatal error, an interrupted cancel) is replaced at the next epoch.

An epoch (:meth:`Pipeline.start_epoch`) registers an :class:`Epoch` (the receiver routes its
messages there; late ones for an epoch that is over are dropped) and starts its feeder. Each
:meth:`Epoch.next_batch` first frees the held slots beyond ``occupied_capacity`` (asking for a
batch, the first of an epoch too, counts as taking one more).

A slot is free, then filling (the feeder's), then queued (sent, in the epoch's queue, or first in it
while the consumer waits for it to be done), then held (yielded as views) until freed. The ledger
records every slot's place and refuses a move from the wrong one.

Every way an epoch ends:

* exhaustion: the feeder seals the short last slot and puts the end; once the consumer took every
  slot and the end, :meth:`Pipeline.finish` joins the feeder (2 s) and drops the epoch.
* ``break``, an exception in the loop, Ctrl-C, or an error (the user's reader, a bad sample, a
  failed epoch in the pipeline process, the pipeline lost): the generator's ``finally`` calls
  :meth:`Pipeline.abort`: stop the feeder, send ``Cancel`` and wait (5 s) for ``Cancelled`` (after
  which no teacher output is written for the epoch), join the feeder (2 s), then free every slot of
  the epoch that the consumer does not hold. A feeder stuck in the user's reader is left behind and
  frees its slot itself when the reader returns (the pipeline process ignores anything sent for a
  cancelled epoch). A cancel that fails or is interrupted marks the pipeline lost: its pool is not
  trusted again. Ctrl-C is held back while slots change hands (:mod:`.interrupts`).
* a newer epoch starts (any thread): ``abort(epoch, reason)`` makes the old epoch's next wait raise
  the reason, at once if it waits.
* ``close()`` (the reader's, any thread), its finalizer, interpreter exit: :meth:`mark_closed` makes
  every wait raise "the reader was closed" at once, the active epoch is aborted (without waiting for
  an acknowledgement), then :meth:`close` stops the process: ``Stop``, 2 s to exit (10 s unless
  ``shared_memory = off``: it unregisters its regions from the teachers; 60 s when it records into
  a knowledge store: it writes the rows it holds first), then SIGKILL; the receiver thread reads
  end-of-file and ends, the log thread emits the last records (2 s). A forked copy of the training
  process (a DataLoader worker) never stops it.
* the pipeline process dies or fails: the receiver marks the pipeline lost, which wakes every wait
  on it: the epoch raises (after the slots already done), ``stats()`` returns.

The pipeline process's own lifecycle (:mod:`.pipeline_process`): it exits on ``Stop``, on the end
of its input pipe, or when its parent dies (it watches the parent's pid).

Every wait is bounded or wakes on close: the consumer's (1 s slices, woken by each message for its
epoch, each item of its feeder, a stop, close, a loss), the feeder's for a free slot (0.1 s slices,
until stopped), the start (60 s), a cancel (5 s), ``stats()`` (its timeout), the stop (above).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from distill_reader.config import ReaderConfig
from distill_reader.errors import ChannelTimeout, DistillReaderError, PipelineError
from distill_reader.reader.channel import Cancel, Message, StatsRequest
from distill_reader.reader.epoch import Epoch
from distill_reader.reader.feeder import Feeder, FreeSlots, SlotOutbox
from distill_reader.reader.filling import SlotFiller
from distill_reader.reader.interrupts import deferred_interrupt
from distill_reader.reader.log_relay import LogRelay
from distill_reader.reader.pipeline_process import PipelineSpec
from distill_reader.reader.pool import PoolLayout, SharedBuffer, variable_cuts
from distill_reader.reader.process import ProcessHandle
from distill_reader.reader.receiver import PipelineReceiver
from distill_reader.reader.slots import SlotLedger
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
_TICK = 0.05


class Pipeline:
    """The pool, the ledger, the pipeline process and its threads; see the module docstring."""

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
        self._lock = threading.Lock()  # the epochs, broken, closed
        self._epochs: dict[int, Epoch] = {}  # the live epochs, for the receiver thread
        self.broken: BaseException | None = None  # set once: the next epoch starts a new pipeline
        self._closed = False
        self._process: ProcessHandle | None = None
        self._receiver: PipelineReceiver | None = None
        self._logs = LogRelay()
        self._buffer = SharedBuffer.create(layout.nbytes)
        try:
            self._start(options)
        finally:
            self._buffer.close_fd()  # mapped on both sides (or failed): the descriptor is not needed
        self.slots = [layout.slot_arrays(self._buffer.mmap, s) for s in range(layout.capacity)]
        self.ledger = SlotLedger(layout.capacity, _TICK * 2)  # where every slot is
        self._cuts = variable_cuts(config)
        source = config.length_source  # its lengths are a batch's tokens (the slot's arrays: feeds, fetches, lengths)
        self._token_lengths = (
            None if source is None else len(config.feeds) + len(config.fetches) + config.variable_feeds.index(source)
        )
        self._next_epoch = 0

    def _start(self, options: SchedulerOptions) -> None:
        self._process = ProcessHandle(self._buffer.fd)
        self._receiver = PipelineReceiver(self._process, self._logs, self.stats, self._epochs.get, self._lose)
        spec = PipelineSpec(
            config=self.config,
            layout=self.layout,
            shm_fd=self._buffer.fd,
            options=options,
            log_level=logging.getLogger("distill_reader").getEffectiveLevel(),
            parent_pid=os.getpid(),
            d_batch_size=self.d_batch_size,
        )
        try:
            self._logs.start()
            self._receiver.start()
            self._process.send_spec(spec)
            self._receiver.wait_ready(_START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    # -- state -------------------------------------------------------------------------------
    @property
    def dropped_log_records(self) -> int:
        """Log records of the pipeline process dropped because the log handlers did not keep up."""
        return self._logs.dropped_total

    @property
    def alive(self) -> bool:
        return self.broken is None and not self._closed and self._process is not None and self._process.running

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def owned(self) -> bool:
        """False in a forked copy of the training process (e.g. a DataLoader worker)."""
        return os.getpid() == self._owner_pid

    def _lose(self, error: BaseException) -> None:
        """The pipeline can no longer be used (the first reason stays): wake every wait on it."""
        with self._lock:
            self.broken = self.broken or error
            broken, epochs = self.broken, list(self._epochs.values())
        for epoch in epochs:
            epoch.lose(broken)
        if self._receiver is not None:
            self._receiver.wake()

    def send(self, message: Message, timeout: float | None = None) -> None:
        """Send to the pipeline process (from any thread); OSError once it is gone."""
        process = self._process  # (None once close() began, from another thread maybe)
        if process is None:
            raise OSError("the pipeline process is stopped")
        process.send(message, timeout)

    # -- epochs ------------------------------------------------------------------------------
    def start_epoch(self, kind: str, reader: Callable[[], Iterable[Any]], keep: int, copy: bool) -> Epoch:
        """Start a pass over ``reader`` (a reader of ``kind``); its batches are yielded as views held
        until ``keep`` further batches were taken, or as copies."""
        epoch = Epoch(
            self._next_epoch,
            self.ledger,
            self.slots,
            self._cuts,
            self.stats,
            request_stats=self.request_stats,
            flush_logs=self._logs.flush,
            keep=keep,
            copy=copy,
            token_lengths=self._token_lengths,
        )
        self._next_epoch += 1
        with self._lock:
            self._epochs[epoch.number] = epoch
            if self._closed:
                epoch.close()
            if self.broken is not None:
                epoch.lose(self.broken)
        free = FreeSlots(self.ledger, self.slots, self.config, self.stats)
        outbox = SlotOutbox(epoch, self.send, self.work_at_seal, free)
        filler = SlotFiller(
            self.config.feeds, self.layout.batch_size, self.d_batch_size, free, outbox, self.config.max_length
        )
        epoch.feeder = Feeder(epoch, kind, reader, filler, free)
        epoch.feeder.start()
        return epoch

    def abort(self, epoch: Epoch, reason: str | None = None) -> None:
        """Stop ``epoch`` early and take back its slots; see the module docstring. With ``reason``
        (another thread may be iterating it), that thread's next wait raises it."""
        feeder = epoch.feeder
        assert feeder is not None
        with deferred_interrupt():
            if reason is not None:
                epoch.stop(reason)
            feeder.stop()
            try:
                if self.alive:
                    self.send(Cancel(epoch.number), timeout=_ACK_TIMEOUT)
                    epoch.wait_cancelled(_ACK_TIMEOUT)
            except (DistillReaderError, OSError) as exc:
                if isinstance(exc, (OSError, ChannelTimeout)):  # ChannelTimeout: internal, not for the user
                    exc = PipelineError(f"lost the pipeline process while cancelling an epoch: {exc}")
                self._lose(exc)
            except BaseException:
                # Interrupted while cancelling: the pool can no longer be trusted. The next epoch
                # starts a new pipeline instead of reusing slots that may still be written.
                self._lose(PipelineError("an epoch was interrupted while it was being cancelled"))
                raise
            if not feeder.join(_STOP_TIMEOUT):
                log.warning(
                    "the reader function did not return within %.0f s after the epoch stopped; "
                    "its batch slot is freed when it does",
                    _STOP_TIMEOUT,
                )
            epoch.reclaim()
            with self._lock:
                self._epochs.pop(epoch.number, None)

    def finish(self, epoch: Epoch) -> None:
        """``epoch`` ended by exhaustion: every slot was taken."""
        assert epoch.feeder is not None
        epoch.feeder.join(_STOP_TIMEOUT)
        with self._lock:
            self._epochs.pop(epoch.number, None)

    # -- statistics --------------------------------------------------------------------------
    def request_stats(self, wait: float) -> None:
        """Ask the pipeline process for its statistics; wait up to ``wait`` seconds for them. Any
        thread; concurrent callers share one request."""
        receiver = self._receiver
        if not self.owned or receiver is None or not self.alive:
            return
        now = time.monotonic()
        ask, target = receiver.ask_stats(now, _STATS_RETRY)
        if ask:
            try:
                self.send(StatsRequest(), timeout=wait if wait > 0 else _STATS_WAIT)
            except (OSError, ChannelTimeout):  # the feeder or the next wait reports a lost process
                receiver.stats_not_asked()
                return
        receiver.wait_stats(target, now + wait, lambda: self._closed or self.broken is not None)

    # -- the end -----------------------------------------------------------------------------
    def mark_closed(self) -> None:
        """Make every wait on this pipeline raise "the reader was closed" (from any thread)."""
        if not self.owned:
            return
        with self._lock:
            self._closed = True
            epochs = list(self._epochs.values())
        for epoch in epochs:
            epoch.close()
        if self._receiver is not None:
            self._receiver.wake()

    def close(self) -> None:
        """Stop the pipeline process (bounded: 2 s, 10 s while it may hold shared-memory regions on
        teachers, 60 s while it writes a knowledge store; then SIGKILL). Idempotent; any thread."""
        if not self.owned:
            return  # a forked copy of the training process (e.g. a DataLoader worker) exiting: not ours
        self.mark_closed()
        process, self._process = self._process, None
        if process is None:
            return
        if self.config.store is not None and self.config.store.policy != "read":
            stop_timeout = _STORE_STOP_TIMEOUT
        elif self.config.shared_memory != "off":
            stop_timeout = _SHM_STOP_TIMEOUT
        else:
            stop_timeout = _STOP_TIMEOUT
        process.stop(stop_timeout)
        if self._receiver is not None:
            self._receiver.join(_STOP_TIMEOUT)
        self._logs.end()  # (the receiver ends it too, once it read the end of the pipe)
        if self._logs.thread.is_alive() and self._logs.thread is not threading.current_thread():
            self._logs.thread.join(_STOP_TIMEOUT)  # the last records; a stuck handler is left behind
