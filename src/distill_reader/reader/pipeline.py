"""The training loop's side of the pipeline: the pool, the slots, the pipeline process, the epochs.

Lifecycle (one owner for each):

* :class:`Pipeline` owns the shared pool, the slot bookkeeping and the pipeline process. It starts
  with the first epoch and lives across epochs; if its process dies it is replaced at the next epoch.
  ``close()`` (the reader's ``close()``, its finalizer, or interpreter exit) stops the process:
  ``stop`` message, 2 s to exit, then SIGKILL.
* :class:`Epoch` owns one pass over the user's reader: a feeder thread that writes samples into
  free slots and sends each d_batch to the pipeline process as soon as its rows are written. The
  consumer (the training loop's generator) takes sealed slots in order, waits until the pipeline
  process reports them done and yields views of them.
* A slot is free, then owned by the feeder, then by the pipeline process and the consumer's queue,
  then held by the consumer after it was yielded; it is freed once the consumer has taken
  ``occupied_capacity`` further batches (or at once with ``copy=True``).
* Early exit (``break``, an exception, Ctrl-C): the consumer's generator is closed and aborts the
  epoch: it stops the feeder, asks the pipeline process to cancel the epoch and waits for its
  acknowledgement (after which no teacher output is written for that epoch), then frees every
  slot of the epoch that the consumer does not hold. A feeder stuck inside the user's reader is
  left behind (it is a daemon thread) and frees its slot itself when the reader returns (the
  pipeline process ignores anything sent for a cancelled epoch).
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import fcntl
import logging
import os
import queue
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

from distill_reader.config import ReaderConfig
from distill_reader.errors import DistillReaderError, PipelineError
from distill_reader.reader.filling import SlotFiller
from distill_reader.reader.pipeline_process import PipelineSpec
from distill_reader.reader.pool import PoolLayout, SharedBuffer
from distill_reader.reader.source import reader_function_error
from distill_reader.reader.stats import StatsTracker
from distill_reader.teacher.scheduler import SchedulerOptions

log = logging.getLogger("distill_reader")

_START_TIMEOUT = 60.0  # seconds for the pipeline process to import and map the pool
_ACK_TIMEOUT = 5.0  # seconds for the pipeline process to acknowledge a cancelled epoch
_STOP_TIMEOUT = 2.0
_TICK = 0.05  # how often waits look at the other side
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
    """Give the pipe 1 MiB (Linux) so the pipeline process never waits on a busy training loop."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(fd, set_size, 1 << 20)


