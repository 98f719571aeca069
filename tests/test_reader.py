"""DistillReader end to end against real teacher servers on loopback."""

from __future__ import annotations

import gc
import logging
import random
import re
import time

import numpy as np
import pytest
from conftest import child_pids, shm_files
from reader_models import make_sample, tag_rows

from distill_reader import (
    DistillReader,
    DistillReaderError,
    FakeDistillReader,
    NoTeacherError,
    ReaderArgumentError,
    ReaderFunctionError,
    SampleError,
    TeacherError,
    TeacherMismatchError,
)

pytestmark = pytest.mark.timeout(60)


def sample_list_reader(n: int, list_size: int = 8):
    def reader():
        for start in range(0, n, list_size):
            yield [make_sample(i) for i in range(start, min(start + list_size, n))]

    return reader


def expected_batch(start: int, rows: int) -> list[np.ndarray]:
    """What the tag teachers' batch of samples ``start .. start + rows - 1`` holds: img, label, prediction."""
    samples = [make_sample(i) for i in range(start, start + rows)]
    img = np.stack([s[0] for s in samples])
    return [img, np.stack([s[1] for s in samples]), tag_rows(img)]


def assert_batch_is(batch: list[np.ndarray], start: int, rows: int) -> None:
    for got, want in zip(batch, expected_batch(start, rows), strict=True):
        np.testing.assert_array_equal(got, want)


def pool_of(dr: DistillReader) -> np.ndarray:
    """The reader's whole shared-memory pool, as bytes (to tell views of it from copies)."""
    return np.frombuffer(dr._holder.pipeline._buffer.mmap, np.uint8)


def check_epoch(batches: list[list[np.ndarray]], n: int, batch_size: int) -> None:
    """Every sample exactly once, in order, with the teacher output of that very sample."""
    sizes = [len(b[0]) for b in batches]
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    labels = np.concatenate([b[1] for b in batches])[:, 0]
    np.testing.assert_array_equal(labels, np.arange(n))
    for img, label, prediction in batches:
        assert img.dtype == np.float32 and label.dtype == np.int64 and prediction.dtype == np.float32
        np.testing.assert_array_equal(img, np.stack([make_sample(i)[0] for i in label[:, 0]]))
        np.testing.assert_array_equal(prediction, tag_rows(img))


def test_seed_guide_example(write_config, tag_teachers):
    """The guide's example: lists of 8 samples, 24 times, then 2; 32/4, capacity 4, occupied 2."""

    def _reader():
        for i in range(24):
            yield [make_sample(i * 8 + j) for j in range(8)]
        yield [make_sample(192 + j) for j in range(2)]

    dr = DistillReader(write_config(tag_teachers), 32, 4, capacity=4, occupied_capacity=2)
    dr.set_sample_list_generator(_reader)
    distill_reader = dr.distill_reader()
    for _epoch in range(10):
        batches = []
        for batch in distill_reader():
            batches.append([a.copy() for a in batch])
        check_epoch(batches, 194, 32)
        # The guide's example uses the last (short) batch after the loop: its views, not a copy,
        # still hold samples 192 and 193 with their teacher outputs.
        assert all(np.shares_memory(a, pool_of(dr)) for a in batch)
        assert_batch_is(batch, 192, 2)
    dr.close()


@pytest.mark.parametrize(
    ("kind", "n", "batch_size", "d_batch_size"),
    [("sample", 101, 10, 3), ("sample_list", 97, 16, 16), ("batch", 130, 32, 5), ("sample", 5, 8, 2)],
)
def test_reader_kinds_order_and_short_batches(write_config, tag_teachers, kind, n, batch_size, d_batch_size):
    dr = DistillReader(write_config(tag_teachers), batch_size, d_batch_size, capacity=3, occupied_capacity=0, copy=True)
    if kind == "sample":
        dr.set_sample_generator(lambda: (make_sample(i) for i in range(n)))
    elif kind == "sample_list":
        dr.set_sample_list_generator(sample_list_reader(n, 7))
    else:

        def batches():
            start = 0
            for size in [7, 1, 30, 2] * 100:
                if start >= n:
                    return
                samples = [make_sample(i) for i in range(start, min(start + size, n))]
                yield [np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])]
                start += size

        dr.set_batch_generator(batches)
    with dr:
        for _ in range(3):
            check_epoch(list(dr.distill_reader()()), n, batch_size)


