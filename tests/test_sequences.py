"""Sequence models: variable-length rows (``-1`` dims, ``[conf] max_length``) and per-token outputs.

Every real position of every row is checked against the exact model of ``reader_models`` (the
teacher's per-token outputs of that very row), padding is checked to be 0, and each row must
arrive once, in input order, with its length.
"""

from __future__ import annotations

import numpy as np
import pytest
from reader_models import K, make_sequence, seq_rows

from distill_reader import ConfigError, DistillReader, FakeDistillReader, SampleError
from distill_reader.bench.sequence import sequence_config
from distill_reader.reader.grouping import group_by_length

pytestmark = pytest.mark.timeout(90)

MAX_LENGTH = 24


def seq_config(write_config, servers: list[str], max_length: int = MAX_LENGTH, extra: str = ""):
    text = sequence_config(servers, max_length, K, values_dtype="float32", output="", conf=extra)
    return write_config(text=text)


def check_sequences(batches: list[list[np.ndarray]], n: int, batch_size: int, with_lengths: bool = False) -> None:
    """Every row once, in order; each row's tokens, length and per-token outputs exact, 0 past its
    length; every var cut to its batch's longest row."""
    assert [len(b[0]) for b in batches] == [batch_size] * (n // batch_size) + (
        [n % batch_size] if n % batch_size else []
    )
    ids = np.concatenate([b[1][:, 0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(n))
    for tokens, id_, values, indices, lengths in batches:
        assert lengths.dtype == np.int64 and lengths.shape == (len(tokens),)
        longest = int(lengths.max())
        assert tokens.shape == (len(tokens), longest) and values.shape == indices.shape == (len(tokens), longest, K)
        assert values.dtype == np.float32 and indices.dtype == np.int32
        for row in range(len(tokens)):
            expected, _ = make_sequence(int(id_[row, 0]), MAX_LENGTH)
            length = len(expected)
            assert lengths[row] == length
            np.testing.assert_array_equal(tokens[row, :length], expected)
            want_values, want_indices = seq_rows(expected[None], [length] if with_lengths else None)
            np.testing.assert_array_equal(values[row, :length], want_values[0])
            np.testing.assert_array_equal(indices[row, :length], want_indices[0])
            assert not tokens[row, length:].any() and not values[row, length:].any()
            assert not indices[row, length:].any()


def sequence_reader(kind: str, n: int):
    """A reader of ``kind`` over :func:`make_sequence` samples ``0 … n-1``."""
    samples = [make_sequence(i, MAX_LENGTH) for i in range(n)]
    if kind == "sample":
        return lambda: iter(samples)
    if kind == "sample_list":
        return lambda: (samples[i : i + 5] for i in range(0, n, 5))
    if kind == "batch":  # ragged: a list of rows for the variable var

        def ragged():
            for i in range(0, n, 7):
                chunk = samples[i : i + 7]
                yield [[s[0] for s in chunk], np.stack([s[1] for s in chunk])]

        return ragged

    def padded():  # padded rows followed by their lengths, the layout of the reader's own batches
        for i in range(0, n, 6):
            chunk = samples[i : i + 6]
            lengths = np.array([len(s[0]) for s in chunk])
            tokens = np.zeros((len(chunk), lengths.max() + 3), np.int64)
            for row, (t, _) in enumerate(chunk):
                tokens[row, : len(t)] = t
                tokens[row, len(t) :] = 99  # padding of the user's own: must not reach the teacher
            yield [tokens, np.stack([s[1] for s in chunk]), lengths]

    return padded


@pytest.fixture(scope="module")
def seq_teachers(tmp_path_factory):
    from conftest import TeacherProcesses

    fleet = TeacherProcesses()
    try:
        yield [fleet.start("reader_models:seq_tag"), fleet.start("reader_models:seq_tag")]
    finally:
        fleet.stop_all()


@pytest.mark.parametrize("kind", ["sample", "sample_list", "batch", "padded batch"])
@pytest.mark.parametrize("copy", [False, True])
def test_every_position_of_every_row_is_the_teachers(write_config, seq_teachers, kind, copy):
    n, batch_size = 203, 16
    dr = DistillReader(
        seq_config(write_config, seq_teachers), batch_size, 4, capacity=4, occupied_capacity=1, copy=copy
    )
    reader = sequence_reader(kind, n)
    if kind == "sample":
        dr.set_sample_generator(reader)
    elif kind == "sample_list":
        dr.set_sample_list_generator(reader)
    else:
        dr.set_batch_generator(reader)
    with dr:
        for _ in range(2):
            check_sequences([[a.copy() for a in b] for b in dr.distill_reader()()], n, batch_size)


def test_a_teacher_that_declares_lengths_gets_them(write_config, teachers):
    endpoint = teachers.start("reader_models:seq_tag_lengths")
    dr = DistillReader(seq_config(write_config, [endpoint]), 16, 8, capacity=3, occupied_capacity=1, copy=True)
    dr.set_sample_generator(sequence_reader("sample", 100))
    with dr:
        check_sequences(list(dr.distill_reader()()), 100, 16, with_lengths=True)


def test_bad_rows_name_the_var_and_length(write_config, seq_teachers):
    def too_long():
        yield make_sequence(0)
        yield np.arange(MAX_LENGTH + 1, dtype=np.int64), np.array([1])

    dr = DistillReader(seq_config(write_config, seq_teachers), 4, 2, capacity=2, occupied_capacity=0)
    dr.set_sample_generator(too_long)
    with (
        dr,
        pytest.raises(SampleError, match=rf"'tokens'\): length {MAX_LENGTH + 1} is longer than \[conf\] max_length"),
    ):
        list(dr.distill_reader()())
    dr.set_sample_generator(lambda: iter([(np.zeros((2, 3), np.int64), np.array([0]))]))
    with dr, pytest.raises(SampleError, match=r"'tokens'\): shape \(2, 3\), expected \(-1,\)"):
        list(dr.distill_reader()())


def test_variable_dims_of_one_var_must_agree(write_config):
    text = sequence_config(["127.0.0.1:1"], 8, K, output="").replace(
        "feed_shapes = [(-1,), (1,)]", "feed_shapes = [(-1, -1), (1,)]"
    )
    fake = FakeDistillReader(write_config(text=text), 2)
    fake.set_sample_generator(lambda: iter([(np.zeros((2, 3), np.int64), np.array([0]))]))
    with pytest.raises(SampleError, match=r"shape \(2, 3\): its variable dimensions \(-1, -1\) disagree"):
        list(fake.distill_reader()())


def test_config_needs_max_length(write_config):
    text = sequence_config(["127.0.0.1:1"], 8, K, output="").replace("max_length = 8\n", "")
    with pytest.raises(ConfigError, match=r"\[conf\] max_length: missing key; \[feed\] var 'tokens'"):
        FakeDistillReader(write_config(text=text), 2)


def test_fake_reader_gives_the_same_shapes(write_config):
    fake = FakeDistillReader(seq_config(write_config, ["127.0.0.1:1"]), 8)
    fake.set_sample_generator(sequence_reader("sample", 20))
    batches = list(fake.distill_reader()())
    assert [len(b[0]) for b in batches] == [8, 8, 4]
    for tokens, id_, values, indices, lengths in batches:
        assert tokens.shape == (len(tokens), lengths.max()) and values.shape == (len(tokens), lengths.max(), K)
        assert indices.dtype == np.int32 and not values.any()
        for row in range(len(tokens)):
            expected, _ = make_sequence(int(id_[row, 0]))
            np.testing.assert_array_equal(tokens[row, : len(expected)], expected)
            assert lengths[row] == len(expected) and not tokens[row, len(expected) :].any()


def test_rows_are_grouped_by_length_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 65, size=256)
    groups = group_by_length(lengths, 16)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(256))  # every row once
    assert all(len(g) <= 16 for g in groups)

    def padded(groups: list[np.ndarray]) -> int:
        return sum(len(g) * int(lengths[g].max()) for g in groups)

    in_order = [np.arange(i, min(i + 16, 256)) for i in range(0, 256, 16)]
    assert padded(groups) / lengths.sum() < 1.1 < padded(in_order) / lengths.sum()


def test_torch_dataset_with_variable_rows(write_config, seq_teachers):
    torch = pytest.importorskip("torch")
    from distill_reader.torch import DistillDataset

    dr = DistillReader(seq_config(write_config, seq_teachers), 16, 4, capacity=4, occupied_capacity=1, copy=True)
    dr.set_sample_generator(sequence_reader("sample", 50))
    with dr:
        batches = [[t.numpy().copy() for t in batch] for batch in DistillDataset(dr)]
        assert all(isinstance(t, torch.Tensor) for t in next(iter(DistillDataset(dr))))
    check_sequences(batches, 50, 16)
