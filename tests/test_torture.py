"""Lifecycle torture: thousands of epochs with random early breaks, signals at random moments,
readers created and dropped in a loop. Nothing hangs, nothing leaks (processes, shared memory,
file descriptors, threads, memory).

The long versions are marked slow (``DISTILL_SLOW_TESTS=1``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import threading
import uuid

import pytest
from chaos_support import alive, fd_count, rss_bytes, slow
from conftest import TESTS_DIR, child_pids, reader_shm, start_script
from reader_models import make_sample
from test_lifecycle import wait_until, watch_children
from test_reader import check_epoch

from distill_reader import DistillReader, ReaderFunctionError

pytestmark = pytest.mark.timeout(120)

N = 40  # samples per epoch: 5 batches of 8


def _resources() -> tuple[int, int, int]:
    gc.collect()
    return fd_count(), threading.active_count(), rss_bytes()


def _assert_flat(before: tuple[int, int, int], after: tuple[int, int, int], rss_slack: int = 32 << 20) -> None:
    print(
        f"\nfds {before[0]} -> {after[0]}, threads {before[1]} -> {after[1]}, "
        f"rss {before[2] / 2**20:.1f} -> {after[2] / 2**20:.1f} MiB"
    )
    assert after[0] <= before[0] + 2, "file descriptors leak"
    assert after[1] <= before[1] + 1, "threads leak"
    assert after[2] - before[2] < rss_slack, "memory grows"


class _Boom(Exception):
    pass


def _epochs(config, epochs: int, seed: int) -> None:
    """``epochs`` epochs, most ended early at a random step, by break, exception or abandonment."""
    rng = random.Random(seed)
    dr = DistillReader(config, 8, 3, capacity=4, occupied_capacity=1)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(N)))
    epoch_reader = dr.distill_reader()
    with dr:
        pipeline = None
        before = None
        dangling = []
        for epoch in range(epochs):
            if epoch == 20:
                pipeline = child_pids()
                before = _resources()
            how = rng.choice(["whole", "break", "break", "raise", "abandon"])
            stop_at = rng.randrange(0, N // 8)
            if how == "whole":
                check_epoch([[a.copy() for a in b] for b in epoch_reader()], N, 8)
            elif how == "break":
                for step, _ in enumerate(epoch_reader()):
                    if step == stop_at:
                        break
            elif how == "raise":
                with pytest.raises(_Boom):
                    for step, _ in enumerate(epoch_reader()):
                        if step == stop_at:
                            raise _Boom
            else:  # left open, not closed: the next epoch stops it
                batches = epoch_reader()
                for _ in range(stop_at + 1):
                    next(batches)
                dangling = [batches]
        del dangling
        check_epoch([[a.copy() for a in b] for b in epoch_reader()], N, 8)
        assert child_pids() == pipeline, "the pipeline process was replaced: it died"
        _assert_flat(before, _resources())


def test_a_hundred_epochs_with_random_early_breaks(write_config, tag_teachers):
    _epochs(write_config(tag_teachers), 120, seed=0)


@slow
@pytest.mark.timeout(1800)
def test_thousands_of_epochs_with_random_early_breaks(write_config, tag_teachers):
    _epochs(write_config(tag_teachers), 5000, seed=1)


def test_reader_function_failing_at_random_moments(write_config, tag_teachers):
    """The user's reader raises at a random sample, epoch after epoch; the next good epoch is whole."""
    rng = random.Random(2)
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1)
    with dr:
        for _ in range(30):
            fail_at = rng.randrange(0, N)

            def reader(fail_at=fail_at):
                for i in range(N):
                    if i == fail_at:
                        raise OSError("disk gone")
                    yield make_sample(i)

            dr.set_sample_generator(reader)
            with pytest.raises(ReaderFunctionError, match=f"OSError after {fail_at} samples: disk gone"):
                list(dr.distill_reader()())
            dr.set_sample_generator(lambda: (make_sample(i) for i in range(N)))
            check_epoch([[a.copy() for a in b] for b in dr.distill_reader()()], N, 8)


