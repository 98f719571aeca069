"""Faults of the knowledge store found by use and review (issue 17): each test failed on the code
before its fix.

Every row is checked against the exact teacher of ``reader_models`` applied to that row's own
input. ``read`` runs against an address where no teacher listens: asking one would fail the epoch.
Faults inside the pipeline process (a clock stepped back, a slow read) are brought about there by a
``sitecustomize`` module on its ``PYTHONPATH`` (:func:`pipeline_hooks`), acting only on the
variables that a test sets.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SEED_CONFIG, wait_for
from reader_models import K, make_sample, seq_rows, tag_rows
from test_reader import check_epoch

from distill_reader import DistillReader, DistillReaderError
from distill_reader.bench.sequence import sequence_config
from distill_reader.knowledge.commands import summarize, verify
from distill_reader.reader.pipeline import _STORE_STOP_TIMEOUT

pytestmark = pytest.mark.timeout(120)

NOWHERE = ["127.0.0.1:1"]  # no teacher listens here
MAX_LENGTH = 24
BATCH, D_BATCH = 16, 4


# Installed in the pipeline process through its PYTHONPATH; acts only on the variables a test sets.
SITECUSTOMIZE = """
import os

if os.environ.get("DISTILL_TEST_CLOCK_BACK"):
    # The wall clock stepped back by that many seconds, as Python's time_ns() sees it (time.time()
    # stays: gRPC's deadlines mix it with its own clock, which cannot be moved from here).
    import time

    _back_ns = int(float(os.environ["DISTILL_TEST_CLOCK_BACK"]) * 1e9)
    _time_ns = time.time_ns
    time.time_ns = lambda: _time_ns() - _back_ns

