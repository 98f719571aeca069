"""The reader says so (once, at WARNING, and in stats()) when its pool is what limits throughput,
and not when the teachers or the training loop are the bound. Four real teachers taking 20 ms per
request; the cases are far apart so that a loaded machine cannot blur them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from conftest import TeacherProcesses
from reader_models import make_sample
from test_reader import check_epoch

from distill_reader import DistillReader

pytestmark = pytest.mark.timeout(180)

POOL_WARNING = "the pool limits throughput"
N = 400  # samples per epoch: 50 batches of 8, at least 20 ms each


@pytest.fixture(scope="module")
def slow_teachers() -> Iterator[list[str]]:
    fleet = TeacherProcesses()
    try:
        yield [fleet.start("reader_models:slow_tag") for _ in range(4)]
    finally:
        fleet.stop_all()


def _reader(config, capacity: int, occupied: int) -> DistillReader:
    # max_in_flight defaults to 128 rows / d_batch_size 4 = 32 requests per teacher: 128 in all.
    dr = DistillReader(config, 8, 4, capacity=capacity, occupied_capacity=occupied, copy=True)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(N)))
    return dr


def _pool_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and POOL_WARNING in r.getMessage()]


def test_a_pool_too_small_for_the_teachers_is_reported_once(write_config, slow_teachers, caplog):
    """Pool 3/1: at most 2 batches (4 requests) at 4 teachers that could take 128 requests."""
    dr = _reader(write_config(slow_teachers), capacity=3, occupied=1)
    with dr, caplog.at_level(logging.WARNING, logger="distill_reader"):
        for _ in range(20):  # a few epochs at most; the first second of streaming should do
            check_epoch(list(dr.distill_reader()()), N, 8)
            if dr.stats().pool_limited:
                break
        check_epoch(list(dr.distill_reader()()), N, 8)  # and it is not said again
        stats = dr.stats()
    assert stats.pool_limited
    assert stats.suggested_capacity == 1 + 1 + 128 // 2  # occupied + the batch of a step + 128 requests of 2 per slot
    warnings = _pool_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "the 4 teacher(s) could take 128" in warnings[0] and "capacity=66 would feed them" in warnings[0]
    assert "capacity=66" in stats.summary()


def test_a_pool_that_can_feed_the_teachers_is_not_reported(write_config, slow_teachers, caplog):
    """Pool 70/1: 69 batches (138 requests) can be at the teachers, more than they take: they are
    the bound."""
    dr = _reader(write_config(slow_teachers), capacity=70, occupied=1)
    with dr, caplog.at_level(logging.WARNING, logger="distill_reader"):
        for _ in range(3):
            check_epoch(list(dr.distill_reader()()), N, 8)
        stats = dr.stats()
    assert not stats.pool_limited and stats.suggested_capacity is None
    assert not _pool_warnings(caplog)


def test_a_slow_training_loop_is_not_blamed_on_the_pool(write_config, slow_teachers, caplog):
    """Pool 3/1 again, but the training step takes 500 ms, some 25 times what the teachers need
    for a batch: the loop hardly waits, it is the bound. (The pool is suspected when the loop waits
    for teachers a quarter of a 1 s window: here a batch's round trip would have to take over half
    a second, far from what even a loaded machine makes of 20 ms.)"""
    dr = _reader(write_config(slow_teachers), capacity=3, occupied=1)
    with dr, caplog.at_level(logging.WARNING, logger="distill_reader"):
        for step, _batch in enumerate(dr.distill_reader()()):
            time.sleep(0.5)
            if step == 11:  # 6 s: several windows in which the pool would have been judged
                break
        stats = dr.stats()
    assert stats.batches == 12
    assert not stats.pool_limited
    assert not _pool_warnings(caplog)


def test_with_teacher_groups_the_group_taking_the_most_requests_sizes_the_pool(tmp_path, slow_teachers, caplog):
    """Every d_batch is one request to each group: group a (3 teachers, 96 requests) sizes the pool,
    not group b (1 teacher, 32), nor the 4 teachers together (128)."""
    from test_groups import TWO_GROUPS
    from test_groups import check_epoch as check_groups_epoch

    labelers = TeacherProcesses()
    try:
        b = [labelers.start("reader_models:slow_label")]
        config = tmp_path / "groups.conf"
        config.write_text(TWO_GROUPS.format(a=slow_teachers[:3], b=b))
        dr = _reader(config, capacity=3, occupied=1)
        with dr, caplog.at_level(logging.WARNING, logger="distill_reader"):
            for _ in range(20):
                check_groups_epoch(list(dr.distill_reader()()), N, 8)
                if dr.stats().pool_limited:
                    break
            stats = dr.stats()
    finally:
        labelers.stop_all()
    assert stats.pool_limited
    assert stats.suggested_capacity == 1 + 1 + 96 // 2
    warnings = _pool_warnings(caplog)
    assert len(warnings) == 1 and "the 3 teacher(s) could take 96" in warnings[0], warnings
