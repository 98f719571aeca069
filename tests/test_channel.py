"""The channel to the pipeline process (real pipes), and the slot bookkeeping around it."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection

import pytest
from conftest import child_pids
from reader_models import make_sample
from test_reader import check_epoch, sample_list_reader

from distill_reader import DistillReader, PipelineError, TeacherError
from distill_reader.errors import ChannelTimeout
from distill_reader.reader.channel import (
    Cancel,
    Cancelled,
    EpochError,
    Fatal,
    LogMessage,
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
from distill_reader.teacher.stats import TeacherStats

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pipe():
    """A Sender and a Receiver on the two ends of one real pipe."""
    r, w = os.pipe()
    sender = Sender(Connection(w, readable=False))
    receiver = Receiver(Connection(r, writable=False))
    yield sender, receiver
    sender.close(1.0)
    receiver.close()


def _log_message() -> LogMessage:
    try:
        raise ValueError("bad value")
    except ValueError:
        record = logging.getLogger("distill_reader.pipeline").makeRecord(
            "distill_reader.pipeline", logging.WARNING, __file__, 7, "teacher %s: %d left", ("a:1", 3), sys.exc_info()
        )
    return LogMessage.from_record(record)


def test_every_message_crosses_a_pipe_intact(pipe):
    sender, receiver = pipe
    stats = [TeacherStats("127.0.0.1:1", True, 2, 10, 1, 1.5, 2.5, None)]
    messages = [
        Work(3, 1234, 2, 8, 4),
        Seal(3, 2, 31, 5),
        Cancel(3),
        StatsRequest(),
        Stop(),
        Ready(),
        SlotDone(3, 2, 0.25),
        EpochError(3, TeacherError("the teacher model is broken")),
        Cancelled(3),
        Fatal(ValueError("x")),
        StatsReport(stats, 5),
        _log_message(),
    ]
    for message in messages:
        sender.send(message)
    for sent in messages:
        got = receiver.recv()
        assert type(got) is type(sent)
        if isinstance(sent, (EpochError, Fatal)):
            assert type(got.error) is type(sent.error) and str(got.error) == str(sent.error)
        else:
            assert got == sent


def test_a_log_message_becomes_a_record_like_the_original():
    record = _log_message().to_record()
    assert (record.name, record.levelno, record.levelname) == ("distill_reader.pipeline", logging.WARNING, "WARNING")
    assert record.getMessage() == "teacher a:1: 3 left"
    assert record.exc_text.startswith("Traceback") and "ValueError: bad value" in record.exc_text
    assert record.lineno == 7 and record.filename == "test_channel.py"
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)
    assert "WARNING distill_reader.pipeline: teacher a:1: 3 left\nTraceback" in text


def test_sends_from_many_threads_arrive_whole_and_in_order_per_thread(pipe):
    sender, receiver = pipe
    threads, per_thread = 8, 2000
    got: list[Work] = []
    reader = threading.Thread(target=lambda: got.extend(receiver.recv() for _ in range(threads * per_thread)))
    reader.start()
    writers = [
        threading.Thread(target=lambda t=t: [sender.send(Work(t, i, 0, 0, 1)) for i in range(per_thread)])
        for t in range(threads)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    reader.join(30)
    assert len(got) == threads * per_thread
    for t in range(threads):
        assert [w.sequence for w in got if w.epoch == t] == list(range(per_thread))


def test_a_bounded_send_gives_up_when_nobody_reads(pipe):
    sender, _receiver = pipe
    with pytest.raises(ChannelTimeout, match="the pipe stayed full"):
        for i in range(10**6):  # fills the pipe: nobody reads
            sender.send(Work(0, i, 0, 0, 1), timeout=0.2)


def test_a_closed_sender_raises_oserror(pipe):
    sender, _receiver = pipe
    sender.close(1.0)
    for timeout in (None, 1.0):
        with pytest.raises(OSError):
            sender.send(Stop(), timeout)


def test_the_receiver_reads_end_of_file_once_the_sender_is_closed(pipe):
    sender, receiver = pipe
    sender.send(Ready())
    sender.close(1.0)
    assert receiver.recv() == Ready()
    with pytest.raises(EOFError):
        receiver.recv()


def test_failed_epochs_do_not_lose_slots(write_config, teachers):
    """An epoch failing while the training loop waits for a slot's outputs gives that slot back: the
    reader used to lose one slot per failed epoch and hang once none was left."""
    endpoint = teachers.start("reader_models:broken")
    dr = DistillReader(write_config([endpoint]), 4, 2, capacity=2, occupied_capacity=0, max_attempts=1)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(40)))
    with dr:
        for _ in range(6):
            with pytest.raises(TeacherError, match="the teacher model is broken"):
                list(dr.distill_reader()())
            assert _places(dr, capacity=2) == {"free": 2, "filling": 0, "queued": 0, "held": 0}


def _places(dr: DistillReader, capacity: int = 4) -> dict[str, int]:
    """How many slots are in each place, once the ledger's queues are checked against each slot's
    place: the free queue holds exactly the free slots and the held queue exactly the held ones,
    each once (a slot freed twice, or marked free but never queued, is lost or handed out twice)."""
    ledger = dr._holder.pipeline.ledger
    with ledger._cond:
        place, free, held = list(ledger._place), list(ledger._free), list(ledger._held)
    assert len(place) == ledger.capacity == capacity, place
    where = {p: [slot for slot, at in enumerate(place) if at == p] for p in ("free", "held")}
    assert sorted(free) == where["free"], f"free queue {free}, places {place}"
    assert sorted(held) == where["held"], f"held queue {held}, places {place}"
    counts = ledger.counts()
    assert counts == {p: place.count(p) for p in counts} and sum(counts.values()) == capacity, (counts, place)
    return counts


class _Stop(Exception):
    pass


def test_the_slot_ledger_balances_after_every_kind_of_epoch_end(write_config, tag_teachers):
    """Whatever ends an epoch, every slot is free again except the ones the loop still holds."""
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(80)))
    reader = dr.distill_reader()
    with dr:
        check_epoch([[a.copy() for a in b] for b in reader()], 80, 8)
        assert _places(dr) == {"free": 3, "filling": 0, "queued": 0, "held": 1}  # the last batch's views
        # Ended early, the loop still holds the batch it has and the one before (freed once it asks
        # for one more batch: the next epoch's first).
        for _ in zip(range(3), reader()):
            pass  # break after 3 batches
        assert _places(dr) == {"free": 2, "filling": 0, "queued": 0, "held": 2}
        with pytest.raises(_Stop):
            for _ in reader():
                raise _Stop
        assert _places(dr) == {"free": 2, "filling": 0, "queued": 0, "held": 2}
        abandoned = reader()
        next(abandoned)
        check_epoch([[a.copy() for a in b] for b in reader()], 80, 8)  # stops the abandoned one
        assert _places(dr) == {"free": 3, "filling": 0, "queued": 0, "held": 1}
        # A new epoch's first batch counts as taking one more: the held slot is freed then.
        next(iter(reader()))
    dr.copy = True
    with dr:
        check_epoch(list(reader()), 80, 8)
        assert _places(dr) == {"free": 4, "filling": 0, "queued": 0, "held": 0}


def test_a_killed_pipeline_process_fails_the_epoch_and_is_replaced(write_config, tag_teachers, caplog):
    before = child_pids()
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_list_generator(sample_list_reader(160, 5))
    with dr, caplog.at_level(logging.WARNING, logger="distill_reader"):
        batches = dr.distill_reader()()
        next(batches)  # the pool holds 3 more batches at most: the epoch cannot end without the process
        (pipeline,) = child_pids() - before
        os.kill(pipeline, signal.SIGKILL)
        with pytest.raises(PipelineError, match="pipeline process"):
            for _ in batches:
                pass
        check_epoch(list(dr.distill_reader()()), 160, 8)
        (replacement,) = child_pids() - before
        assert replacement != pipeline
    assert any("the pipeline process stopped" in r.getMessage() for r in caplog.records)