if os.environ.get("DISTILL_TEST_STORE_GATE"):
    # A store on a disk that stalls: every read of stored outputs announces itself ("reading") and
    # waits until the test opens the gate ("open"; at most 60 s).
    import pathlib
    import time

    from distill_reader.knowledge import session as _session

    _gate = pathlib.Path(os.environ["DISTILL_TEST_STORE_GATE"])
    _copy = _session.KnowledgeSession._copy

    def _event(what):
        with open(_gate / "events", "a") as fh:
            fh.write(what + "\\n")

    def _stalled_copy(self, *args, **kwargs):
        (_gate / "reading").touch()
        deadline = time.monotonic() + 60
        while not (_gate / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            return _copy(self, *args, **kwargs)
        finally:
            _event("read ended")

    _session.KnowledgeSession._copy = _stalled_copy

    # the pipeline process's side of a cancelled epoch: when Cancel came, when it was acknowledged
    from distill_reader.reader import channel as _channel, pipeline_process as _process

    _on_cancel, _send = _process._PipelineProcess._on_cancel, _process._PipelineProcess.send

    def _cancel(self, message):
        _event("cancel")
        (_gate / "cancel").touch()
        return _on_cancel(self, message)

    def _sent(self, message):
        if isinstance(message, _channel.Cancelled):
            _event("acknowledged")
        return _send(self, message)

    _process._PipelineProcess._on_cancel, _process._PipelineProcess.send = _cancel, _sent

if os.environ.get("DISTILL_TEST_CLOSE_TIMEOUT"):
    # The session's bound on its close, and no chunk written before it (recorded rows wait for it).
    from distill_reader.knowledge import session as _session

    _session._CLOSE_TIMEOUT = float(os.environ["DISTILL_TEST_CLOSE_TIMEOUT"])
    _session.IDLE_COMMIT = _session.MAX_AGE = 3600.0
"""


@pytest.fixture
def pipeline_hooks(tmp_path, monkeypatch):
    """``set(NAME, value)``: a variable that the pipeline processes started from now on act on."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    compile(SITECUSTOMIZE, "sitecustomize.py", "exec")  # a broken one would only print a line, and act on nothing
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    return monkeypatch.setenv


def store_config(write_config, servers, path: Path, policy: str, extra: str = "", text: str | None = None) -> Path:
    return write_config(text=f"{text}\n[store]\npath = {path}\npolicy = {policy}\n{extra}")


def epoch_of(dr: DistillReader) -> list[list[np.ndarray]]:
    return list(dr.distill_reader()())


# -- variable rows grouped by length ----------------------------------------------------------


def grouped_length(position: int) -> int:
    """Lengths that group_by_length (longest first, d_batches of 4) cuts into runs of rows that are
    contiguous but out of order: rows 0..3 have lengths 23, 21, 22, 20, so their d_batch is
    ``[0, 2, 1, 3]``; rows 4..7 have 19, 17, 18, 16; and so on in each batch of 16."""
    within = position % BATCH
    return 20 - 4 * (within // D_BATCH) + (3, 1, 2, 0)[within % D_BATCH]


def token_row(sample_id: int, length: int) -> np.ndarray:
    return (np.arange(length, dtype=np.int64) * 31 + sample_id * 17) % 997 + 1


def check_token_rows(batches: list[list[np.ndarray]], ids: np.ndarray, length_of: dict[int, int]) -> None:
    """Every sample once, in the reader's order; each row's outputs those of ``seq_tag`` applied
    to that very row's tokens, 0 past its length."""
    got = np.concatenate([b[1][:, 0] for b in batches])
    np.testing.assert_array_equal(got, ids)
    for tokens, id_, values, indices, *_ in batches:
        for row in range(len(tokens)):
            sample = int(id_[row, 0])
            length = length_of[sample]
            expected = token_row(sample, length)
            np.testing.assert_array_equal(tokens[row, :length], expected)
            want_values, want_indices = seq_rows(expected[None])
            np.testing.assert_array_equal(values[row, :length], want_values[0], err_msg=f"sample {sample}")
            np.testing.assert_array_equal(indices[row, :length], want_indices[0], err_msg=f"sample {sample}")
            assert not values[row, length:].any() and not indices[row, length:].any()


@pytest.mark.parametrize("keyed", ["position", "key_var"])
def test_grouped_variable_rows_read_back(write_config, teachers, tmp_path, keyed):
    """Token rows captured from two teachers with policy write, length grouping on (the default),
    in d_batches such as ``[0, 2, 1, 3]``, read back with the teachers gone (cache, then read):
    every row exact, none asked again or recorded twice. By position, and shuffled with key_var
    (another order for the reading epochs)."""
    servers = [teachers.start("reader_models:seq_tag"), teachers.start("reader_models:seq_tag")]
    n = 480
    rng = np.random.default_rng(7)
    # The capturing epoch's order: positions 0..n-1 get the grouped lengths, whatever sample is there.
    capture = rng.permutation(n) if keyed == "key_var" else np.arange(n)
    length_of = {int(sample): grouped_length(p) for p, sample in enumerate(capture)}
    read = rng.permutation(n) if keyed == "key_var" else np.arange(n)
    extra = "key_var = id" if keyed == "key_var" else ""
    path = tmp_path / "store"

    def samples(order):
        return lambda: ((token_row(int(s), length_of[int(s)]), np.array([s], np.int64)) for s in order)

    # cache with no teacher: every row must come from the store (a row asked again fails the epoch)
    passes = (("write", capture, servers), ("cache", read, NOWHERE), ("read", read, NOWHERE))
    for policy, order, where in passes:
        text = sequence_config(where, MAX_LENGTH, K, values_dtype="float32", output="")
        dr = DistillReader(
            store_config(write_config, where, path, policy, extra, text=text),
            BATCH,
            D_BATCH,
            capacity=4,
            occupied_capacity=1,
            copy=True,
            teacher_timeout=1,
        )
        dr.set_sample_generator(samples(order))
        with dr:
            check_token_rows(epoch_of(dr), order, length_of)
    summary = summarize(path)
    assert summary.keys == summary.rows == n
    assert verify(path)[1] == []


def test_fingerprints_of_rows_out_of_order_are_each_rows_own():
    from distill_reader.knowledge.layout import fingerprint_rows
    from distill_reader.oip import TensorSpec

    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 1000, size=(8, MAX_LENGTH))
    lengths = rng.integers(1, MAX_LENGTH + 1, size=8)
    for row, length in enumerate(lengths):
        tokens[row, length:] = 0
    inputs = [(tokens, lengths, TensorSpec("tokens", np.dtype("int64"), (-1,)))]
    each = fingerprint_rows(inputs, np.arange(8))
    assert len({bytes(f) for f in each}) == 8
    for rows in ([3, 5, 4, 6], [0, 2, 1, 3], [1, 0], [7], [6, 7, 4, 5], [2, 3, 4, 5]):
        np.testing.assert_array_equal(fingerprint_rows(inputs, np.array(rows)), each[rows], err_msg=str(rows))


# -- crash safety -----------------------------------------------------------------------------


def seed_reader(write_config, servers, path: Path, policy: str) -> DistillReader:
    text = SEED_CONFIG.format(servers=list(servers), extra="")
    conf = store_config(write_config, servers, path, policy, text=text)
    return DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=1)


