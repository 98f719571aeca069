"""The reader's shared-memory transport against a real NVIDIA Triton (PyTriton) on the same host:
Triton maps the reader's pool, reads each d_batch from it and writes the answers into the
transport's output ring. Skipped without the PyTriton environment (``scripts/external-teachers.sh``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import shm_files
from external_support import ExternalServer, require_venv, session_pids, start_triton_tag
from test_reader import check_epoch, sample_list_reader
from test_shm_transport import regions

from distill_reader import DistillReader

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalServer]:
    python = require_venv("pytriton-venv", "pytriton.triton")
    started = start_triton_tag(python, tmp_path_factory.mktemp("triton-shm"))
    try:
        started.wait_ready(90)
        yield started
    finally:
        started.stop()
        assert not session_pids(started.process.pid), f"{started.name} left processes behind"


def test_the_reader_shares_its_pool_with_triton(triton: ExternalServer, write_config) -> None:
    """``shared_memory = on`` (a teacher that cannot map the pool would be quarantined): every
    sample once, in order, with the exact model's output; no name in /dev/shm; unregistered on close."""
    before = shm_files()
    dr = DistillReader(write_config([triton.endpoint], "shared_memory = on"), 16, 8, capacity=4, occupied_capacity=1)
    dr.set_sample_list_generator(sample_list_reader(200, 8))
    with dr:
        batches = [[a.copy() for a in batch] for batch in dr.distill_reader()()]
        check_epoch(batches, 200, 16)
        registered = regions(triton.endpoint)  # the pool, and the transport's output ring
        assert len(registered) == 2 and dr._holder.pipeline.layout.nbytes in registered.values()
        assert shm_files() == before
    assert not regions(triton.endpoint)
