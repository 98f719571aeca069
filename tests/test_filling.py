"""The feeder's slot filling and d_batch cutting, without processes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distill_reader.oip import TensorSpec
from distill_reader.reader.filling import SlotFiller

SPECS = (TensorSpec("x", np.dtype("float32"), (2,)), TensorSpec("id", np.dtype("int64"), (1,)))


def fill(kind: str, chunks, batch_size: int, d_batch_size: int = 3):
    """Fill slots; check that d_batches tile each slot, in order, before it is sealed."""
    slots: list[tuple[list[np.ndarray], int]] = []
    d_batches: dict[int, list[tuple[int, int]]] = {}

    def on_d_batch(slot, start, count):
        assert 0 < count <= d_batch_size and start == sum(c for _, c in d_batches.get(slot, []))
        d_batches.setdefault(slot, []).append((start, count))

    def on_sealed(slot, rows):
        assert sum(c for _, c in d_batches[slot]) == rows
        slots.append((arrays[slot], rows))

    arrays: dict[int, list[np.ndarray]] = {}

    def acquire():
        slot = len(arrays)
        arrays[slot] = [np.zeros((batch_size, *s.shape), s.dtype) for s in SPECS]
        return slot, arrays[slot]

    filler = SlotFiller(
        SPECS,
        batch_size,
        d_batch_size,
        SimpleNamespace(acquire=acquire),
        SimpleNamespace(written=on_d_batch, sealed=on_sealed),
    )
    add = filler.adder(kind)
    for chunk in chunks:
        assert add(chunk)
    filler.finish()
    return slots


@given(sizes=st.lists(st.integers(0, 9), max_size=12), batch_size=st.integers(1, 7), d_batch_size=st.integers(1, 8))
def test_every_kind_fills_in_order_with_a_short_last_slot(sizes, batch_size, d_batch_size):
    n = sum(sizes)
    samples = [(np.full(2, i, np.float32), np.array([i])) for i in range(n)]
    lists, start = [], 0
    for size in sizes:
        lists.append(samples[start : start + size])
        start += size
    columns = [
        [
            np.array([s[0] for s in chunk], np.float32).reshape(-1, 2),
            np.array([s[1] for s in chunk], np.int64).reshape(-1, 1),
        ]
        for chunk in lists
    ]
    for kind, chunks in (("sample", samples), ("sample_list", lists), ("batch", columns)):
        slots = fill(kind, chunks, batch_size, d_batch_size)
        assert [rows for _, rows in slots] == [batch_size] * (n // batch_size) + (
            [n % batch_size] if n % batch_size else []
        )
        ids = np.concatenate([a[1][:rows, 0] for a, rows in slots]) if slots else np.array([])
        np.testing.assert_array_equal(ids, np.arange(n))


def test_a_reader_that_reuses_its_buffer_is_copied_at_once():
    buffer = (np.zeros(2, np.float32), np.zeros(1, np.int64))

    def reused():
        for i in range(5):
            buffer[0][:] = i
            buffer[1][:] = i
            yield buffer

    for kind in ("sample", "sample_list"):
        chunks = reused() if kind == "sample" else ([s] for s in reused())
        ((arrays, rows),) = fill(kind, chunks, 8)
        np.testing.assert_array_equal(arrays[1][:rows, 0], np.arange(5))


def test_python_values_are_converted_and_bad_ones_named():
    ((arrays, rows),) = fill("sample_list", [[([1.5, 2.5], [7])]], 4)
    assert rows == 1 and arrays[0][0].tolist() == [1.5, 2.5] and arrays[1][0, 0] == 7
    from distill_reader import SampleError

    with pytest.raises(SampleError, match=r"sample 1, field 1 \('id'\): cannot convert list"):
        fill("sample_list", [[([1, 2], [1]), ([1, 2], ["seven"])]], 4)
    with pytest.raises(SampleError, match="fields have different batch sizes"):
        fill("batch", [[np.zeros((3, 2), np.float32), np.zeros((2, 1), np.int64)]], 4)
    with pytest.raises(SampleError, match="the sample list generator yielded a ndarray"):
        fill("sample_list", [np.zeros(3)], 4)