# -- readers created and dropped ---------------------------------------------------------------


def _create_and_drop(config, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    # What a reader can leave in /dev/shm carries the pid of this process or of a pipeline process
    # (see reader_shm): each reader's pipeline process is noted while its first batch is out.
    pipelines: set[int] = set()
    before_children, before_shm = child_pids(), reader_shm({os.getpid()})

    def first(batches):
        batch = next(batches)
        pipelines.update(child_pids() - before_children)
        return batch

    before = None
    for round_ in range(rounds):
        if round_ == 3:
            before = _resources()
        dr = DistillReader(config, 8, 3, capacity=4, occupied_capacity=1)
        dr.set_sample_generator(lambda: (make_sample(i) for i in range(N)))
        how = rng.choice(["close", "drop", "with", "drop-mid-epoch", "never-started"])
        if how == "close":
            first(iter(dr.distill_reader()()))
            dr.close()
        elif how == "drop":
            batches = dr.distill_reader()()
            got = [[a.copy() for a in first(batches)]]
            check_epoch(got + [[a.copy() for a in b] for b in batches], N, 8)
            del dr, batches
        elif how == "with":
            with dr:
                batches = dr.distill_reader()()
                first(batches)
                for step, _ in enumerate(batches, 1):
                    if step == 2:
                        break
                del batches
        elif how == "drop-mid-epoch":
            batches = dr.distill_reader()()
            first(batches)
            del dr, batches
        else:
            del dr
        gc.collect()
        assert child_pids() == before_children, (round_, how, child_pids() - before_children)
        assert reader_shm({os.getpid(), *pipelines}) == before_shm, (round_, how)
    assert pipelines, "no pipeline process was seen"
    _assert_flat(before, _resources())


def test_readers_created_and_dropped_in_a_loop(write_config, tag_teachers):
    _create_and_drop(write_config(tag_teachers), 8, seed=3)


@slow
@pytest.mark.timeout(1800)
def test_readers_created_and_dropped_hundreds_of_times(write_config, tag_teachers):
    _create_and_drop(write_config(tag_teachers), 300, seed=4)


# -- signals at random moments -----------------------------------------------------------------

SCRIPT = """
import random, sys
sys.path.insert(0, {tests!r})
from reader_models import make_sample
from distill_reader import DistillReader

rng = random.Random({seed})
dr = DistillReader({config!r}, 8, 2, capacity=4, occupied_capacity=1)
dr.set_sample_generator(lambda: (make_sample(i) for i in range(200)))
reader = dr.distill_reader()
next(reader())  # the pipeline process is up and streaming
print("STREAMING", flush=True)
while True:
    stop_at = rng.randrange(0, 30)
    for step, batch in enumerate(reader()):
        if step == stop_at:
            break
"""


def _marked(token: str) -> set[int]:
    """Live processes whose environment holds ``token``."""
    found = set()
    needle = f"DISTILL_TORTURE_TOKEN={token}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read() and alive(int(entry)):
                        found.add(int(entry))
            except OSError:
                continue
    return found


def _signal_at_random_moment(
    tmp_path, config, sig: int, seed: int, wait_for_stream: bool
) -> tuple[float, float, set[int]]:
    """Run a training script, signal it at a random moment, wait (bounded, else fail) until it has
    exited by the signal and no process of it is left; (seconds to exit, seconds until no process of
    it is left, both from the signal; the pids of the script and of every process it was seen to
    start: what it leaves in /dev/shm carries one of them, see reader_shm)."""
    rng = random.Random(seed)
    token = uuid.uuid4().hex
    script = tmp_path / f"train{seed}.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR), config=str(config), seed=seed))
    process = start_script(script, env={**os.environ, "DISTILL_TORTURE_TOKEN": token})
    where = f"{signal.Signals(sig).name}, seed {seed}, {'streaming' if wait_for_stream else 'starting'}"
    seen = {process.pid}

    def none_left() -> bool:
        left = _marked(token)
        seen.update(left)
        return not left

    try:
        if wait_for_stream:  # a random moment of streaming, breaking and restarting epochs
            assert process.stdout.readline().startswith("STREAMING"), process.stderr.read()
            watch_children(process.pid, rng.uniform(0.0, 1.0), seen)
        else:  # a random moment of start-up: imports, the pool, the pipeline process starting
            watch_children(process.pid, rng.uniform(0.0, 1.5), seen)
        os.kill(process.pid, sig)
        exited = wait_until(lambda: process.poll() is not None, f"the training script did not exit ({where})")
        outlived = f"a process of the training script outlived it ({where})"
        gone = exited + wait_until(none_left, outlived)
    finally:
        process.kill()
        process.wait()
        for pid in _marked(token):
            os.kill(pid, signal.SIGKILL)
    # By the signal itself: SIGTERM has no handler, and Python ends an uncaught KeyboardInterrupt
    # by re-raising SIGINT.
    assert process.returncode == -sig, (where, process.returncode, process.stderr.read()[-2000:])
    if wait_for_stream:
        assert len(seen) > 1, f"the streaming script's pipeline process was not seen ({where})"
    return exited, gone, seen


@pytest.mark.parametrize(
    ("sig", "seed", "streaming"),
    [(signal.SIGINT, 10, True), (signal.SIGTERM, 11, True), (signal.SIGINT, 12, False), (signal.SIGTERM, 13, False)],
)
def test_signal_at_a_random_moment_stops_everything(tmp_path, write_config, tag_teachers, sig, seed, streaming):
    exited, gone, pids = _signal_at_random_moment(tmp_path, write_config(tag_teachers), sig, seed, streaming)
    print(f"\n{signal.Signals(sig).name}: exited after {exited:.2f} s, no process left after {gone:.2f} s")
    assert not reader_shm(pids)


@slow
@pytest.mark.timeout(1800)
def test_signals_at_hundreds_of_random_moments(tmp_path, write_config, tag_teachers):
    config = write_config(tag_teachers)
    worst = (0.0, 0.0)
    for seed in range(100):
        sig = random.Random(seed).choice([signal.SIGINT, signal.SIGTERM])
        exited, gone, pids = _signal_at_random_moment(tmp_path, config, sig, seed, streaming := seed % 2 == 0)
        if streaming or sig == signal.SIGINT:
            assert not reader_shm(pids), (seed, sig, streaming)
        worst = (max(worst[0], exited), max(worst[1], gone))
    print(f"\nworst: exited after {worst[0]:.2f} s, no process left after {worst[1]:.2f} s")


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.6, 0.9, 1.2])
def test_sigterm_while_the_pipeline_process_starts_leaves_no_shared_memory(tmp_path, write_config, tag_teachers, delay):
    """The pool has no name from the moment it exists, so a SIGTERM (no handler: the process dies
    at once) at any moment of the pipeline's start leaves nothing in /dev/shm."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR), config=str(write_config(tag_teachers)), seed=0))
    token = uuid.uuid4().hex
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "DISTILL_TORTURE_TOKEN": token},
    )
    seen = {process.pid}

    def none_left() -> bool:
        left = _marked(token)
        seen.update(left)
        return not left

    try:
        watch_children(process.pid, delay, seen)
        os.kill(process.pid, signal.SIGTERM)
        wait_until(lambda: process.poll() is not None, f"the training script did not exit on SIGTERM after {delay} s")
        wait_until(none_left, f"a process of the training script outlived it (SIGTERM after {delay} s)")
        left = reader_shm(seen)
    finally:
        process.kill()
        process.wait()
        for pid in _marked(token):
            os.kill(pid, signal.SIGKILL)
        for name in reader_shm(seen):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", name))
    assert not left, (left, seen)