@pytest.mark.parametrize(("occupied", "capacity"), [(0, 1), (1, 2), (2, 3), (2, 5)])
def test_views_stay_valid_for_occupied_capacity(write_config, tag_teachers, occupied, capacity):
    """A yielded batch's arrays are views into the pool and keep their content until the loop has
    taken ``occupied_capacity`` further batches, across the end of an epoch too (its last, short
    batch stays valid while the next epoch's first batches are taken)."""
    n, batch_size = 51, 4  # 12 full batches and one of 3 rows per epoch
    dr = DistillReader(write_config(tag_teachers), batch_size, 2, capacity=capacity, occupied_capacity=occupied)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(n)))
    taken: list[tuple[list[np.ndarray], int, int]] = []  # every batch yielded (views), its first sample, rows
    with dr:
        for _epoch in range(2):
            start = 0
            for batch in dr.distill_reader()():
                rows = len(batch[0])
                assert all(np.shares_memory(a, pool_of(dr)) for a in batch)
                taken.append((batch, start, rows))
                # This batch and the `occupied` before it, unchanged:
                for views, first, count in taken[-(occupied + 1) :]:
                    assert_batch_is(views, first, count)
                if capacity == occupied + 1 and len(taken) > capacity:
                    # The pool has no other free slot: this batch reuses the slot of the batch taken
                    # `capacity` batches ago, whose views now show this batch (they were views).
                    old = taken[-1 - capacity][0]
                    assert all(np.shares_memory(a, b) for a, b in zip(old, batch))
                    common = min(len(old[0]), rows)  # either may be an epoch's short last batch
                    assert_batch_is([a[:common] for a in old], start, common)
                start += rows
            assert start == n and rows == 3
    assert len(taken) == 26


def test_copy_true_batches_are_independent_of_the_pool(write_config, tag_teachers):
    """With ``copy=True`` batches are copies: they keep their content after their slot is reused."""
    dr = DistillReader(write_config(tag_teachers), 4, 2, capacity=1, occupied_capacity=0, copy=True)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(51)))
    with dr:
        first = []
        for batch in dr.distill_reader()():
            assert not any(np.shares_memory(a, pool_of(dr)) for a in batch)
            first.append(batch)
        second = list(dr.distill_reader()())  # the one slot is reused 13 more times
    check_epoch(first, 51, 4)
    check_epoch(second, 51, 4)


@pytest.mark.parametrize(("occupied", "capacity"), [(0, 1), (2, 3), (1, 3)])
def test_rows_in_flight_during_a_step(write_config, tag_teachers, occupied, capacity):
    """The sizing rule: while the loop works on a batch it holds ``occupied_capacity + 1`` slots (that
    batch and the ``occupied_capacity`` before it), so the pipeline can fill at most
    ``capacity - occupied_capacity - 1`` slots ahead. With ``capacity == occupied_capacity + 1`` it
    fills only while the loop asks for the next batch, and the epoch is still whole and correct."""
    n, batch_size = 50, 4
    pulled = [0]  # samples the feeder has taken from the reader

    def reader():
        for i in range(n):
            pulled[0] += 1
            yield make_sample(i)

    dr = DistillReader(write_config(tag_teachers), batch_size, 2, capacity=capacity, occupied_capacity=occupied)
    dr.set_sample_generator(reader)
    batches, end = [], 0
    with dr:
        for step, batch in enumerate(dr.distill_reader()()):
            end += len(batch[0])
            batches.append([a.copy() for a in batch])
            # Rows the pipeline may have beyond this batch: the slots the loop does not hold (it
            # holds fewer earlier batches in the first steps), plus one sample the feeder may have
            # taken from the reader and not yet placed.
            held = min(step, occupied) + 1
            ahead = (capacity - held) * batch_size + 1
            for _ in range(3):  # a training step
                assert pulled[0] <= min(n, end + ahead), (step, end, pulled[0])
                time.sleep(0.01)
    check_epoch(batches, n, batch_size)