def samples(order):
    return lambda: (make_sample(int(i)) for i in order)


def test_the_manifest_is_durable_before_it_is_used(write_config, tmp_path, monkeypatch):
    """A power loss right after the store is created must not leave an empty manifest: its contents
    are synced before its name appears (the link), and its folder after."""
    events: list[tuple] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def link(src, dst, *args, **kwargs):
        events.append(("link", str(src), str(dst)))
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    path = tmp_path / "store"
    seed_reader(write_config, NOWHERE, path, "write").close()
    monkeypatch.undo()
    manifest = path / "manifest.json"
    linked = [i for i, e in enumerate(events) if e[0] == "link" and e[2] == str(manifest)]
    assert len(linked) == 1, events
    at, tmp = linked[0], events[linked[0]][1]
    assert ("fsync", tmp, manifest.stat().st_size) in events[:at], events  # its whole contents
    assert ("fsync", str(path), os.stat(path).st_size) in events[at + 1 :], events  # its name
    assert ("fsync", str(tmp_path), os.stat(tmp_path).st_size) in events, events  # the store's own name


def test_a_manifest_cut_off_by_a_crash_is_recovered_from_the_chunks(write_config, tag_teachers, tmp_path, caplog):
    """What a power loss left of a manifest that was not synced (an empty file), beside synced
    chunks: the store reads back (each chunk carries the manifest); write or cache rewrites it."""
    n = 48
    path = tmp_path / "store"
    dr = seed_reader(write_config, tag_teachers, path, "write")
    dr.set_sample_generator(samples(range(n)))
    with dr:
        check_epoch(epoch_of(dr), n, 16)
    wanted = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text("")
    caplog.set_level(logging.WARNING, "distill_reader")
    dr = seed_reader(write_config, NOWHERE, path, "read")
    dr.set_sample_generator(samples(range(n)))
    with dr:
        check_epoch(epoch_of(dr), n, 16)
    assert "manifest.json is empty or cut off" in caplog.text
    assert (path / "manifest.json").read_text() == ""  # read never writes
    seed_reader(write_config, NOWHERE, path, "cache").close()
    assert json.loads((path / "manifest.json").read_text()) == wanted
    assert verify(path)[1] == []


# -- which copy of a key wins -----------------------------------------------------------------


def test_a_newer_answer_wins_though_the_clock_stepped_back(write_config, tag_teachers, tmp_path, pipeline_hooks):
    """Sample 1005 at position 5, recorded (cache) by a process whose wall clock is an hour behind
    the capture's (stepped back, or another host's): its answer is the one read back."""
    n = 48
    path = tmp_path / "store"
    dr = seed_reader(write_config, tag_teachers, path, "write")
    dr.set_sample_generator(samples(range(n)))
    with dr:
        check_epoch(epoch_of(dr), n, 16)
    order = [1005 if i == 5 else i for i in range(n)]

    def check(batches):
        img = np.concatenate([b[0] for b in batches])
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:, 0], order)
        np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), tag_rows(img))

    pipeline_hooks("DISTILL_TEST_CLOCK_BACK", "3600")
    dr = seed_reader(write_config, tag_teachers, path, "cache")
    dr.set_sample_generator(samples(order))
    with dr:
        check(epoch_of(dr))
    pipeline_hooks("DISTILL_TEST_CLOCK_BACK", "")
    assert summarize(path).rows == n + 1  # the new copy of key 5
    dr = seed_reader(write_config, NOWHERE, path, "read")
    dr.set_sample_generator(samples(order))
    with dr:
        check(epoch_of(dr))


