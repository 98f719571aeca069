"""The knowledge store ([store], docs/store.md): teacher outputs captured once and read back.

Every row is checked against the exact teacher of ``reader_models`` applied to that row's own
input. ``read`` runs against an address where no teacher listens, with a 1 s ``teacher_timeout``:
asking a teacher would fail the epoch with NoTeacherError.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SEED_CONFIG, child_env, child_pids
from reader_models import K, make_sample, tag_rows
from test_reader import check_epoch
from test_sequences import MAX_LENGTH, check_sequences, sequence_reader

from distill_reader import (
    ConfigError,
    DistillReader,
    FakeDistillReader,
    StoreError,
    StoreMismatchError,
    StoreMissingError,
)
from distill_reader.bench.sequence import sequence_config
from distill_reader.cli import main
from distill_reader.knowledge.commands import summarize, verify

pytestmark = pytest.mark.timeout(60)

N = 120
NOWHERE = ["127.0.0.1:1"]  # no teacher listens here


def store_config(write_config, servers, path: Path, policy: str, extra: str = "", text: str | None = None) -> Path:
    base = text if text is not None else SEED_CONFIG.format(servers=list(servers), extra="")
    return write_config(text=f"{base}\n[store]\npath = {path}\npolicy = {policy}\n{extra}")


def reader(conf: Path, **options) -> DistillReader:
    return DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=1, **options)


def samples(order) -> callable:
    return lambda: (make_sample(int(i)) for i in order)


def epoch_of(dr: DistillReader) -> list[list[np.ndarray]]:
    return list(dr.distill_reader()())


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tag_teachers) -> Path:
    """A store of samples 0 … N-1 by position, captured with policy write."""
    path = tmp_path_factory.mktemp("knowledge") / "store"
    conf = tmp_path_factory.mktemp("conf") / "write.conf"
    conf.write_text(f"{SEED_CONFIG.format(servers=tag_teachers, extra='')}\n[store]\npath = {path}\npolicy = write\n")
    dr = reader(conf)
    dr.set_sample_generator(samples(range(N)))
    with dr:
        check_epoch(epoch_of(dr), N, 16)
    return path


def test_read_never_asks_a_teacher_with_every_reader_kind(write_config, captured):
    dr = reader(store_config(write_config, NOWHERE, captured, "read"))
    lists = lambda: ([make_sample(i) for i in range(s, min(s + 7, N))] for s in range(0, N, 7))  # noqa: E731

    def columns():
        for start in range(0, N, 10):
            chunk = [make_sample(i) for i in range(start, start + 10)]
            yield [np.stack([s[0] for s in chunk]), np.stack([s[1] for s in chunk])]

    with dr:
        for kind, source in (("sample", samples(range(N))), ("sample_list", lists), ("batch", columns)):
            getattr(dr, f"set_{kind}_generator")(source)
            for _ in range(2):
                check_epoch(epoch_of(dr), N, 16)
        assert not dr.stats().teachers  # no teacher was ever set up


def test_read_names_a_missing_key_in_the_loop(write_config, captured):
    dr = reader(store_config(write_config, NOWHERE, captured, "read"))
    dr.set_sample_generator(samples(range(N + 10)))
    got = []
    with dr:
        with pytest.raises(StoreMissingError, match=rf"no row under key {N} \(the sample's position in the epoch\)"):
            for batch in dr.distill_reader()():
                got.append(batch)
        check_epoch(got, len(got) * 16, 16)  # every batch before the one with the missing row
        # The failure does not outlive its epoch: the next one, of rows the store has, is whole.
        dr.set_sample_generator(samples(range(N)))
        check_epoch(epoch_of(dr), N, 16)


def test_torch_dataset_reads_the_store(write_config, captured):
    pytest.importorskip("torch")
    from distill_reader.torch import DistillDataset

    dr = reader(store_config(write_config, NOWHERE, captured, "read"))
    dr.set_sample_generator(samples(range(N)))
    with dr:
        check_epoch([[t.numpy() for t in batch] for batch in DistillDataset(dr)], N, 16)


def test_cache_asks_only_for_what_is_missing(write_config, tag_teachers, captured, tmp_path, caplog):
    path = tmp_path / "store"
    shutil.copytree(captured, path)
    caplog.set_level(logging.INFO, "distill_reader")  # before the reader: its pipeline process takes the level
    dr = reader(store_config(write_config, tag_teachers, path, "cache"))
    dr.set_sample_generator(samples(range(N + 40)))  # 40 samples more than the store has
    with dr:
        for _ in range(2):
            check_epoch(epoch_of(dr), N + 40, 16)
    # epoch 1: N rows from the store, 40 from the teachers (recorded); epoch 2: all from the store
    assert f"{2 * N + 40} rows read from it, 40 recorded" in caplog.text
    summary = summarize(path)
    assert summary.keys == N + 40 and summary.rows == N + 40
    assert verify(path)[1] == []


def test_shuffled_reader_with_key_var(write_config, tag_teachers, tmp_path):
    path = tmp_path / "store"
    rng = np.random.default_rng(1)
    for policy, servers in (("cache", tag_teachers), ("read", NOWHERE)):
        order = rng.permutation(N)  # another order every epoch
        dr = reader(store_config(write_config, servers, path, policy, "key_var = label"))
        dr.set_sample_generator(samples(order))
        with dr:
            batches = epoch_of(dr)
        labels = np.concatenate([b[1] for b in batches])[:, 0]
        np.testing.assert_array_equal(labels, order)
        for img, label, prediction in batches:
            np.testing.assert_array_equal(img, np.stack([make_sample(int(i))[0] for i in label[:, 0]]))
            np.testing.assert_array_equal(prediction, tag_rows(img))
    assert summarize(path).manifest["key"] == "var label"


def test_a_changed_sample_under_an_old_key(write_config, tag_teachers, captured, tmp_path, caplog):
    """Sample 1005 at position 5: read refuses it naming the key; cache asks again and replaces it."""
    path = tmp_path / "store"
    shutil.copytree(captured, path)
    order = [1005 if i == 5 else i for i in range(N)]

    def check(batches):
        img = np.concatenate([b[0] for b in batches])
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:, 0], order)
        np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), tag_rows(img))

    dr = reader(store_config(write_config, NOWHERE, path, "read"))
    dr.set_sample_generator(samples(order))
    with dr, pytest.raises(StoreMismatchError, match=r"sample under key 5 \(the sample's position.*differ"):
        epoch_of(dr)
    dr = reader(store_config(write_config, tag_teachers, path, "cache"))
    dr.set_sample_generator(samples(order))
    with dr:
        check(epoch_of(dr))
    assert re.search(r"WARNING.*key 5 .*asked the teacher again, the new answer replaces it", caplog.text)
    dr = reader(store_config(write_config, NOWHERE, path, "read"))  # the new row is read back
    dr.set_sample_generator(samples(order))
    with dr:
        check(epoch_of(dr))


def test_a_store_of_another_config_is_refused(write_config, captured):
    fetch12 = SEED_CONFIG.format(servers=NOWHERE, extra="").replace("fetch_shapes = [(10, )]", "fetch_shapes = [(12,)]")
    with pytest.raises(StoreError, match=r"another config: output 'prediction' is float32 \(10,\) in the store, "):
        reader(store_config(write_config, NOWHERE, captured, "read", text=fetch12))
    other_model = SEED_CONFIG.format(servers=NOWHERE, extra="model_name = big")
    with pytest.raises(StoreError, match=r"teacher_model 'teacher' in the store, 'big' in this config"):
        reader(store_config(write_config, NOWHERE, captured, "cache", text=other_model))
    with pytest.raises(StoreError, match=r"key 'position' in the store, 'var label' in this config"):
        reader(store_config(write_config, NOWHERE, captured, "write", "key_var = label"))
    with pytest.raises(StoreError, match=r"no knowledge store at .* policy = read needs a store captured"):
        reader(store_config(write_config, NOWHERE, captured.parent / "nothing", "read"))


@pytest.mark.parametrize(
    "extra, message",
    [
        ("policy = cache", r"\[store\] path: missing key"),
        ("path = s\npolicy = copy", r"\[store\] policy: unknown policy 'copy'; expected one of write, read, cache"),
        ("path = s\npolicy = read\nkey_var = id", r"\[store\] key_var: 'id' is not a feed var"),
        ("path = s\npolicy = read\nkey_var = img", r"\[store\] key_var: 'img' must hold one integer per sample"),
        ("path = s\npolicy = read\npolcy = x", r"\[store\] polcy: unknown key; did you mean policy\?"),
        ("path = s3://bucket/x\npolicy = read", r"\[store\] path: 's3://bucket/x' is a URL"),
    ],
)
def test_store_config_errors_name_the_key(write_config, extra, message):
    conf = write_config(text=f"{SEED_CONFIG.format(servers=NOWHERE, extra='')}\n[store]\n{extra}\n")
    with pytest.raises(ConfigError, match=message):
        FakeDistillReader(conf, 4)


def test_fake_reader_ignores_the_store(write_config, tmp_path):
    fake = FakeDistillReader(store_config(write_config, NOWHERE, tmp_path / "none", "read"), 16)
    fake.set_sample_generator(samples(range(20)))
    assert [len(b[0]) for b in fake.distill_reader()()] == [16, 4]
    assert not (tmp_path / "none").exists()


def test_cli_info_and_verify(captured):
    runner = CliRunner()
    result = runner.invoke(main, ["store", "info", str(captured)])
    assert result.exit_code == 0, result.output
    assert f"rows:           {N}" in result.output and "outputs:        prediction float32 (10,)" in result.output
    assert "teacher model:  teacher" in result.output and "key:            position" in result.output
    result = runner.invoke(main, ["store", "verify", str(captured)])
    assert result.exit_code == 0 and result.output.startswith(f"ok: {N} rows"), result.output


# The capture run that is killed: logs (DEBUG) go to stderr, among them each chunk committed.
CAPTURE = """
import logging, sys, threading, time
from reader_models import make_sample
from distill_reader import DistillReader
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(message)s")
committed = threading.Event()

