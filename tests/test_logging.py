"""The reader's log lines, from both of its processes, in a training script's stderr: in one format
without any logging configuration, and once, in the user's format, with one."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import TESTS_DIR

from distill_reader.teacher.local import free_port

pytestmark = pytest.mark.timeout(120)

SCRIPT = """
import logging, sys, threading, time
sys.path.insert(0, {tests!r})
from reader_models import make_sample
{setup}
from distill_reader import DistillReader

dr = DistillReader({config!r}, 4, 2, capacity=4, occupied_capacity=1)
release = threading.Event()  # set once the epoch was aborted

def reader():
    yield from (make_sample(i) for i in range(8))
    # Still blocked when the loop's break makes abort wait 2 s for it, however slow the first batch
    # was: the training process warns that the reader did not return.
    release.wait(60)
    yield from (make_sample(i) for i in range(8, 16))

dr.set_sample_generator(reader)
batches = dr.distill_reader()()
next(batches)
batches.close()
# The pipeline process logs its warning about the unreachable teacher before the statistics that
# show it failing, on the same pipe: once they show it, the warning was emitted here.
deadline = time.monotonic() + 60
while all(t.healthy for t in dr.stats().teachers) and time.monotonic() < deadline:
    time.sleep(0.05)
release.set()
dr.close()
print("DONE", flush=True)
"""

DEFAULT_FORMAT = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING "
USER_SETUP = "logging.basicConfig(format='USER %(levelname)s [%(name)s] %(message)s')"
PIPELINE_WARNING = "its requests go to the other teachers"  # about the unreachable teacher
TRAINING_WARNING = "the reader function did not return within 2 s after the epoch stopped"


def _run(tmp_path, write_config, tag_teachers, setup: str) -> tuple[str, list[str]]:
    """The unreachable teacher's endpoint, and the stderr lines of the two warnings."""
    unreachable = f"127.0.0.1:{free_port()}"
    config = write_config([tag_teachers[0], unreachable])
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR), config=str(config), setup=setup))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0 and "DONE" in done.stdout, done.stderr
    lines = [line for line in done.stderr.splitlines() if PIPELINE_WARNING in line or TRAINING_WARNING in line]
    return unreachable, lines


def test_without_logging_config_warnings_show_in_one_format(tmp_path, write_config, tag_teachers):
    unreachable, lines = _run(tmp_path, write_config, tag_teachers, setup="")
    assert len(lines) == 2, lines  # once each
    pipeline, training = sorted(lines, key=lambda line: TRAINING_WARNING in line)
    scheduler = rf"distill_reader\.teacher\.scheduler: teacher {re.escape(unreachable)}: "
    assert re.match(DEFAULT_FORMAT + scheduler, pipeline), lines
    assert re.match(DEFAULT_FORMAT + r"distill_reader: " + TRAINING_WARNING, training), lines


def test_with_the_users_logging_config_warnings_show_once_in_its_format(tmp_path, write_config, tag_teachers):
    unreachable, lines = _run(tmp_path, write_config, tag_teachers, setup=USER_SETUP)
    assert len(lines) == 2, lines  # once each: not also in the library's format
    pipeline, training = sorted(lines, key=lambda line: TRAINING_WARNING in line)
    assert pipeline.startswith(f"USER WARNING [distill_reader.teacher.scheduler] teacher {unreachable}: "), lines
    assert training.startswith("USER WARNING [distill_reader] " + TRAINING_WARNING), lines