def test_chunk_names_sort_after_every_chunk_in_the_store(tmp_path):
    """Whatever the names there (an earlier version's, by a clock ahead of this one's; another
    writer's), each new chunk's name sorts after them, and this writer's names keep their order."""
    from distill_reader.knowledge.layout import CHUNKS, ChunkNamer, chunk_sequence

    folder = tmp_path / CHUNKS
    folder.mkdir()
    ahead = f"{(1 << 62):020d}-otherhost-17-abcdef-000001.arrow"  # an old version's name, its clock far ahead
    (folder / ahead).write_bytes(b"")
    (folder / ".00000000000000000009-x-1-aaaaaa-000001.arrow.tmp").write_bytes(b"")  # unfinished: no part
    mine, other = ChunkNamer(tmp_path), ChunkNamer(tmp_path)
    names = [mine.next(), mine.next()]
    assert chunk_sequence(names[0]) == (1 << 62) + 1 and chunk_sequence(names[1]) == (1 << 62) + 2
    (folder / names[1]).write_bytes(b"")
    names.append(other.next())  # after mine, which it sees in the folder
    names.append(mine.next())  # named while the other's chunk is not written yet: the same sequence
    assert chunk_sequence(names[2]) == chunk_sequence(names[3]) == chunk_sequence(names[1]) + 1
    assert sorted([ahead, *names]) == [ahead, *names[:2], *sorted(names[2:])]  # the tie: by writer
    (folder / names[2]).write_bytes(b"")
    assert chunk_sequence(mine.next()) == chunk_sequence(names[2]) + 1


# -- store reads off the pipeline process's event loop ----------------------------------------


def stalled_store(write_config, tag_teachers, tmp_path: Path, pipeline_hooks, rows: int) -> tuple[Path, Path]:
    """(store, gate): a store written with the first ``rows`` samples' answers, whose reads by the
    pipeline processes started from now on stall until ``gate / "open"`` exists (SITECUSTOMIZE)."""
    path = tmp_path / "store"
    dr = seed_reader(write_config, tag_teachers, path, "write")
    dr.set_sample_generator(samples(range(rows)))
    with dr:
        check_epoch(epoch_of(dr), rows, 16)
    gate = tmp_path / "gate"
    gate.mkdir()
    pipeline_hooks("DISTILL_TEST_STORE_GATE", str(gate))
    return path, gate


def test_teachers_are_asked_while_the_store_is_read(write_config, tag_teachers, tmp_path, pipeline_hooks):
    """The first batch's rows are in the store, on a disk that stalls; the next batches' are not.
    While the store read is held, the pipeline process's event loop goes on: it answers stats and
    its requests to the teachers for the next batches are answered. Then every row is exact."""
    path, gate = stalled_store(write_config, tag_teachers, tmp_path, pipeline_hooks, 16)
    dr = seed_reader(write_config, tag_teachers, path, "cache")
    dr.set_sample_generator(samples(range(48)))
    seen: dict[str, object] = {}

    def watch() -> None:
        try:
            wait_for(lambda: (gate / "reading").exists(), 30, "no store read began")
            seen["answered"] = wait_for(
                lambda: sum(t.requests for t in dr.stats(timeout=1).teachers),
                30,
                "no teacher request was answered while the store read was held",
            )
        except BaseException as exc:
            seen["error"] = exc
        finally:
            (gate / "open").touch()

    watcher = threading.Thread(target=watch, daemon=True)
    with dr:
        watcher.start()
        try:
            batches = epoch_of(dr)
        finally:
            (gate / "open").touch()
            watcher.join(70)
    assert "error" not in seen, seen["error"]
    assert (gate / "reading").exists() and seen["answered"]
    check_epoch(batches, 48, 16)