class SlotPool:
    """Free batch slots; ``acquire`` waits until one is free or ``stop`` is set."""

    def __init__(self, capacity: int) -> None:
        self._free = collections.deque(range(capacity))
        self._cond = threading.Condition()

    def acquire(self, stop: threading.Event) -> int | None:
        with self._cond:
            while not self._free:
                if stop.is_set():
                    return None
                self._cond.wait(_TICK * 2)
            return self._free.popleft()

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()


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
        self.stats = stats
        self.layout = layout
        self._owner_pid = os.getpid()
        self._buffer = SharedBuffer.create(layout.nbytes)
        self._send_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        try:
            self._start_process(options)
        finally:
            self._buffer.close_fd()  # mapped on both sides (or failed): the descriptor is not needed
        self.slots = [layout.slot_arrays(self._buffer.mmap, s) for s in range(layout.capacity)]
        self.free = SlotPool(layout.capacity)
        self.held: collections.deque[int] = collections.deque()  # yielded slots, oldest first
        self.broken: BaseException | None = None
        self._done: dict[tuple[int, int], float] = {}  # (epoch, slot) reported done -> teacher seconds
        self._errors: dict[int, BaseException] = {}
        self._acks: set[int] = set()
        self._stats_requested = False
        self._next_epoch = 0

    # -- process -----------------------------------------------------------------------------
    def _start_process(self, options: SchedulerOptions) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        _enlarge_pipe(from_child_w)
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
        self._to_child = Connection(to_child_w, readable=False)
        self._from_child = Connection(from_child_r, writable=False)
        spec = PipelineSpec(
            config=self.config,
            layout=self.layout,
            shm_fd=self._buffer.fd,
            options=options,
            log_level=logging.getLogger("distill_reader").getEffectiveLevel(),
            parent_pid=os.getpid(),
        )
        try:
            self._send(spec)
            deadline = time.monotonic() + _START_TIMEOUT
            while not self._from_child.poll(_TICK):
                if self._process.poll() is not None:
                    raise PipelineError(f"the pipeline process exited with code {self._process.returncode} on start")
                if time.monotonic() > deadline:
                    raise PipelineError(f"the pipeline process did not start within {_START_TIMEOUT:.0f} s")
            message = self._from_child.recv()
            if message[0] == "fatal":
                raise PipelineError(f"the pipeline process failed to start: {message[1]}") from message[1]
        except BaseException:
            self.close()
            raise

    def _send(self, message: Any) -> None:
        with self._send_lock:
            self._to_child.send(message)

    @property
    def alive(self) -> bool:
        return self.broken is None and self._process is not None and self._process.poll() is None

    def close(self) -> None:
        """Stop the pipeline process (bounded: 2 s, then SIGKILL). Idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked copy of the training process (e.g. a DataLoader worker) exiting: not ours
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT)
        for conn in (self._to_child, self._from_child):
            conn.close()

    # -- messages from the pipeline process ---------------------------------------------------
    def _pump(self, timeout: float) -> None:
        """Handle messages from the pipeline process, waiting up to ``timeout`` for the first."""
        if self.broken is not None:
            raise self.broken
        try:
            ready = self._from_child.poll(timeout)
            while ready:
                self._handle(self._from_child.recv())
                ready = self._from_child.poll()
        except (EOFError, OSError):
            code = self._process.poll() if self._process else None
            self.broken = PipelineError(f"the pipeline process died (exit code {code})")
            raise self.broken from None

    def request_stats(self, wait: float) -> None:
        """Ask the pipeline process for its statistics; wait up to ``wait`` seconds for them."""
        if not self.alive:
            return
        if not self._stats_requested:
            self._stats_requested = True
            self._send(("stats?",))
        deadline = time.monotonic() + wait
        with contextlib.suppress(DistillReaderError):  # errors stay recorded for the epoch to raise
            self._pump(0)
            while self._stats_requested and time.monotonic() < deadline:
                self._pump(_TICK)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "slot_done":
            self._done[(message[1], message[2])] = message[3]
        elif kind == "stats":
            self._stats_requested = False
            self.stats.pipeline_report(message[1], message[2])
        elif kind == "error":
            self._errors.setdefault(message[1], message[2])
        elif kind == "warning":
            log.warning("%s", message[1])
        elif kind == "cancelled":
            self._acks.add(message[1])
        elif kind == "fatal":
            self.broken = message[1]

    def _raise_if_failed(self, epoch: int) -> None:
        error = self._errors.get(epoch)
        if error is not None:
            raise error

    # -- epochs ------------------------------------------------------------------------------
    def start_epoch(self, kind: str, reader: Callable[[], Iterable[Any]]) -> Epoch:
        epoch = Epoch(self, self._next_epoch, kind, reader)
        self._next_epoch += 1
        epoch.start()
        return epoch

    def wait_sealed(self, epoch: Epoch) -> Any:
        """The feeder's next item for ``epoch`` (a sealed slot, the end, or a failure)."""
        while True:
            self._raise_if_failed(epoch.number)
            try:
                return epoch.items.get(timeout=_TICK)
            except queue.Empty:
                self._pump(0)

    def wait_done(self, epoch: Epoch, slot: int) -> float:
        """Wait until the teachers have answered for every row of ``slot``; returns the seconds from
        its first request to its last answer."""
        key = (epoch.number, slot)
        while key not in self._done:
            self._raise_if_failed(epoch.number)
            self._pump(_TICK)
        return self._done.pop(key)

    def hold(self, slot: int) -> None:
        """The consumer took ``slot``; it is freed by a later ``release_held``."""
        self.held.append(slot)

    def release_held(self, keep: int) -> None:
        if len(self.held) <= keep:
            return  # the common case on the hot path: no signal handler swap
        with deferred_interrupt():
            while len(self.held) > keep:
                self.free.release(self.held.popleft())

    def abort(self, epoch: Epoch) -> None:
        """Stop ``epoch`` early and take back its slots; see the module docstring."""
        with deferred_interrupt():
            epoch.stop.set()
            settled = False  # the pipeline process will write nothing more for this epoch
            try:
                if self.alive:
                    self._send(("cancel", epoch.number))
                    deadline = time.monotonic() + _ACK_TIMEOUT
                    while epoch.number not in self._acks:
                        if time.monotonic() > deadline:
                            raise PipelineError("the pipeline process did not acknowledge a cancelled epoch")
                        self._pump(_TICK)
                settled = True
            except (DistillReaderError, OSError) as exc:
                self.broken = self.broken or exc
            finally:
                if not settled and self.broken is None:
                    # Interrupted while cancelling: the pool can no longer be trusted. The next epoch
                    # starts a new pipeline instead of reusing slots that may still be written.
                    self.broken = PipelineError("an epoch was interrupted while it was being cancelled")
            epoch.thread.join(_STOP_TIMEOUT)
            if epoch.thread.is_alive():
                log.warning(
                    "the reader function did not return within %.0f s after the epoch stopped; "
                    "its batch slot is freed when it does",
                    _STOP_TIMEOUT,
                )
            epoch.reclaim()
            self._acks.discard(epoch.number)
            self._errors.pop(epoch.number, None)
            self._done = {key: value for key, value in self._done.items() if key[0] != epoch.number}

    def finish(self, epoch: Epoch) -> None:
        epoch.thread.join(_STOP_TIMEOUT)
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
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        self._kind = kind
        self._reader = reader
        self._lock = threading.Lock()
        self._reclaimed = False
        self._sequence = 0
        self._acquired_at = 0.0
        self.thread = threading.Thread(target=self._feed, name=f"distill-reader-feeder-{number}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def reclaim(self) -> None:
        """Free every slot of this epoch that is not yet the consumer's (after the cancel ack)."""
        with self._lock:
            self._reclaimed = True
            while True:
                try:
                    item = self.items.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, (_Sealed, _Unsealed)):
                    self.pipeline.free.release(item.slot)

    def _hand_over(self, item: _Sealed | _Unsealed) -> None:
        with self._lock:
            if self._reclaimed:  # a late feeder: the epoch is over and cancelled
                self.pipeline.free.release(item.slot)
            else:
                self.items.put(item)

    # -- feeder thread -----------------------------------------------------------------------
    def _acquire(self) -> tuple[int, list[np.ndarray]] | None:
        slot = self.pipeline.free.acquire(self.stop)
        if slot is None:
            return None
        self._acquired_at = time.perf_counter()
        return slot, self.pipeline.slots[slot][: len(self.pipeline.config.feeds)]

    def _on_d_batch(self, slot: int, start: int, count: int) -> None:
        self.pipeline._send(("work", self.number, self._sequence, slot, start, count))

    def _on_sealed(self, slot: int, rows: int) -> None:
        self.pipeline._send(("seal", self.number, slot, rows))
        self._hand_over(_Sealed(self._sequence, slot, rows, time.perf_counter() - self._acquired_at))
        self._sequence += 1

    def _feed(self) -> None:
        filler = SlotFiller(
            self.pipeline.config.feeds,
            self.pipeline.layout.batch_size,
            self.pipeline.d_batch_size,
            self._acquire,
            self._on_d_batch,
            self._on_sealed,
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
                    self.items.put(_END)
                    return
                except Exception as exc:
                    raise reader_function_error(exc, filler.position) from exc
                if not add(value):
                    return
        except (DistillReaderError, OSError) as exc:
            if isinstance(exc, OSError):  # the pipe to the pipeline process broke
                exc = PipelineError(f"lost the pipeline process: {exc}")
            self.items.put(_Failed(exc))
        except BaseException as exc:  # a bug of ours: still reach the consumer, never die silently
            self.items.put(_Failed(PipelineError(f"feeder failed: {type(exc).__name__}: {exc}")))
            raise
        finally:
            if filler.slot is not None:  # requests may be in flight: freed once the epoch is cancelled
                self._hand_over(_Unsealed(filler.slot))
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
