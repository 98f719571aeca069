"""The scheduler inside the pipeline process: a crash of ours is reported, never silently lost."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from reader_models import make_sample, tag

from distill_reader.config import load_config
from distill_reader.teacher.scheduler import Scheduler, SchedulerOptions, TeacherRef, WorkItem
from distill_reader.teacher.transport import InProcessTransport

pytestmark = pytest.mark.timeout(30)


def run_scheduler(config, handler, feed, fetch, items, until) -> tuple[list, list, list[dict]]:
    """Run a scheduler with one in-process teacher ``handler`` on ``items`` until ``until(done)``
    (or 5 s); returns the items done, the epoch errors and the crashes reported to the loop."""
    done, errors = [], []

    async def main() -> list[dict]:
        crashes: list[dict] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: crashes.append(context))
        scheduler = Scheduler(
            config,
            feed,
            fetch,
            SchedulerOptions(max_in_flight=1),
            done.append,
            lambda epoch, exc: errors.append(exc),
            lambda message: None,
            transports=lambda ref: InProcessTransport(ref.endpoint, handler),
        )
        scheduler.set_teachers([TeacherRef("in-process")])
        for item in items:
            scheduler.submit(item)
        for _ in range(100):
            if crashes or until(done):
                break
            await asyncio.sleep(0.05)
        await scheduler.close()
        return crashes

    return done, errors, asyncio.run(main())


def test_every_d_batch_gets_its_own_rows_answer(write_config):
    """The scheduler through the transport seam: each d_batch's outputs land in its own rows."""
    config = load_config(write_config(["127.0.0.1:1"]))
    feed = [[np.stack([make_sample(i)[0] for i in range(8)])]]
    fetch = [[np.zeros((8, 10), np.float32)]]
    items = [WorkItem(k, 2 * k, epoch=0, slot=0, count=2) for k in range(4)]

    def teacher(inputs, lengths):
        return tag({"img": inputs[0]})["prediction"][None]

    done, errors, crashes = run_scheduler(config, teacher, feed, fetch, items, lambda d: len(d) == 4)
    assert sorted(item.start for item in done) == [0, 2, 4, 6] and not errors and not crashes
    np.testing.assert_array_equal(fetch[0][0], tag({"img": feed[0][0]})["prediction"])


def test_a_crashed_worker_is_reported_to_the_loop(write_config):
    def broken(inputs, lengths):
        raise ValueError("a bug in the request path")

    config = load_config(write_config(["127.0.0.1:1"]))
    feed = [[np.stack([make_sample(i)[0] for i in range(4)])]]
    fetch = [[np.zeros((4, 10), np.float32)]]
    done, errors, crashes = run_scheduler(
        config, broken, feed, fetch, [WorkItem(0, 0, epoch=0, slot=0, count=4)], lambda d: False
    )
    assert not done and not errors
    assert len(crashes) == 1 and crashes[0]["distill_reader"]
    assert isinstance(crashes[0]["exception"], ValueError)
