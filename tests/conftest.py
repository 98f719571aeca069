"""Shared fixtures: reader configs, built-in teachers (in-process and as processes), leak checks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import pytest

from distill_reader import DistillReader
from distill_reader.bench import processes as bench_processes
from distill_reader.reader.pool import NAME_PREFIX
from distill_reader.reader.stats import ReaderStats
from distill_reader.teacher.local import free_port  # noqa: F401 - the tests import it from here

TESTS_DIR = Path(__file__).parent


# The [feed] section of the tag models (reader_models.tag): an image and a label, the image to teachers.
TAG_FEED = """\
[feed]
feed_vars = ['img', 'label']
feed_types = ['float32', 'int64']
feed_shapes = [(1, 4, 4), (1,)]
predict_feed_ids = [0]
"""

READER_CONFIG = """\
[conf]
{conf}
"""
READER_CONFIG += TAG_FEED
READER_CONFIG += """
[fetch]
fetch_vars = ['prediction']
fetch_types = ['float32']
fetch_shapes = [(10, )]
"""
# READER_CONFIG in fixed mode: ``SEED_CONFIG.format(servers=[...], extra="more [conf] lines")``.
SEED_CONFIG = READER_CONFIG.replace("{conf}", "mode = fixed\nservers = {servers!r}\n{extra}")


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(servers, extra="", text=None)``: a reader config file for the tag models."""
    counter = iter(range(1000))

    def write(servers: list[str] | None = None, extra: str = "", text: str | None = None) -> Path:
        path = tmp_path / f"reader{next(counter)}.conf"
        path.write_text(text if text is not None else SEED_CONFIG.format(servers=servers, extra=extra))
        return path

    return write


def tests_pythonpath() -> dict[str, str]:
    """``PYTHONPATH`` with tests/ first, so that a child process can load the tests' models
    (``reader_models:tag``)."""
    return {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with :func:`tests_pythonpath`, and ``extra``."""
    return {**os.environ, **tests_pythonpath(), **(extra or {})}


class TeacherProcesses(bench_processes.TeacherProcesses):
    """The bench's teacher launcher with the tests' defaults: ``reader_models:tag``, the tests'
    models importable, the teachers' output on ours (``output``: elsewhere)."""

    def __init__(
        self, model: str = "reader_models:tag", env: Mapping[str, str] | None = None, output: int | None = None
    ) -> None:
        super().__init__(model, env={**tests_pythonpath(), **(env or {})}, output=output)


@pytest.fixture
def teachers() -> Iterator[TeacherProcesses]:
    """Teacher processes a test starts (``teachers.start(...)``), killed at its end."""
    with TeacherProcesses() as fleet:
        yield fleet


@pytest.fixture(scope="session")
def tag_teachers() -> Iterator[list[str]]:
    """Two teacher processes serving ``reader_models:tag``, shared by the tests that only read."""
    with TeacherProcesses() as fleet:
        yield [fleet.start(), fleet.start()]


def live_parents() -> dict[int, int]:
    """Every live (not zombie) process of this machine, with its parent's pid."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    return parents


def child_pids(pid: int | None = None) -> set[int]:
    """Processes whose parent is ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    return {child for child, parent in live_parents().items() if parent == pid}


def shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("distill-reader-")}


def reader_shm(pids: Iterable[int]) -> set[str]:
    """The names in /dev/shm that a reader of the processes ``pids`` can leave behind.

    The pool and the output rings have no name (``O_TMPFILE``) but for a registration call, when
    the process that registers them (the pipeline process) links them as
    ``distill-reader-shm-<its pid>-<random>`` (reader/pool.py). Where ``O_TMPFILE`` is missing the
    pool is created as ``distill-reader-<pid>-<random>`` by the training process and unlinked at
    once. Give the training process's pid and its pipeline processes' pids."""
    prefixes = tuple(f"{prefix}{pid}-" for pid in pids for prefix in (NAME_PREFIX, "distill-reader-"))
    return {name for name in shm_files() if name.startswith(prefixes)} if prefixes else set()


def settled_stats(dr: DistillReader, timeout: float = 30.0) -> ReaderStats:
    """``dr.stats()`` as of now, however loaded the machine: the answer to a request sent earlier
    (e.g. by the pool check during the epoch) is awaited first, then that of a fresh one. Fails,
    with the numbers it has, when either report does not come within ``timeout`` seconds (``stats()``
    itself then returns the last numbers it had, stale)."""
    tracker = dr._stats  # counts the reports the pipeline process sends (its receiver calls this)
    report = tracker.pipeline_report
    reports = [0]

    def counted(*args: object, **kwargs: object) -> None:
        reports[0] += 1
        report(*args, **kwargs)

    tracker.pipeline_report = counted
    try:
        for which in ("the answer to an earlier request", "the answer to a fresh request"):
            before = reports[0]
            stats = dr.stats(timeout=timeout)
            if reports[0] == before:
                raise AssertionError(
                    f"no statistics from the pipeline process within {timeout} s ({which}); stale: {stats}"
                )
    finally:
        del tracker.pipeline_report
    return stats


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.2) -> object:
    """The first true value of ``predicate()``, polled every ``every`` seconds. An exception counts
    as false (a server not up yet, say). After ``timeout`` seconds, fails naming ``what`` and what it
    saw last: the value, or the exception (chained)."""
    deadline = time.monotonic() + timeout
    while True:
        error: Exception | None = None
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported if it is still what we see at the end
            error = exc
        if time.monotonic() >= deadline:
            last = f"it raised {error!r}" if error is not None else f"it was {value!r}"
            raise AssertionError(f"{what}: not within {timeout} s; {last}") from error
        time.sleep(every)


@contextlib.contextmanager
def sigint_default_in_children() -> Iterator[None]:
    """Children started meanwhile get SIGINT's default disposition, which these tests rely on (a
    SIGINT kills a Python script that has not installed its handler yet, and raises KeyboardInterrupt
    in one that has). A disposition is inherited across exec only when it is SIG_IGN, and a shell
    without job control starts its background jobs (``make test &``, ``nohup make test``) with SIGINT
    ignored: pytest then ignores it, and so would the scripts it starts. A handler of our own in this
    process becomes SIG_DFL in the child at exec. (Popen returns once the child has exec'd.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_script(script: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Python script started as a training script is (its own session, pipes for its output),
    with SIGINT's default disposition (see :func:`sigint_default_in_children`)."""
    with sigint_default_in_children():
        return subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
