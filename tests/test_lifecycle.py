"""A training script interrupted by Ctrl-C or SIGTERM leaves no process and no shared memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TESTS_DIR, child_pids, shm_files

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from conftest import child_pids
from reader_models import make_sample
from distill_reader import DistillReader

dr = DistillReader({config!r}, 8, 2, capacity=4, occupied_capacity=1)
dr.set_sample_generator(lambda: (make_sample(i) for i in range(10_000)))
reader = dr.distill_reader()
announced = False
while True:
    for batch in reader():
        if not announced:
            print("PIPELINE", *child_pids(), flush=True)
            announced = True
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_everything_within_two_seconds(tmp_path, write_config, tag_teachers, sig):
    before_shm = shm_files()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR), config=str(write_config(tag_teachers))))
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("PIPELINE"), process.stderr.read()
        pipeline_pids = [int(p) for p in line.split()[1:]]
        assert len(pipeline_pids) == 1
        time.sleep(0.5)  # let it stream
        os.kill(process.pid, sig)
        start = time.monotonic()
        process.wait(10)
        exited_after = time.monotonic() - start
        while _alive(pipeline_pids[0]) and time.monotonic() - start < 10:
            time.sleep(0.02)
        pipeline_gone_after = time.monotonic() - start
    finally:
        process.kill()
        process.wait()
    assert exited_after < 2.0
    assert pipeline_gone_after < 2.0
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in process.stderr.read()
    assert shm_files() == before_shm
    assert not child_pids(process.pid)
