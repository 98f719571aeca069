"""Faults between the training process and its pipeline process: a log handler that blocks, an
exception that cannot be pickled, a slot whose seal fails. Each leaves the reader usable.

The faults inside the pipeline process are injected by a ``sitecustomize`` module put on the
PYTHONPATH that the pipeline process inherits; it acts only in a process started the way the
reader starts its pipeline process (``python -c ... <fd> <fd>``) and only when the test's
environment variables ask for it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import threading
import time

import pytest
from conftest import settled_stats, wait_for
from test_reader import check_epoch, sample_list_reader

from distill_reader import DistillReader, DistillReaderError, PipelineError
from distill_reader.errors import ChannelTimeout, PipelineProcessError, TeacherError
from distill_reader.reader import log_relay
from distill_reader.reader.channel import Cancel, EpochError, Fatal, Ready, Receiver, Sender, decode, encode
from distill_reader.reader.feeder import SlotOutbox

pytestmark = pytest.mark.timeout(300)

SITECUSTOMIZE = '''
"""Fault injection for tests/test_pipeline_faults.py, in a reader's pipeline process only."""
import os
import sys
import threading


class LockedError(Exception):
    """Cannot be pickled: it holds a lock (as errors of client libraries hold sockets)."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def _first_time():
    """True once per test (a marker file): the next pipeline process runs without the fault."""
    try:
        os.close(os.open(os.environ["DR_FAULT_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _flood(count):
    import logging
    import time

    root = logging.getLogger()
    deadline = time.monotonic() + 60
    while not any(type(h).__name__ == "_ForwardingHandler" for h in root.handlers):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    flood = logging.getLogger("distill_reader.flood")
    for i in range(count):
        flood.warning("flood record %d", i)


def _install():
    fault = os.environ.get("DR_FAULT")
    if fault == "start":
        from distill_reader.reader import pipeline_process

        original = pipeline_process.SharedBuffer.from_fd.__func__

        def failing_from_fd(cls, fd, size):
            if _first_time():
                raise LockedError("the pool cannot be mapped")
            return original(cls, fd, size)

        pipeline_process.SharedBuffer.from_fd = classmethod(failing_from_fd)
    elif fault == "infer":
        from distill_reader.teacher.client import TeacherClient

        original = TeacherClient.infer

        async def failing_infer(self, batch):
            if _first_time():
                raise LockedError("the teacher client library failed")
            return await original(self, batch)

        TeacherClient.infer = failing_infer
    elif fault == "outbox":
        from distill_reader.reader.channel import Sender

        original_send = Sender.send_bytes

        def failing_send_bytes(self, data, what="a message", timeout=None):
            if what == "SlotDone" and _first_time():
                raise RuntimeError("the outbox thread failed")
            return original_send(self, data, what, timeout)

        Sender.send_bytes = failing_send_bytes
    flood = os.environ.get("DR_LOG_FLOOD")
    if flood:
        threading.Thread(target=_flood, args=(int(flood),), daemon=True).start()
    heartbeat = os.environ.get("DR_LOOP_HEARTBEAT")
    if heartbeat:
        _beat_into(heartbeat)


def _beat_into(path):
    """Every 50 ms the event loop logs a record (a send from the loop) and then writes how many
    beats it made into ``path``: the file stops changing when the loop is stuck."""
    import asyncio
    import logging

    from distill_reader.reader import pipeline_process

    original = pipeline_process._PipelineProcess.run

    async def beat():
        n = 0
        while True:
            logging.getLogger("distill_reader.heartbeat").warning("beat %d", n)
            with open(path + ".tmp", "w") as f:
                f.write(str(n))
            os.replace(path + ".tmp", path)
            n += 1
            await asyncio.sleep(0.05)

    async def run_with_heartbeat(self):
        task = asyncio.get_running_loop().create_task(beat())
        try:
            await original(self)
        finally:
            task.cancel()

    pipeline_process._PipelineProcess.run = run_with_heartbeat


# The pipeline process: python -c <its main> <input fd> <output fd>
if len(sys.argv) == 3 and sys.argv[0] == "-c" and sys.argv[1].isdigit() and sys.argv[2].isdigit():
    _install()
'''


@pytest.fixture
def inject(tmp_path, monkeypatch):
    """``inject(DR_FAULT=..., DR_LOG_FLOOD=...)``: the faults the next pipeline processes get."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def install(**env: str) -> None:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
        monkeypatch.setenv("DR_FAULT_MARKER", str(tmp_path / "fault-done"))
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return install


