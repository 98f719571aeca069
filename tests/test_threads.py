"""The reader used from several threads: ``stats()`` from a monitoring thread, ``close()`` from
another thread, an epoch started while another thread iterates one. Real teachers on loopback."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import pytest
from conftest import child_pids, wait_for
from reader_models import make_sample
from test_reader import check_epoch, sample_list_reader

from distill_reader import DistillReader, DistillReaderError

pytestmark = pytest.mark.timeout(120)


class Monitor:
    """A thread calling ``dr.stats()`` every ``pause`` seconds (0: a tight loop) until stopped."""

    def __init__(self, dr: DistillReader, pause: float) -> None:
        self.dr = dr
        self.pause = pause
        self.calls = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dr.stats()
            except BaseException as exc:  # noqa: BLE001 - the test reports whatever escaped
                self.errors.append(exc)
                return
            self.calls += 1
            if self.pause:
                time.sleep(self.pause)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "stats() hangs"


@pytest.mark.parametrize("pause", [0.0, 0.003])
def test_stats_from_a_monitoring_thread_while_the_loop_iterates(write_config, tag_teachers, caplog, pause):
    """Every sample's teacher output is right, exactly once, in order; stats() never raises, and the
    pipeline process is never taken for dead."""
    n = 400
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1)
    dr.set_sample_list_generator(sample_list_reader(n, 5))
    with caplog.at_level(logging.WARNING, logger="distill_reader"), dr, Monitor(dr, pause) as monitor:
        for _ in range(6):
            check_epoch([[a.copy() for a in b] for b in dr.distill_reader()()], n, 8)
    assert not monitor.errors, monitor.errors
    assert monitor.calls > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # (The pool of 4 does limit these teachers, and says so: that warning is not the point here.)
    assert not [message for message in warnings if "the pool limits throughput" not in message]
    assert dr.stats().samples == 6 * n


def _blocking_reader(
    n: int,
    block_after: int,
    release: threading.Event,
    first_call_only: bool = False,
    blocked: threading.Event | None = None,
):
    """Yields samples 0..n-1, but waits for ``release`` after ``block_after`` of them (on the first
    call only, with ``first_call_only``), setting ``blocked`` then."""
    calls = []

    def reader():
        calls.append(1)
        for i in range(n):
            if i == block_after and (len(calls) == 1 or not first_call_only):
                if blocked is not None:
                    blocked.set()
                release.wait(60)
            yield make_sample(i)

    return reader


def _waiting_in_the_reader(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in a wait (``threading``'s: a condition, an event, a queue)
    that the reader's code called."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None or (frame.f_code.co_filename, frame.f_code.co_name) != (threading.__file__, "wait"):
        return False
    while frame is not None:
        if f"{os.sep}distill_reader{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_close_from_another_thread_while_the_loop_waits_for_the_reader(write_config, tag_teachers):
    """The loop waits for the user's reader; close() from another thread makes that wait raise at
    once; the reader then runs a later epoch whole."""
    release, blocked = threading.Event(), threading.Event()
    dr = DistillReader(write_config(tag_teachers), 4, 2, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_generator(_blocking_reader(40, 10, release, first_call_only=True, blocked=blocked))
    before = child_pids()
    batches = dr.distill_reader()()
    first = [next(batches), next(batches)]  # 8 samples; the feeder then waits in the reader
    check_epoch(first, 8, 4)
    loop, closed = threading.current_thread(), []

    def close_once_the_loop_waits() -> None:
        try:  # the feeder is stuck in the reader and the loop waits for the batch it cannot fill
            wait_for(lambda: blocked.is_set() and _waiting_in_the_reader(loop), 30, "the loop waits", every=0.01)
            closed.append("while the loop waited")
        finally:
            dr.close()

    closer = threading.Thread(target=close_once_the_loop_waits)
    closer.start()
    with pytest.raises(DistillReaderError, match="the reader was closed"):
        next(batches)
    closer.join(30)
    assert not closer.is_alive()
    assert closed == ["while the loop waited"]
    assert child_pids() == before  # close() stopped the pipeline process
    release.set()
    with dr:
        check_epoch(list(dr.distill_reader()()), 40, 4)


def test_close_from_another_thread_while_the_loop_waits_for_a_teacher(write_config, teachers):
    """The loop waits for a teacher that takes minutes; close() from another thread makes that wait
    raise at once (the test would time out otherwise)."""
    endpoint = teachers.start("reader_models:slow_tag", env={"SLOW_TAG_SECONDS": "1000"})
    dr = DistillReader(write_config([endpoint]), 4, 2, capacity=3, occupied_capacity=0)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(40)))

    closed = []

    def close_once_a_request_is_in_flight() -> None:
        try:
            wait_for(lambda: any(t.in_flight for t in dr.stats().teachers), 60, "a request in flight", every=0.05)
            closed.append("with a request in flight")
        finally:
            dr.close()

    closer = threading.Thread(target=close_once_a_request_is_in_flight)
    closer.start()
    with pytest.raises(DistillReaderError, match="the reader was closed"):
        list(dr.distill_reader()())
    closer.join(30)
    assert not closer.is_alive()
    assert closed == ["with a request in flight"]


def test_a_new_epoch_from_another_thread_stops_the_one_being_iterated(write_config, tag_teachers, caplog):
    """One epoch runs at a time: an epoch started while another thread iterates one stops it; that
    thread's wait raises at once, and the new epoch is whole."""
    release = threading.Event()
    dr = DistillReader(write_config(tag_teachers), 4, 2, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_generator(_blocking_reader(40, 10, release, first_call_only=True))
    raised: list[BaseException] = []

    def first_epoch() -> None:
        batches = dr.distill_reader()()
        try:
            for _ in batches:  # waits in the reader after 8 samples
                pass
        except BaseException as exc:  # noqa: BLE001 - the test checks what it was
            raised.append(exc)

    with dr, caplog.at_level(logging.WARNING, logger="distill_reader"):
        thread = threading.Thread(target=first_epoch)
        thread.start()
        try:
            wait_for(
                lambda: dr.stats().batches >= 2 and _waiting_in_the_reader(thread),
                30,
                "the first epoch's thread waiting for its third batch",
                every=0.02,
            )
            second = list(dr.distill_reader()())  # from this thread, while the first still runs
        finally:
            release.set()
            thread.join(30)
        check_epoch(second, 40, 4)
        assert len(raised) == 1 and isinstance(raised[0], DistillReaderError), raised
        assert "a newer epoch of the same reader started" in str(raised[0])
        check_epoch(list(dr.distill_reader()()), 40, 4)


def test_a_forked_child_closing_the_reader_does_not_stop_the_pipeline(write_config, tag_teachers):
    """A forked copy of the training process (a DataLoader worker) that closes the reader, or runs
    its finalizer, leaves the parent's pipeline alone."""
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_list_generator(sample_list_reader(160, 5))
    with dr:
        batches = dr.distill_reader()()
        got = [next(batches) for _ in range(3)]
        pipeline = child_pids()
        pid = os.fork()
        if pid == 0:  # the child: close, run the finalizer's work, exit without the parent's atexit
            # A child that hangs must not outlive the test (alarms are not inherited: this is its own).
            # No gc.collect() here: it would finalize gRPC objects of this test process, whose
            # threads did not survive the fork, and hang.
            signal.alarm(20)
            code = 0
            try:
                dr.close()
                dr._holder.close()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got += list(batches)
        check_epoch(got, 160, 8)
        assert child_pids() == pipeline
        check_epoch(list(dr.distill_reader()()), 160, 8)