class CommitWatch(logging.Handler):  # after basicConfig's handler: the line is on stderr when it is set
    def emit(self, record):
        if "committed" in record.getMessage():
            committed.set()

logging.getLogger().addHandler(CommitWatch())
dr = DistillReader(sys.argv[1], 16, 4, capacity=4, occupied_capacity=1)
dr.set_sample_generator(lambda: (make_sample(i) for i in range(int(sys.argv[2]))))
for k, batch in enumerate(dr.distill_reader()()):
    print(f"batch {k}", file=sys.stderr, flush=True)
    if k == 5 and not committed.wait(30):  # the pause: the pipeline process goes idle and commits
        sys.exit("no chunk committed within 30 s of the training loop pausing")
    time.sleep(0.01)
time.sleep(60)
"""


@pytest.mark.timeout(90)
def test_a_capture_killed_mid_way_is_complete_after_a_rerun(write_config, tag_teachers, tmp_path, caplog):
    """SIGKILL the capture (its pipeline process first) after its first chunk: the store reads back
    every row it reported written, exact, and nothing of the rest; a cache run completes it."""
    n = 1200
    path = tmp_path / "store"
    conf = store_config(write_config, tag_teachers, path, "write")
    process = subprocess.Popen(
        [sys.executable, "-c", CAPTURE, str(conf), str(n)], env=child_env(), stderr=subprocess.PIPE, text=True
    )
    committed = 0
    try:
        for line in process.stderr:  # (the test's timeout bounds this)
            match = re.search(r"committed (\d+) rows", line)
            committed += int(match.group(1)) if match else 0
            if committed and line.startswith("batch 30"):
                break  # in full swing again after the pause: rows recorded, not yet written
        for pid in child_pids(process.pid):  # the pipeline process, then the training process
            os.kill(pid, signal.SIGKILL)
        process.kill()
    finally:
        process.kill()
        process.wait(10)
    assert committed, "the capture committed no chunk before it was killed"
    summary = summarize(path)
    assert committed <= summary.keys < n
    shutil.copy(next((path / "chunks").glob("*.arrow")), path / "chunks" / ".unfinished.arrow.tmp")
    with open(path / "chunks" / ".unfinished.arrow.tmp", "r+b") as fh:
        fh.truncate(1000)  # what a writer killed in the middle of a chunk leaves (ignored)

    dr = reader(store_config(write_config, NOWHERE, path, "read"))
    dr.set_sample_generator(samples(range(summary.keys)))  # by position: the first rows were captured
    with dr:
        check_epoch(epoch_of(dr), summary.keys, 16)

    caplog.set_level(logging.INFO, "distill_reader")  # before the reader: its pipeline process takes the level
    dr = reader(store_config(write_config, tag_teachers, path, "cache"))
    dr.set_sample_generator(samples(range(n)))
    with dr:
        check_epoch(epoch_of(dr), n, 16)
    assert f"{summary.keys} rows read from it, {n - summary.keys} recorded" in caplog.text
    done, problems = verify(path)
    assert problems == [] and done.keys == n and done.partial == [".unfinished.arrow.tmp"]


def test_sequences_are_stored_without_padding(write_config, teachers, tmp_path):
    endpoint = teachers.start("reader_models:seq_tag")
    path = tmp_path / "store"
    n = 90
    text = sequence_config([endpoint], MAX_LENGTH, K, values_dtype="float32", output="")
    for policy, servers in (("write", [endpoint]), ("read", NOWHERE)):
        conf = store_config(write_config, servers, path, policy, text=text.replace(f"[{endpoint!r}]", repr(servers)))
        dr = DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=1)
        dr.set_sample_list_generator(sequence_reader("sample_list", n))
        with dr:
            check_sequences(epoch_of(dr), n, 16)
    summary = summarize(path)
    tokens = sum(1 + (i * 7919) % MAX_LENGTH for i in range(n))  # make_sequence's lengths
    outputs = tokens * K * (4 + 4)  # top-k values float32 and indices int32 of every real token
    assert summary.keys == n and outputs < summary.bytes < outputs + n * 64 + 4096  # no padding stored
    assert verify(path)[1] == []


def test_a_failed_chunk_write_fails_one_epoch_and_the_next_ones_work(write_config, tag_teachers, tmp_path, caplog):
    """The store's chunk folder becomes unwritable (a file stands where it was), then is fixed: the
    epoch that finds the failure raises StoreError naming the store, the next ones are whole, and
    the rows lost with the failed chunk are recorded again."""
    path = tmp_path / "store"
    caplog.set_level(logging.WARNING, "distill_reader")
    dr = reader(store_config(write_config, tag_teachers, path, "cache"))
    dr.set_sample_generator(samples(range(N)))
    chunks, away = path / "chunks", path / "chunks-away"
    with dr:
        batches = []
        for batch in dr.distill_reader()():
            batches.append(batch)
            if len(batches) == -(-N // 16):
                # The last batch: every row of the epoch is recorded, held in memory until 1 s without
                # records; broken now, in the epoch, the folder is broken when they are committed.
                chunks.rename(away)
                chunks.write_text("not a folder")
        check_epoch(batches, N, 16)
        deadline = time.monotonic() + 20  # the writer tries to commit the epoch's rows, and fails
        while not any("knowledge store" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(r.levelno == logging.ERROR and "failed" in r.getMessage() for r in caplog.records)
        with pytest.raises(StoreError, match=re.escape(str(path))):
            epoch_of(dr)
        chunks.unlink()
        away.rename(chunks)
        for _ in range(2):
            check_epoch(epoch_of(dr), N, 16)
    assert summarize(path).keys == N and verify(path)[1] == []
