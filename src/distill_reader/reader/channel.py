"""The channel between the training process and its pipeline process: the messages, and one
:class:`Sender` and one :class:`Receiver` for each pipe end.

Two one-way pipes. Training process -> pipeline process: :class:`Work`, :class:`Seal`,
:class:`Cancel`, :class:`StatsRequest`, :class:`Stop`. Pipeline process -> training process:
:class:`Ready`, :class:`SlotDone`, :class:`EpochError`, :class:`Cancelled`, :class:`Fatal`,
:class:`StatsReport`, :class:`LogMessage`, :class:`LogsDropped`. See
:mod:`distill_reader.reader.pipeline_process` for what each one means.

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
two messages. A ``Sender`` writes without blocking: a message of at most ``PIPE_BUF`` bytes (every
message to the pipeline process) is written whole or not at all, and a sender that finds the pipe
full waits for room *without* the lock, so a feeder waiting to send ``Work`` never holds up
``Cancel``, ``StatsRequest`` or ``Stop`` once there is room for them.

An exception in ``EpochError`` or ``Fatal`` that cannot make the trip (it cannot be pickled, or
not unpickled) travels as a :class:`~distill_reader.errors.PipelineProcessError`: its type's name,
its message and its traceback as text (as PyTorch's DataLoader sends a worker's exception).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from distill_reader import errors
from distill_reader.errors import ChannelTimeout, DistillReaderError, PipelineProcessError
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


class LogsDropped(NamedTuple):
    """The pipeline process dropped ``count`` log records: the training process did not read them
    fast enough (the pipeline process never waits for it to)."""

    count: int


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
    LogsDropped,
)
_TAGS = {cls: tag for tag, cls in enumerate(_TYPES)}
_new = tuple.__new__


_CARRY_ERRORS = (EpochError, Fatal)
_WRITABLE_SLICE = 0.5  # seconds a sender without a deadline waits for room before it looks again


def encode(message: Message) -> bytes:
    kind = type(message)
    if kind in _CARRY_ERRORS:
        message = message._replace(error=portable(message.error))
    return pickle.dumps((_TAGS[kind], *message), pickle.HIGHEST_PROTOCOL)


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling and unpickling, else a stand-in naming its type, message
    and traceback: one of our own errors (:mod:`distill_reader.errors`) keeps its type, with the
    traceback after its message; any other becomes a :class:`PipelineProcessError`."""
    try:
        pickle.loads(pickle.dumps(error, pickle.HIGHEST_PROTOCOL))
        return error
    except Exception:  # noqa: BLE001 - whatever pickling or unpickling raises
        pass
    stand_in = as_text(error)
    cls = type(error)
    # Its class if it is one of ours, else the nearest of ours it derives from (if any).
    ours = next((c for c in cls.__mro__ if c.__module__ == errors.__name__), None)
    if ours is not None and issubclass(ours, DistillReaderError):
        try:
            same = ours(str(stand_in))
            pickle.loads(pickle.dumps(same, pickle.HIGHEST_PROTOCOL))
            return same
        except Exception:  # noqa: BLE001 - its constructor takes other arguments
            pass
    return stand_in


def as_text(error: BaseException, context: str = "") -> PipelineProcessError:
    """``error`` as a :class:`PipelineProcessError`: its type's name, message and traceback text."""
    cls = type(error)
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        message = "(its message cannot be shown)"
    text = "".join(traceback.format_exception(cls, error, error.__traceback__)).rstrip("\n")
    return PipelineProcessError(f"{cls.__module__}.{cls.__qualname__}", message, text, context)


def decode(data: bytes) -> Message:
    raw = pickle.loads(data)
    return _new(_TYPES[raw[0]], raw[1:])


class Sender:
    """The one writer of a pipe end; any thread may send. Closing it makes later sends raise OSError.

    The pipe end is put in non-blocking mode: the lock is held only while a write goes through (a
    frame of at most ``PIPE_BUF`` bytes is written whole or not at all), never while waiting for
    room, so one sender waiting for a full pipe does not hold up the others."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._fd = connection.fileno()
        os.set_blocking(self._fd, False)
        self._lock = threading.Lock()

    def send(self, message: Message, timeout: float | None = None) -> None:
        """Send ``message``. With ``timeout``, give up (:class:`ChannelTimeout`) when the pipe stays
        full that long; without it, wait until the other side reads or exits (EPIPE). Raises
        OSError when the pipe is closed or broken."""
        self.send_bytes(encode(message), type(message).__name__, timeout)

    def send_bytes(self, data: bytes, what: str = "a message", timeout: float | None = None) -> None:
        """Send an encoded message (``what`` names it in errors); see :meth:`send`."""
        # The framing of multiprocessing.connection.Connection.send_bytes, which the Receiver reads.
        frame = struct.pack("!i", len(data)) + data
        deadline = None if timeout is None else time.monotonic() + timeout
        if len(frame) > select.PIPE_BUF:
            self._send_large(frame, what, deadline)
            return
        while True:
            if not self._acquire(deadline):
                raise ChannelTimeout(f"could not send {what}: another send is stuck")
            try:
                if self._connection.closed:
                    raise OSError("the channel is closed")
                try:
                    os.write(self._fd, frame)  # at most PIPE_BUF bytes: whole, or not at all
                    return
                except BlockingIOError:
                    pass
            finally:
                self._lock.release()
            # The pipe is full: wait for room without the lock.
            if not self._wait_writable(deadline):
                raise ChannelTimeout(f"could not send {what}: the pipe stayed full")

    def _send_large(self, frame: bytes, what: str, deadline: float | None) -> None:
        """A frame larger than PIPE_BUF goes in pieces: the lock is held until it is all written."""
        if not self._acquire(deadline):
            raise ChannelTimeout(f"could not send {what}: another send is stuck")
        try:
            view = memoryview(frame)
            while view:
                if self._connection.closed:
                    raise OSError("the channel is closed")
                try:
                    view = view[os.write(self._fd, view) :]
                    continue
                except BlockingIOError:
                    pass
                if not self._wait_writable(deadline):
                    if len(view) == len(frame):
                        raise ChannelTimeout(f"could not send {what}: the pipe stayed full")
                    # Half a message is in the pipe: the other side can never read past it.
                    self._connection.close()
                    raise OSError(f"the channel is broken: {what} could not be sent whole in time")
        finally:
            self._lock.release()

    def _acquire(self, deadline: float | None) -> bool:
        if deadline is None:
            return self._lock.acquire()
        return self._lock.acquire(timeout=max(0.0, deadline - time.monotonic()))

    def _wait_writable(self, deadline: float | None) -> bool:
        """Wait until the pipe has room (or is broken or closed: the next write says which); False
        once ``deadline`` passed. Without a deadline, wait in slices so a sender notices a close."""
        remaining = _WRITABLE_SLICE if deadline is None else min(_WRITABLE_SLICE, deadline - time.monotonic())
        if remaining <= 0:
            return False
        if self._connection.closed:
            return True
        poller = select.poll()  # not select.select: descriptors above 1023 are fine
        poller.register(self._fd, select.POLLOUT)
        poller.poll(remaining * 1000)
        return deadline is None or time.monotonic() < deadline or bool(poller.poll(0))

    def close(self, timeout: float) -> None:
        """Close the pipe end; left open if a large send still holds it after ``timeout`` seconds
        (it fails with EPIPE once the other side is gone)."""
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