def _places(dr: DistillReader) -> dict[str, int]:
    return dr._holder.pipeline.ledger.counts()


# -- a log handler that blocks ------------------------------------------------------------------
class _BlockingHandler(logging.Handler):
    """Blocks on the first record of the pipeline process until released (60 s at most), as a log
    shipper whose network is down would; then records every message.

    Only the pipeline process's records go through its lock: a handler that blocks holding its
    lock also blocks the training process's own log calls (here the pool warning the training loop
    logs), as any Python logging does; that is not what this test is about."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = threading.Event()
        self.blocked = threading.Event()
        self.messages: list[str] = []

    def handle(self, record: logging.LogRecord) -> bool:
        if record.processName != "distill-reader-pipeline":
            self.messages.append(record.getMessage())
            return True
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        if record.processName == "distill-reader-pipeline" and not self.blocked.is_set():
            self.blocked.set()
            self.unblock.wait(60)
        self.messages.append(record.getMessage())


FLOOD = 3000
DROPPED = re.compile(r"(\d+) log record\(s\) of the pipeline process were dropped")


def test_a_blocked_log_handler_stalls_neither_the_epochs_nor_stats_nor_abort(
    write_config, tag_teachers, inject, monkeypatch
):
    """While the user's log handler blocks on a record of the pipeline process, and that process
    logs thousands more, epochs run whole, stats() answers and an early break returns at once.
    The records the handlers could not take are dropped and counted; a warning says how many."""
    inject(DR_LOG_FLOOD=str(FLOOD))
    monkeypatch.setattr(log_relay, "_LOG_BACKLOG", 100)  # drop sooner
    handler = _BlockingHandler()
    logger = logging.getLogger("distill_reader")
    logger.addHandler(handler)
    n = 160
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1)
    dr.set_sample_list_generator(sample_list_reader(n, 5))
    try:
        with dr:
            started = time.monotonic()
            batches = dr.distill_reader()()
            first = [a.copy() for a in next(batches)]
            assert handler.blocked.wait(30), "the pipeline process logged nothing"
            check_epoch([first] + [[a.copy() for a in b] for b in batches], n, 8)
            for _ in range(2):
                check_epoch([[a.copy() for a in b] for b in dr.distill_reader()()], n, 8)
            stats = settled_stats(dr)
            assert stats.samples == 3 * n
            break_at = time.monotonic()
            for _ in zip(range(2), dr.distill_reader()()):
                pass  # an early break: abort waits for the pipeline process to acknowledge
            assert time.monotonic() - break_at < 10
            check_epoch([[a.copy() for a in b] for b in dr.distill_reader()()], n, 8)
            elapsed = time.monotonic() - started
            assert not handler.unblock.is_set()
            assert elapsed < 45, f"the epochs took {elapsed:.0f} s: they waited for the log handler"
            handler.unblock.set()

            def dropped_counts() -> list[int]:
                return [int(m.group(1)) for m in map(DROPPED.search, list(handler.messages)) if m]

            def all_accounted() -> bool:
                delivered = sum(1 for m in list(handler.messages) if m.startswith("flood record"))
                return delivered + sum(dropped_counts()) >= FLOOD

            wait_for(all_accounted, 60, "every flood record delivered or counted as dropped")
            assert sum(dropped_counts()) > 0
            assert sum(dropped_counts()) == dr._holder.pipeline.dropped_log_records
    finally:
        handler.unblock.set()
        logger.removeHandler(handler)


def test_the_event_loop_runs_on_while_the_training_process_does_not_read(
    write_config, tag_teachers, inject, monkeypatch, tmp_path
):
    """The training process stops reading its pipe (its receiver thread held) while the pipeline
    process logs far more than the pipe holds: the pipeline process's event loop goes on (a loop
    that logs, i.e. sends, every 50 ms keeps beating); once the training process reads again,
    the reader works."""
    heartbeat = tmp_path / "beats"
    inject(DR_LOG_FLOOD="20000", DR_LOOP_HEARTBEAT=str(heartbeat))
    gate = threading.Event()
    ready = threading.Event()
    original = Receiver.recv

    def recv(self):
        if ready.is_set():
            gate.wait(60)  # the receiver stops reading once the pipeline process started
        message = original(self)
        if isinstance(message, Ready):
            ready.set()
        return message

    monkeypatch.setattr(Receiver, "recv", recv)

    def beats() -> int:
        return int(heartbeat.read_text() or 0)

    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_list_generator(sample_list_reader(80, 5))
    try:
        with dr:
            dr._ensure_pipeline()
            wait_for(heartbeat.exists, 30, "the pipeline process's loop beating")
            time.sleep(2)  # the flood fills the pipe (1 MiB) meanwhile
            before = beats()
            time.sleep(3)
            after = beats()
            assert not gate.is_set()
            assert after >= before + 10, f"the event loop stopped: {before} beats, then {after} 3 s later"
            gate.set()
            check_epoch(list(dr.distill_reader()()), 80, 8)
    finally:
        gate.set()


# -- an exception that cannot be pickled --------------------------------------------------------
class _Locked(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class _TwoArguments(Exception):
    """Pickles, but cannot be unpickled (its __init__ takes two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


class _LockedTeacherError(TeacherError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    ("error", "kind", "name", "text"),
    [
        (_Locked("a socket went away"), PipelineProcessError, "_Locked", "a socket went away"),
        (_TwoArguments("this", "that"), PipelineProcessError, "_TwoArguments", "this and that"),
        # One of ours keeps its type, so `except TeacherError` still catches it.
        (_LockedTeacherError("the teacher is gone"), TeacherError, "_LockedTeacherError", "the teacher is gone"),
    ],
)
def test_an_error_that_cannot_cross_the_channel_arrives_as_text(error, kind, name, text):
    for message in (EpochError(3, _raised(error)), Fatal(_raised(error))):
        received = decode(encode(message))
        got = received.error
        assert isinstance(got, kind), got
        assert name in str(got) and text in str(got) and "Traceback" in str(got) and "_raised" in str(got)
        pickle.loads(pickle.dumps(got))
    # An error that crosses as it is keeps its type and its attributes.
    assert decode(encode(EpochError(1, ValueError("plain")))).error.args == ("plain",)


def test_an_unpicklable_error_at_start_reaches_the_loop_and_the_next_epoch_works(write_config, tag_teachers, inject):
    """The pipeline process fails to start with an exception that cannot be pickled: the loop gets
    its type, message and traceback, not just an exit code; the next epoch starts a new one."""
    inject(DR_FAULT="start")
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_list_generator(sample_list_reader(80, 5))
    with dr:
        with pytest.raises(PipelineError) as info:
            list(dr.distill_reader()())
        text = str(info.value)
        assert "LockedError" in text and "the pool cannot be mapped" in text, text
        assert "Traceback" in text and "failing_from_fd" in text, text
        check_epoch(list(dr.distill_reader()()), 80, 8)


def test_a_crash_in_the_teacher_client_reaches_the_loop_with_its_traceback(write_config, tag_teachers, inject):
    """The teacher client raises an exception that cannot be pickled in the middle of an epoch: the
    loop gets its type, message and traceback text; the next epoch (a new pipeline process) is whole."""
    inject(DR_FAULT="infer")
    dr = DistillReader(
        write_config(tag_teachers, extra="shared_memory = off"), 8, 3, capacity=4, occupied_capacity=1, copy=True
    )
    dr.set_sample_list_generator(sample_list_reader(80, 5))
    with dr:
        with pytest.raises(PipelineError) as info:
            list(dr.distill_reader()())
        text = str(info.value)
        assert "LockedError" in text and "the teacher client library failed" in text, text
        assert "Traceback" in text and "failing_infer" in text, text
        check_epoch(list(dr.distill_reader()()), 80, 8)
        check_epoch(list(dr.distill_reader()()), 80, 8)


@pytest.mark.timeout(60)
def test_a_crash_of_the_outbox_thread_reaches_the_loop_and_the_next_epoch_works(write_config, tag_teachers, inject):
    """The pipeline process's thread that writes to the training process crashes: the loop gets an
    error (the process ends), rather than waiting for good for a slot that is done; the next epoch
    starts a new pipeline process and is whole."""
    inject(DR_FAULT="outbox")
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_list_generator(sample_list_reader(80, 5))
    with dr:
        with pytest.raises(PipelineError, match=r"the pipeline process died \(exit code 1\)"):
            list(dr.distill_reader()())
        check_epoch(list(dr.distill_reader()()), 80, 8)


# -- a seal that fails --------------------------------------------------------------------------
def test_a_failed_seal_fails_the_epoch_and_frees_its_slot(write_config, tag_teachers, monkeypatch):
    """Sealing a slot fails once (injected into the feeder's sink): the epoch fails with that error,
    every slot is free again, and the next epochs use them all."""
    original = SlotOutbox.sealed
    calls = []

    def failing_sealed(self, slot, rows):
        calls.append(slot)
        if len(calls) == 3:
            raise PipelineError("injected: sealing the slot failed")
        return original(self, slot, rows)

    monkeypatch.setattr(SlotOutbox, "sealed", failing_sealed)
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=0, copy=True)
    dr.set_sample_list_generator(sample_list_reader(160, 5))
    with dr:
        with pytest.raises(DistillReaderError, match="injected: sealing the slot failed"):
            list(dr.distill_reader()())
        pipeline = dr._holder.pipeline
        assert pipeline.alive  # nothing was wrong with the pipeline process: it is kept
        wait_for(lambda: _places(dr)["free"] == 4, 10, "every slot free after the failed epoch")
        assert _places(dr) == {"free": 4, "filling": 0, "queued": 0, "held": 0}
        for _ in range(2):
            check_epoch(list(dr.distill_reader()()), 160, 8)
            assert _places(dr) == {"free": 4, "filling": 0, "queued": 0, "held": 0}
        assert dr._holder.pipeline is pipeline


