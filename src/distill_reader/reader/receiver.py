"""The receiver thread: the one reader of the pipe from the pipeline process.

It routes each message to its one recipient and goes back to the pipe: log records to the log
thread, statistics to the :class:`~distill_reader.reader.stats.StatsTracker`, an epoch's slots
done, error and cancel acknowledgement to that :class:`~distill_reader.reader.epoch.Epoch`, and a
fatal error or the end of the pipe to the pipeline (``lost``). It never waits for anything but the
pipe and, briefly, an epoch's lock. What concerns the process itself (started, statistics
answered, ended) it keeps under its own condition, which only :meth:`PipelineReceiver.wait_ready`
and :meth:`PipelineReceiver.wait_stats` wait on, never the training loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from distill_reader.errors import PipelineError
from distill_reader.reader.channel import (
    Cancelled,
    EpochError,
    Fatal,
    LogMessage,
    LogsDropped,
    Ready,
    Receiver,
    SlotDone,
    StatsReport,
)
from distill_reader.reader.log_relay import LogRelay
from distill_reader.reader.stats import StatsTracker

if TYPE_CHECKING:
    from distill_reader.reader.epoch import Epoch
    from distill_reader.reader.process import ProcessHandle

log = logging.getLogger("distill_reader")

_TICK = 0.05


class PipelineReceiver:
    """Reads ``process``'s pipe on a daemon thread until its end (the process exited or was killed)."""

    def __init__(
        self,
        process: ProcessHandle,
        logs: LogRelay,
        stats: StatsTracker,
        epoch: Callable[[int], Epoch | None],
        lost: Callable[[BaseException], None],
    ) -> None:
        self._process = process
        self._incoming: Receiver = process.incoming
        self._logs = logs
        self._stats = stats
        self._epoch = epoch  # the live epoch of that number; None once it is over (late messages)
        self._lost = lost  # the pipeline can no longer be used: the next epoch starts a new one
        self._cond = threading.Condition()
        self._ready = False
        self._fatal: BaseException | None = None
        self._ended = False
        self._stats_asked_at: float | None = None  # a StatsRequest is unanswered since then
        self._stats_reports = 0
        self.thread = threading.Thread(target=self._run, name="distill-reader-receiver", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def wake(self) -> None:
        """Wake the waits of :meth:`wait_stats` (the pipeline was closed or lost)."""
        with self._cond:
            self._cond.notify_all()

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    message = self._incoming.recv()
                except (EOFError, OSError):
                    return  # the pipeline process exited, or was killed
                kind = type(message)
                if kind is SlotDone:
                    epoch = self._epoch(message.epoch)
                    if epoch is not None:
                        epoch.slot_done(message.slot, message.seconds)
                elif kind is LogMessage:
                    self._logs.put(message)  # the user's handlers run on the log thread
                elif kind is LogsDropped:
                    self._logs.dropped(message.count)
                elif kind is EpochError:
                    epoch = self._epoch(message.epoch)
                    if epoch is not None:
                        epoch.failed(message.error)
                elif kind is Cancelled:
                    epoch = self._epoch(message.epoch)
                    if epoch is not None:
                        epoch.cancel_acknowledged()
                elif kind is StatsReport:
                    self._stats.pipeline_report(message.teachers, message.retries, message.store_hits)
                    with self._cond:
                        self._stats_asked_at = None
                        self._stats_reports += 1
                        self._cond.notify_all()
                elif kind is Ready:
                    with self._cond:
                        self._ready = True
                        self._cond.notify_all()
                elif kind is Fatal:
                    with self._cond:
                        self._fatal = self._fatal or message.error
                        self._cond.notify_all()
                    self._lost(message.error)
        except BaseException as exc:  # a bug of ours, or an unreadable message: the channel is lost
            self._lost(PipelineError(f"reading from the pipeline process failed: {exc!r}"))
            log.error("reading from the pipeline process failed", exc_info=True)
        finally:
            self._incoming.close()
            self._logs.end()
            code = self._process.exit_code(_TICK)
            with self._cond:
                self._ended = True
                self._cond.notify_all()
            self._lost(PipelineError(f"the pipeline process died (exit code {code})"))

    # -- waits of other threads --------------------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        """Wait until the pipeline process mapped the pool and answered ``Ready``; raise if it
        failed, exited or took longer than ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                if self._fatal is not None:
                    raise PipelineError(f"the pipeline process failed to start: {self._fatal}") from self._fatal
                if self._ended or not self._process.running:
                    code = self._process.exit_code(_TICK)
                    raise PipelineError(f"the pipeline process exited with code {code} on start")
                if time.monotonic() > deadline:
                    raise PipelineError(f"the pipeline process did not start within {timeout:.0f} s")
                self._cond.wait(_TICK)

    def ask_stats(self, now: float, retry_after: float) -> tuple[bool, int]:
        """Whether to send a StatsRequest (one at a time; again if an answer got lost, which it
        never should), and the count of reports that answers it."""
        with self._cond:
            ask = self._stats_asked_at is None or now - self._stats_asked_at > retry_after
            if ask:
                self._stats_asked_at = now
            return ask, self._stats_reports + 1

    def stats_not_asked(self) -> None:
        """The StatsRequest could not be sent."""
        with self._cond:
            self._stats_asked_at = None

    def wait_stats(self, target: int, deadline: float, give_up: Callable[[], bool]) -> None:
        """Wait until ``target`` reports came, ``give_up()`` (closed, lost) or ``deadline``."""
        with self._cond:
            while self._stats_reports < target and not give_up():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)
