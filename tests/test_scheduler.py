"""The scheduler inside the pipeline process: a crash of ours is reported, never silently lost."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from reader_models import make_sample, tag

from distill_reader.config import load_config
from distill_reader.serving.backends.python import PythonBackend
from distill_reader.serving.server import running_server
from distill_reader.teacher.client import TeacherClient
from distill_reader.teacher.scheduler import Scheduler, SchedulerOptions, TeacherRef, WorkItem

pytestmark = pytest.mark.timeout(30)


def test_a_crashed_worker_is_reported_to_the_loop(write_config, monkeypatch):
    async def broken_infer(self, inputs, lengths=()):
        raise ValueError("a bug in the request path")

    with running_server(PythonBackend(tag)) as endpoint:
        config = load_config(write_config([endpoint]))
        monkeypatch.setattr(TeacherClient, "infer", broken_infer)
        feed = [[np.stack([make_sample(i)[0] for i in range(4)])]]
        fetch = [[np.zeros((4, 10), np.float32)]]
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
            )
            scheduler.set_teachers([TeacherRef(endpoint)])
            scheduler.submit(WorkItem(0, 0, epoch=0, slot=0, count=4))
            for _ in range(100):
                if crashes:
                    break
                await asyncio.sleep(0.05)
            await scheduler.close()
            return crashes

        crashes = asyncio.run(main())
    assert not done and not errors
    assert len(crashes) == 1 and crashes[0]["distill_reader"]
    assert isinstance(crashes[0]["exception"], ValueError)