def test_early_break_anywhere_then_whole_epochs(write_config, tag_teachers):
    rng = random.Random(7)
    dr = DistillReader(write_config(tag_teachers), 8, 3, capacity=4, occupied_capacity=1)
    dr.set_sample_list_generator(sample_list_reader(150, 5))
    epoch_reader = dr.distill_reader()
    with dr:
        for _ in range(15):
            stop_at = rng.randrange(0, 19)
            for step, _batch in enumerate(epoch_reader()):
                if step == stop_at:
                    break
            check_epoch([[a.copy() for a in b] for b in epoch_reader()], 150, 8)
        # A generator left open (not closed by `break`) is stopped when the next epoch starts.
        dangling = epoch_reader()
        next(dangling)
        check_epoch([[a.copy() for a in b] for b in epoch_reader()], 150, 8)
        del dangling


def test_onnx_teacher_outputs_match_the_model(tmp_path, teachers):
    from distill_reader.demo.digits import load_digits_split, train_teacher, write_onnx, write_reader_config

    data = load_digits_split()
    weights = train_teacher(data, hidden=16)
    model = write_onnx(weights, tmp_path / "digits.onnx")
    endpoint = teachers.start(str(model), "--name", "digits")
    config = write_reader_config(tmp_path / "digits.conf", [endpoint])
    dr = DistillReader(config, 50, 7, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_generator(lambda: ((x, np.array([y])) for x, y in zip(data.x_train, data.y_train)))
    with dr:
        batches = list(dr.distill_reader()())
    pixels = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(pixels, data.x_train)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:, 0], data.y_train)
    logits = np.concatenate([b[2] for b in batches])
    np.testing.assert_allclose(logits, weights.logits(data.x_train), rtol=1e-4, atol=1e-4)


def test_serving_conf_file_maps_alias_names(tmp_path, write_config, teachers):
    endpoint = teachers.start("reader_models:tag_paddle_names")
    (tmp_path / "serving_client_conf.prototxt").write_text(
        'feed_var { name: "image" alias_name: "img" is_lod_tensor: false feed_type: 1 shape: 1 shape: 4 shape: 4 }\n'
        'fetch_var { name: "scale_0.tmp_0" alias_name: "prediction" fetch_type: 1 shape: 10 }\n'
    )
    config = write_config([endpoint], extra="serving_conf_file = serving_client_conf.prototxt\n")
    dr = DistillReader(config, 16, 4, capacity=2, occupied_capacity=0, copy=True)
    dr.set_sample_list_generator(sample_list_reader(40))
    with dr:
        check_epoch(list(dr.distill_reader()()), 40, 16)


# -- errors reach the training loop ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ((np.zeros((1, 4, 4), np.float32),), "sample 3 has 1 fields; expected 2"),
        ((np.zeros((4, 4), np.float32), np.array([3])), "sample 3, field 0 ('img'): shape (4, 4), expected (1, 4, 4)"),
        (
            (np.zeros((1, 4, 4), np.float64), np.array([3])),
            "sample 3, field 0 ('img'): dtype float64, expected float32",
        ),
        ((np.zeros((1, 4, 4), np.float32), np.array([3], np.int32)), "field 1 ('label'): dtype int32, expected int64"),
    ],
)
def test_bad_sample_raises_in_the_loop(write_config, tag_teachers, sample, message):
    def reader():
        for i in range(3):
            yield make_sample(i)
        yield sample
        yield from (make_sample(i) for i in range(4, 20))

    dr = DistillReader(write_config(tag_teachers), 2, 1, capacity=4, occupied_capacity=0)
    dr.set_sample_generator(reader)
    with dr:
        seen = 0
        with pytest.raises(SampleError) as info:
            for batch in dr.distill_reader()():
                seen += len(batch[0])
        assert message in str(info.value)
        assert seen <= 3
        # The reader recovers: the next epoch with good samples runs whole.
        dr.set_sample_generator(lambda: (make_sample(i) for i in range(20)))
        check_epoch([[a.copy() for a in b] for b in dr.distill_reader()()], 20, 2)


