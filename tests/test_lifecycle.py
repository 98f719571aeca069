"""A training script interrupted by Ctrl-C or SIGTERM leaves no process and no shared memory."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from chaos_support import alive
from conftest import TESTS_DIR, reader_shm, start_script

pytestmark = pytest.mark.timeout(120)

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


#: Generous bounds for a shared, loaded machine: these tests check that everything stops, not how
#: fast (that is a benchmark figure; the tests print it).
STOP_BOUND_S = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = STOP_BOUND_S) -> float:
    """Wait until ``condition()``; fail with ``what`` if it is still false after ``timeout`` seconds.
    Returns the seconds waited."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - start


def children(pid: int) -> set[int]:
    """The children of ``pid``: those of each of its threads (``/proc/<pid>/task/<tid>/children``),
    nothing once it is gone."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.update(int(child) for child in fh.read().split())
        except OSError:
            continue
    return found


def watch_children(pid: int, seconds: float, seen: set[int]) -> None:
    """Sleep ``seconds``, adding the children of ``pid`` to ``seen`` every 20 ms meanwhile. (A
    pipeline process names nothing in its first 20 ms: it starts Python and reaches its teachers
    first.)"""
    deadline = time.monotonic() + seconds
    while True:
        seen |= children(pid)
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.02, left))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_everything(tmp_path, write_config, tag_teachers, sig):
    """The script exits by the signal (Ctrl-C as a KeyboardInterrupt), its pipeline process goes with
    it, and nothing is left in /dev/shm."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR), config=str(write_config(tag_teachers))))
    process = start_script(script)
    try:
        line = process.stdout.readline()
        assert line.startswith("PIPELINE"), process.stderr.read()
        pipeline_pids = [int(p) for p in line.split()[1:]]
        assert len(pipeline_pids) == 1
        time.sleep(0.5)  # let it stream
        os.kill(process.pid, sig)
        exited = wait_until(lambda: process.poll() is not None, f"the training script did not exit on {sig.name}")
        gone = wait_until(lambda: not alive(pipeline_pids[0]), "the pipeline process did not stop")
        print(f"\n{sig.name}: exited after {exited:.2f} s, the pipeline process gone after {exited + gone:.2f} s")
    finally:
        process.kill()
        process.wait()
    # Python ends an uncaught KeyboardInterrupt by re-raising SIGINT; SIGTERM has no handler.
    assert process.returncode == -sig
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in process.stderr.read()
    assert not reader_shm({process.pid, *pipeline_pids})
