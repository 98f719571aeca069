"""An epoch's slots from the feeder to the consumer, without processes: in order, each once, every
slot accounted for however the epoch ends."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import wait_for

from distill_reader.errors import DistillReaderError, PipelineError
from distill_reader.reader.epoch import END, Epoch, Failed, Sealed
from distill_reader.reader.interrupts import deferred_interrupt
from distill_reader.reader.slots import SlotLedger
from distill_reader.reader.stats import StatsTracker

CAPACITY = 4


def make_epoch(keep: int = 1, copy: bool = False) -> tuple[Epoch, SlotLedger, list[list[np.ndarray]]]:
    ledger = SlotLedger(CAPACITY, 0.01)
    slots = [[np.full((8, 2), s, np.float32)] for s in range(CAPACITY)]
    epoch = Epoch(
        0, ledger, slots, (), StatsTracker(60.0), request_stats=lambda wait: None, flush_logs=lambda t: None,
        keep=keep, copy=copy,
    )  # fmt: skip
    return epoch, ledger, slots


def seal(epoch: Epoch, ledger: SlotLedger, sequence: int, rows: int = 8) -> int:
    slot = ledger.acquire(threading.Event())
    assert slot is not None
    epoch.put(Sealed(sequence, slot, rows, 0.0))
    return slot


def waiting_for_teachers(epoch: Epoch) -> None:
    """Return once a consumer of ``epoch`` waits for a slot to be done (its statistics count the wait)."""
    stats = epoch._stats
    wait_for(lambda: stats._waiting_since is not None, 5, "the consumer does not wait for the teachers")


def test_slots_done_out_of_order_are_taken_in_order_and_freed_after_keep_more():
    epoch, ledger, _ = make_epoch(keep=1)
    first, second, third = (seal(epoch, ledger, i) for i in range(3))
    epoch.slot_done(third, 0.1)
    epoch.slot_done(second, 0.1)
    taken: list[float] = []

    def consume() -> None:
        batch = epoch.next_batch()
        assert batch is not None
        taken.append(float(batch[0][0, 0]))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    waiting_for_teachers(epoch)
    assert not taken, "a later slot that is done must not overtake the first"
    epoch.slot_done(first, 0.1)
    consumer.join(5)
    for _ in range(2):
        consume()
    assert taken == [first, second, third]
    assert ledger.counts() == {"free": 2, "filling": 0, "queued": 0, "held": 2}  # keep=1, plus the last
    epoch.put(END)
    assert epoch.next_batch() is None
    assert ledger.counts()["held"] == 1  # asking for the next batch freed one more


def test_a_copy_frees_its_slot_at_once():
    epoch, ledger, _ = make_epoch(copy=True)
    epoch.slot_done(seal(epoch, ledger, 0), 0.0)
    batch = epoch.next_batch()
    assert batch is not None and float(batch[0][0, 0]) == 0.0
    assert ledger.counts()["free"] == CAPACITY


def test_reclaim_frees_every_slot_not_yielded_and_a_late_feeders_slot():
    epoch, ledger, _ = make_epoch()
    seal(epoch, ledger, 0)
    seal(epoch, ledger, 1)
    late = ledger.acquire(threading.Event())  # still being filled when the epoch is reclaimed
    assert late is not None
    epoch.cancel_acknowledged()
    epoch.wait_cancelled(1.0)
    epoch.reclaim()
    assert ledger.counts() == {"free": 3, "filling": 1, "queued": 0, "held": 0}
    epoch.put(Sealed(2, late, 8, 0.0))
    assert ledger.counts()["free"] == CAPACITY


@pytest.mark.parametrize("ending", ["lose", "close", "stop", "failed"])
def test_every_ending_wakes_a_waiting_consumer_at_once(ending):
    epoch, ledger, _ = make_epoch()
    seal(epoch, ledger, 0)  # never done
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            epoch.next_batch()
        except DistillReaderError as exc:
            errors.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    waiting_for_teachers(epoch)
    started = time.monotonic()
    if ending == "lose":
        epoch.lose(PipelineError("the pipeline process died"))
    elif ending == "close":
        epoch.close()
    elif ending == "stop":
        epoch.stop("a newer epoch started")
    else:
        epoch.failed(PipelineError("no teacher answered"))
    consumer.join(5)
    assert errors and time.monotonic() - started < 0.5  # not a 1 s wait slice
    epoch.reclaim()  # the slot it waited for is still the epoch's: freed with the others
    assert ledger.counts()["free"] == CAPACITY


def test_the_feeders_failure_comes_after_the_slots_sealed_before_it():
    epoch, ledger, _ = make_epoch(copy=True)
    slot = seal(epoch, ledger, 0)
    epoch.put(Failed(PipelineError("the reader function raised")))
    epoch.slot_done(slot, 0.0)
    assert epoch.next_batch() is not None
    with pytest.raises(PipelineError, match="reader function raised"):
        epoch.next_batch()


def test_a_cancel_not_acknowledged_in_time_raises():
    epoch, _, _ = make_epoch()
    with pytest.raises(PipelineError, match="did not acknowledge"):
        epoch.wait_cancelled(0.05)


def test_the_wait_for_teachers_counts_while_it_lasts_and_a_batch_done_already_adds_none():
    """``stats()`` from another thread during a wait sees it grow; once the slot is done it is
    counted once; a batch whose slot was done before it was asked for adds no wait."""
    epoch, ledger, _ = make_epoch(copy=True)
    stats = epoch._stats
    slot = seal(epoch, ledger, 0)
    consumer = threading.Thread(target=epoch.next_batch, daemon=True)
    consumer.start()
    waiting_for_teachers(epoch)
    during = wait_for(lambda: stats.snapshot().teacher_wait_seconds, 5, "the wait does not show while it lasts")
    epoch.slot_done(slot, 0.0)
    consumer.join(5)
    after = stats.snapshot().teacher_wait_seconds
    assert not consumer.is_alive() and after >= during and stats._waiting_since is None
    epoch.slot_done(seal(epoch, ledger, 1), 0.0)
    assert epoch.next_batch() is not None
    assert stats.snapshot().teacher_wait_seconds == after and stats.batches == 2


def test_ctrl_c_is_held_while_slots_change_hands_then_delivered():
    """A SIGINT inside :func:`deferred_interrupt` is not raised there (it would lose a slot) but
    just after it; the previous handler is back."""
    assert threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    finished_block = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here: held, not raised
            finished_block = True
        for _ in range(500):  # (interrupt_main() wakes no sleep: it is raised between two of them)
            time.sleep(0.01)
    assert finished_block
    assert signal.getsignal(signal.SIGINT) is previous