def test_exception_in_user_reader_reaches_the_loop(write_config, tag_teachers):
    def reader():
        yield from (make_sample(i) for i in range(10))
        raise KeyError("corrupt record 10")

    dr = DistillReader(write_config(tag_teachers), 4, 2, capacity=4, occupied_capacity=0)
    dr.set_sample_generator(reader)
    with dr, pytest.raises(ReaderFunctionError, match="KeyError after 10 samples: 'corrupt record 10'") as info:
        list(dr.distill_reader()())
    assert isinstance(info.value.__cause__, KeyError)


def test_teacher_error_reaches_the_loop(write_config, teachers):
    endpoint = teachers.start("reader_models:broken")
    dr = DistillReader(write_config([endpoint]), 4, 2, capacity=2, occupied_capacity=0)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(10)))
    with dr, pytest.raises(TeacherError, match="the teacher model is broken"):
        list(dr.distill_reader()())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("feed_shapes = [(1, 4, 4), (1,)]", "feed_shapes = [(1, 2, 8), (1,)]"), "[feed] var 'img': shape [1, 2, 8]"),
        (("fetch_types = ['float32']", "fetch_types = ['float16']"), "[fetch] var 'prediction': dtype float16"),
        (("fetch_vars = ['prediction']", "fetch_vars = ['probs']"), "[fetch] var 'probs'"),
        (("[conf]\n", "[conf]\nmodel_name = 'resnet'\n"), "model 'resnet'"),
    ],
)
def test_metadata_mismatch_names_the_var(write_config, tag_teachers, change, message):
    from conftest import SEED_CONFIG

    text = SEED_CONFIG.format(servers=tag_teachers, extra="").replace(*change)
    shape = (1, 2, 8) if "(1, 2, 8)" in change[1] else (1, 4, 4)
    dr = DistillReader(write_config(text=text), 4, 2, capacity=2, occupied_capacity=0)
    dr.set_sample_generator(lambda: ((make_sample(i)[0].reshape(shape), make_sample(i)[1]) for i in range(10)))
    with dr, pytest.raises(TeacherMismatchError) as info:
        list(dr.distill_reader()())
    assert message in str(info.value)


def test_no_teacher_warns_then_raises(write_config, caplog):
    from conftest import free_port

    dr = DistillReader(
        write_config([f"127.0.0.1:{free_port()}"]), 4, 2, capacity=2, occupied_capacity=0, teacher_timeout=2
    )
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(10)))
    with (
        caplog.at_level(logging.WARNING, logger="distill_reader"),
        dr,
        pytest.raises(NoTeacherError, match="no teacher answered for 2 s"),
    ):
        list(dr.distill_reader()())
    assert any("no teacher answers" in r.getMessage() for r in caplog.records)


def test_teacher_killed_mid_epoch_loses_nothing(write_config, teachers):
    endpoints = [teachers.start("reader_models:slow_tag") for _ in range(2)]
    dr = DistillReader(write_config(endpoints), 16, 4, capacity=6, occupied_capacity=1, copy=True)
    n = 800
    dr.set_sample_list_generator(sample_list_reader(n, 8))
    with dr:
        batches = []
        for step, batch in enumerate(dr.distill_reader()()):
            batches.append(batch)
            if step == 5:
                teachers.kill(endpoints[0])
        check_epoch(batches, n, 16)
        # And the next epoch runs on the survivor.
        check_epoch(list(dr.distill_reader()()), n, 16)


# -- lifecycle ------------------------------------------------------------------------------------
def test_close_and_drop_leave_no_process_or_shared_memory(write_config, tag_teachers):
    before_children, before_shm = child_pids(), shm_files()
    dr = DistillReader(write_config(tag_teachers), 8, 4, capacity=3, occupied_capacity=1)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(50)))
    for _ in dr.distill_reader()():
        break
    assert len(child_pids() - before_children) == 1  # the pipeline process
    dr.close()
    assert child_pids() == before_children
    assert shm_files() == before_shm

    dr = DistillReader(write_config(tag_teachers), 8, 4, capacity=3, occupied_capacity=1)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(50)))
    batches = dr.distill_reader()()
    next(batches)
    del dr, batches
    gc.collect()
    assert child_pids() == before_children
    assert shm_files() == before_shm


