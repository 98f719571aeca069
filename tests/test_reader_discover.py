"""DistillReader in discover mode: teachers found through a discovery server, changes pushed live."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_reader import check_epoch, sample_list_reader

from distill_reader import DistillReader
from distill_reader.discovery.client import fetch_status
from distill_reader.discovery.server import running_discovery

pytestmark = pytest.mark.timeout(90)

DISCOVER = "mode = discover\nhost = {host}\nservice_name = tagger\nrequire_num = {require_num}"


def discover_config(write_config, discovery: str, require_num: int):
    from conftest import SEED_CONFIG

    text = SEED_CONFIG.format(servers=[], extra="").replace(
        "mode = fixed\nservers = []", DISCOVER.format(host=discovery, require_num=require_num)
    )
    return write_config(text=text)


def assigned_teachers(discovery: str) -> list[list[str]]:
    """The teacher set of every student of the service, as discovery reports it."""
    status = asyncio.run(fetch_status(discovery, "tagger"))
    return [sorted(student.teachers) for service in status.services for student in service.students]


def wait_for_assignment(discovery: str, expected: list[list[str]], timeout: float = 20) -> None:
    """Wait (bounded) until discovery reports the ``expected`` teacher sets, then assert it: a teacher
    registers in the background after it is ready, and a dead one's lease lapses only after the TTL."""
    deadline = time.monotonic() + timeout
    while assigned_teachers(discovery) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assigned_teachers(discovery) == expected


def test_discover_mode_follows_teacher_changes_without_losing_a_sample(write_config, teachers):
    with running_discovery() as discovery:
        first = teachers.start("reader_models:slow_tag", "--register", discovery, "--service-name", "tagger")
        config = discover_config(write_config, discovery, require_num=2)
        dr = DistillReader(config, 16, 4, capacity=6, occupied_capacity=1, copy=True, teacher_timeout=30)
        n = 1200
        dr.set_sample_list_generator(sample_list_reader(n, 8))
        with dr:
            check_epoch(list(dr.distill_reader()()), n, 16)
            batches, second = [], None
            for step, batch in enumerate(dr.distill_reader()()):
                batches.append(batch)
                if step == 3:  # a second teacher joins mid-epoch...
                    second = teachers.start(
                        "reader_models:slow_tag", "--register", discovery, "--service-name", "tagger"
                    )
                    # It registers in the background after it is ready: wait until it is assigned.
                    wait_for_assignment(discovery, [sorted([first, second])])
                if step == 30:  # ...and the first one dies
                    teachers.kill(first)
            check_epoch(batches, n, 16)
            assert second is not None
            # The dead teacher's lease expires within a few seconds; the survivor serves alone.
            wait_for_assignment(discovery, [[second]])
            start = time.monotonic()
            check_epoch(list(dr.distill_reader()()), n, 16)
            assert time.monotonic() - start < 60