# -- a cancel that cannot be sent ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "broken"),
    [
        # The channel's bounded send timed out (the pipeline process stopped reading): internal,
        # so the user sees a PipelineError that says what was lost.
        (
            ChannelTimeout("could not send Cancel: the pipe stayed full"),
            "lost the pipeline process while cancelling an epoch: could not send Cancel: the pipe stayed full",
        ),
        # Anything else (a bug, an interrupt) leaves the slots in doubt; it reaches the caller.
        (RuntimeError("injected: the cancel failed"), "an epoch was interrupted while it was being cancelled"),
    ],
)
def test_a_cancel_that_cannot_be_sent_loses_the_pipeline_as_a_pipeline_error(
    write_config, tag_teachers, monkeypatch, error, broken
):
    """An early end of an epoch whose ``Cancel`` cannot be sent: the pipeline is lost with a
    PipelineError (never the internal ChannelTimeout), and the next epoch runs whole on a new
    pipeline process."""
    original = Sender.send
    stuck = [True]

    def stuck_cancel(self, message, timeout=None):
        if isinstance(message, Cancel) and stuck[0]:
            raise error
        return original(self, message, timeout)

    monkeypatch.setattr(Sender, "send", stuck_cancel)
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_list_generator(sample_list_reader(80, 5))
    with dr:
        batches = dr.distill_reader()()
        next(batches), next(batches)
        if isinstance(error, ChannelTimeout):
            batches.close()  # abort sends Cancel
        else:
            with pytest.raises(RuntimeError, match="injected: the cancel failed"):
                batches.close()
        pipeline = dr._holder.pipeline
        assert not pipeline.alive
        assert type(pipeline.broken) is PipelineError
        assert str(pipeline.broken) == broken
        stuck[0] = False
        check_epoch(list(dr.distill_reader()()), 80, 8)
        assert dr._holder.pipeline is not pipeline