def test_an_epoch_left_during_a_store_read_is_acknowledged_after_it(
    write_config, tag_teachers, tmp_path, pipeline_hooks
):
    """A newer epoch stops one whose first batch is being read from a stalled store: the pipeline
    process acknowledges the cancellation only once that read has ended (it writes into a slot
    that the newer epoch reuses), and the newer epoch's rows are exact."""
    n = 48
    path, gate = stalled_store(write_config, tag_teachers, tmp_path, pipeline_hooks, n)
    dr = seed_reader(write_config, NOWHERE, path, "read")
    dr.set_sample_generator(samples(range(n)))
    first: dict[str, object] = {}

    def first_epoch() -> None:
        try:
            first["batches"] = epoch_of(dr)
        except BaseException as exc:
            first["error"] = exc

    def open_on_cancel() -> None:
        try:
            wait_for(lambda: (gate / "cancel").exists(), 30, "no Cancel reached the pipeline process")
        finally:
            (gate / "open").touch()

    with dr:
        stopped = threading.Thread(target=first_epoch, daemon=True)
        opener = threading.Thread(target=open_on_cancel, daemon=True)
        stopped.start()
        try:
            wait_for(lambda: (gate / "reading").exists(), 30, "no store read began")
            opener.start()
            check_epoch(epoch_of(dr), n, 16)  # stops the first epoch: Cancel, then the acknowledgement
        finally:
            (gate / "open").touch()
            stopped.join(30)
            if opener.is_alive():
                opener.join(40)
    assert isinstance(first.get("error"), DistillReaderError) and "stopped" in str(first["error"]), first
    events = (gate / "events").read_text().splitlines()
    assert events.index("cancel") < events.index("read ended") < events.index("acknowledged"), events


def test_a_read_stuck_on_the_disk_does_not_keep_the_recorded_rows_from_being_written(
    write_config, tag_teachers, tmp_path, pipeline_hooks
):
    """The reader closes while the first batch's read from the store is stuck and the teachers'
    answers for the next batches are recorded, not yet written: the close writes them while the read
    is still stuck (after the session's bound, 2 s here), instead of waiting on it until killed.
    (The process can only exit once the read ends: the gate opens when the rows are written.)"""
    path, gate = stalled_store(write_config, tag_teachers, tmp_path, pipeline_hooks, 16)
    pipeline_hooks("DISTILL_TEST_CLOSE_TIMEOUT", "2")
    dr = seed_reader(write_config, tag_teachers, path, "cache")
    dr.set_sample_generator(samples(range(48)))
    ended: list[BaseException] = []

    def consume() -> None:
        try:
            epoch_of(dr)
        except BaseException as exc:
            ended.append(exc)

    written: dict[str, object] = {}

    def open_once_written() -> None:
        try:
            wait_for(lambda: summarize(path).rows == 48, 20, "no recorded row written while a read was stuck")
        except AssertionError as exc:
            written["error"] = exc
        finally:
            (gate / "open").touch()

    consumer = threading.Thread(target=consume, daemon=True)
    opener = threading.Thread(target=open_once_written, daemon=True)
    try:
        consumer.start()
        wait_for(lambda: (gate / "reading").exists(), 30, "no store read began")
        wait_for(
            lambda: sum(t.requests for t in dr.stats(timeout=1).teachers) >= 32 // D_BATCH,
            30,
            "the teachers did not answer the rows the store lacks",
        )
        opener.start()
        started = time.monotonic()
        dr.close()
        took = time.monotonic() - started
    finally:
        (gate / "open").touch()
        consumer.join(30)
        opener.join(30)
    assert "error" not in written, written["error"]
    assert took < _STORE_STOP_TIMEOUT / 2, took
    assert ended and isinstance(ended[0], DistillReaderError), ended
    assert summarize(path).rows == 48  # the 16 of the first run, the 32 the teachers answered
