"""The log thread: the pipeline process's log records reach the user's handlers here.

The receiver thread hands each record over and goes on reading the pipe; this thread (a daemon)
emits them under their logger names, so a slow handler (a log shipper whose network is down)
delays only the log, never the pipe, the epochs, ``stats()`` or an abort. Beyond ``_LOG_BACKLOG``
records waiting, records are dropped and counted (with those the pipeline process dropped
itself); once the handlers catch up, one WARNING says how many.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time

from distill_reader._logging import handle_forwarded
from distill_reader.reader.channel import LogMessage

log = logging.getLogger("distill_reader")

_LOG_BACKLOG = 10_000  # records of the pipeline process waiting for the user's log handlers, at most


class LogRelay:
    """The log thread: emits the pipeline process's records under their logger names."""

    def __init__(self) -> None:
        self._queue: collections.deque[LogMessage] = collections.deque()
        self._cond = threading.Condition()
        self._dropped = 0  # since the last warning
        self.dropped_total = 0
        self._busy = False  # a record is in the handlers
        self._ended = False
        self.thread = threading.Thread(target=self._run, name="distill-reader-log", daemon=True)

    def start(self) -> None:
        self.thread.start()

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
