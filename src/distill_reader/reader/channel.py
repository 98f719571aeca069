"""The channel between the training process and its pipeline process: the messages, and one
:class:`Sender` and one :class:`Receiver` for each pipe end.

Two one-way pipes. Training process -> pipeline process: :class:`Work`, :class:`Seal`,
:class:`Cancel`, :class:`StatsRequest`, :class:`Stop`. Pipeline process -> training process:
:class:`Ready`, :class:`SlotDone`, :class:`EpochError`, :class:`Cancelled`, :class:`Fatal`,
:class:`StatsReport`, :class:`LogMessage`. See :mod:`distill_reader.reader.pipeline_process` for
what each one means.

Each message is a NamedTuple; it travels as a plain tuple ``(tag, *fields)`` pickled with
:func:`pickle.dumps`. ``Work`` is sent for every d_batch (thousands per second): a tuple of ints
pickles several times faster than a NamedTuple or a dataclass, which pickle their class by name,
and ``pickle.dumps`` is faster than ``Connection.send``'s ``ForkingPickler``. On a busy 2-core
machine ``decode(encode(Work(...)))`` took 2.4 to 4 us, the earlier ``("work", ...)`` tuples
through ``ForkingPickler`` 5 to 9 us, a NamedTuple pickled by class 10 to 13 us::

    PYTHONPATH=src python -m timeit -s "from distill_reader.reader.channel import Work, encode, decode; \
        m = Work(3, 1234, 2, 8, 4)" "decode(encode(m))"

Every pipe end has exactly one reader and one writer: a ``Sender`` serializes the threads that
write (a lock), and each side reads its pipe from one place only (the training process's receiver
thread, the pipeline process's event loop). Two threads reading one pipe interleave the bytes of
two messages.
"""

from __future__ import annotations

import logging
import pickle
import select
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from distill_reader.errors import ChannelTimeout
from distill_reader.teacher.stats import TeacherStats


# -- training process -> pipeline process -----------------------------------------------------
class Work(NamedTuple):
    """Rows ``[start, start + count)`` of ``slot`` are written: send them to a teacher."""

    epoch: int
    sequence: int  # the slot's batch number in the epoch: earlier batches go first
    slot: int
    start: int
    count: int


class Seal(NamedTuple):
    """Every d_batch of ``slot`` was sent: it holds ``rows`` rows. For variable-length rows no
    ``Work`` is sent: the pipeline process groups the slot's rows by length into d_batches."""

    epoch: int
    slot: int
    rows: int
    sequence: int


class Cancel(NamedTuple):
    """Drop all work of ``epoch`` and earlier; answered by :class:`Cancelled`."""

    epoch: int


class StatsRequest(NamedTuple):
    """Answered by :class:`StatsReport`."""


class Stop(NamedTuple):
    """Exit."""


# -- pipeline process -> training process -----------------------------------------------------
class Ready(NamedTuple):
    """The pool is mapped; work can be sent."""


class SlotDone(NamedTuple):
    """Every row of the sealed ``slot`` has its teacher outputs."""

    epoch: int
    slot: int
    seconds: float  # from the slot's first request to its last answer


class EpochError(NamedTuple):
    """``epoch`` failed (a teacher error, no teacher): the training loop raises ``error``."""

    epoch: int
    error: BaseException


class Cancelled(NamedTuple):
    """The pipeline process will write nothing more for ``epoch`` and earlier."""

    epoch: int


class Fatal(NamedTuple):
    """The pipeline process cannot go on (failed to start, a bug of ours, discovery refused us)."""

    error: BaseException


class StatsReport(NamedTuple):
    teachers: list[TeacherStats]
    retries: int  # requests sent again after a failure
    store_hits: int = 0  # rows read from the knowledge store ([store])


class LogMessage(NamedTuple):
    """A log record of the pipeline process, emitted again by the training process."""

    level: int
    name: str  # the logger's name
    message: str  # formatted with its arguments
    exc_text: str | None
    created: float  # time.time() when it was logged
    pathname: str
    lineno: int
    func_name: str | None
    process: int | None

    @classmethod
    def from_record(cls, record: logging.LogRecord) -> LogMessage:
        exc_text = record.exc_text
        if exc_text is None and record.exc_info and record.exc_info[0] is not None:
            exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        return cls(
            record.levelno,
            record.name,
            record.getMessage(),
            exc_text,
            record.created,
            record.pathname,
            record.lineno,
            record.funcName,
            record.process,
        )

    def to_record(self) -> logging.LogRecord:
        return logging.makeLogRecord(
            {
                "name": self.name,
                "levelno": self.level,
                "levelname": logging.getLevelName(self.level),
                "msg": self.message,
                "args": None,
                "exc_text": self.exc_text,
                "created": self.created,
                "msecs": (self.created - int(self.created)) * 1000,
                "pathname": self.pathname,
                "filename": self.pathname.rsplit("/", 1)[-1],
                "module": self.pathname.rsplit("/", 1)[-1].rsplit(".", 1)[0],
                "lineno": self.lineno,
                "funcName": self.func_name,
                "process": self.process,
                "processName": "distill-reader-pipeline",
                "threadName": "pipeline",
            }
        )


Message = Any  # one of the NamedTuples above

_TYPES: tuple[type, ...] = (
    Work,
    Seal,
    Cancel,
    StatsRequest,
    Stop,
    Ready,
    SlotDone,
    EpochError,
    Cancelled,
    Fatal,
    StatsReport,
    LogMessage,
)
_TAGS = {cls: tag for tag, cls in enumerate(_TYPES)}
_new = tuple.__new__


def encode(message: Message) -> bytes:
    return pickle.dumps((_TAGS[type(message)], *message), pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Message:
    raw = pickle.loads(data)
    return _new(_TYPES[raw[0]], raw[1:])


class Sender:
    """The one writer of a pipe end; any thread may send. Closing it makes later sends raise OSError."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def send(self, message: Message, timeout: float | None = None) -> None:
        """Send ``message``. With ``timeout``, give up (:class:`ChannelTimeout`) when the lock or the
        pipe stays busy that long; without it, wait until the other side reads or exits (EPIPE).
        Raises OSError when the pipe is closed or broken."""
        data = encode(message)
        if timeout is None:
            with self._lock:
                self._connection.send_bytes(data)
            return
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise ChannelTimeout(f"could not send {type(message).__name__}: another send is stuck")
        try:
            if self._connection.closed:
                raise OSError("the channel is closed")
            # A pipe with room for PIPE_BUF bytes is writable; our messages to the pipeline process
            # are far smaller, so the write that follows does not block.
            poller = select.poll()  # not select.select: descriptors above 1023 are fine
            poller.register(self._connection.fileno(), select.POLLOUT)
            remaining = max(0.0, deadline - time.monotonic())
            if not poller.poll(remaining * 1000):
                raise ChannelTimeout(f"could not send {type(message).__name__}: the pipe stayed full")
            self._connection.send_bytes(data)
        finally:
            self._lock.release()

    def close(self, timeout: float) -> None:
        """Close the pipe end; left open if a send is still stuck after ``timeout`` seconds (it
        fails with EPIPE once the other side is gone)."""
        if self._lock.acquire(timeout=timeout):
            try:
                self._connection.close()
            finally:
                self._lock.release()


class Receiver:
    """The one reader of a pipe end; only its owner (one thread, or the event loop) calls it."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def fileno(self) -> int:
        return self._connection.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._connection.poll(timeout)

    def recv(self) -> Message:
        """The next message; waits for it. EOFError once the other side closed its end."""
        return decode(self._connection.recv_bytes())

    def close(self) -> None:
        self._connection.close()