def test_fake_reader_raises_like_distill_reader(write_config):
    """FakeDistillReader's errors are DistillReader's: the user's exception as ReaderFunctionError
    (same message, original as __cause__), a bad sample as SampleError, a non-function as
    ReaderArgumentError."""
    fake = FakeDistillReader(write_config(["127.0.0.1:1"]), batch_size=4)

    def failing():
        yield from (make_sample(i) for i in range(10))
        raise KeyError("corrupt record 10")

    fake.set_sample_generator(failing)
    with pytest.raises(ReaderFunctionError, match="KeyError after 10 samples: 'corrupt record 10'") as info:
        list(fake.distill_reader()())
    assert isinstance(info.value.__cause__, KeyError)

    def not_a_generator():
        raise OSError("no such file: train.rec")

    fake.set_sample_generator(not_a_generator)
    with pytest.raises(ReaderFunctionError, match="the reader function raised OSError: no such file") as info:
        list(fake.distill_reader()())
    assert isinstance(info.value.__cause__, OSError)

    fake.set_sample_generator(lambda: iter([make_sample(0), (np.zeros((4, 4), np.float32), np.array([1]))]))
    with pytest.raises(SampleError, match=re.escape("sample 1, field 0 ('img'): shape (4, 4), expected (1, 4, 4)")):
        list(fake.distill_reader()())

    with pytest.raises(ReaderArgumentError, match="must be a function returning an iterable, got list") as arg:
        fake.set_sample_generator([make_sample(0)])
    assert isinstance(arg.value, TypeError)


def test_reader_argument_that_is_not_a_function(write_config, tag_teachers):
    dr = DistillReader(write_config(tag_teachers), 4, 2, capacity=2, occupied_capacity=0)
    for setter in (dr.set_sample_generator, dr.set_sample_list_generator, dr.set_batch_generator):
        with pytest.raises(ReaderArgumentError, match="must be a function returning an iterable, got generator"):
            setter(make_sample(i) for i in range(4))
    with pytest.raises(DistillReaderError, match="no reader set"):
        dr.distill_reader()


def test_fake_reader_appends_zero_outputs(write_config):
    fake = FakeDistillReader(write_config(["127.0.0.1:1"]), batch_size=8)
    fake.set_sample_list_generator(sample_list_reader(21, 5))
    batches = list(fake.distill_reader()())
    assert [len(b[0]) for b in batches] == [8, 8, 5]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:, 0], np.arange(21))
    assert all(b[2].shape == (len(b[0]), 10) and not b[2].any() for b in batches)


def test_stats_and_profile_lines(write_config, tag_teachers, monkeypatch, capfd):
    monkeypatch.setenv("DISTILL_READER_PROFILE", "1")
    dr = DistillReader(write_config(tag_teachers), 10, 5, capacity=4, occupied_capacity=1)
    dr.set_sample_list_generator(sample_list_reader(95))
    with dr:
        assert len(list(dr.distill_reader()())) == 10
        deadline = time.monotonic() + 5
        while len(dr.stats().teachers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = dr.stats()
    assert (stats.samples, stats.batches) == (95, 10)
    assert stats.consumer_wait_seconds > 0
    assert sorted(t.endpoint for t in stats.teachers) == sorted(tag_teachers)
    assert sum(t.requests for t in stats.teachers) >= 19  # 95 rows in requests of at most 5
    assert all(t.healthy and t.in_flight == 0 for t in stats.teachers)
    assert any(t.latency_ms_p50 is not None and t.latency_ms_p50 > 0 for t in stats.teachers)
    assert "95 samples in 10 batches" in stats.summary()
    profile = [line for line in capfd.readouterr().err.splitlines() if line.startswith("distill-reader profile")]
    assert len(profile) == 10 and "fill" in profile[0] and "teachers" in profile[0]
