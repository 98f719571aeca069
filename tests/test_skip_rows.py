"""``DistillReader.distill_reader(skip_rows=n)``: the first rows of an epoch never reach a teacher (resuming)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hf_trainer_models import count_row, count_teacher, expected_topk, make_reader, seen_rows

from distill_reader import ConfigError

K = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with count_teacher(tmp_path_factory.mktemp("teacher"), K) as served:
        yield served


@pytest.mark.parametrize("kind", ["sample", "sample_list", "batch"])
@pytest.mark.parametrize("skip", [12, 15, 40, 50])
def test_skipped_rows_are_not_sent_to_the_teacher(tmp_path, teacher, kind, skip):
    """Lists and batches of 5 rows: 12 cuts one, 15 falls between two; 40 skips all, 50 more than all."""
    endpoint, log = teacher
    log.unlink(missing_ok=True)
    with make_reader(tmp_path, endpoint, K, rows=40, kind=kind) as reader:
        got = []
        for _ in range(2):  # every epoch skips them
            for batch in reader.distill_reader(skip_rows=skip)():
                tokens, values, indices, lengths = batch
                for i, n in enumerate(lengths):
                    got.append(tuple(tokens[i, :n].tolist()))
                    want = expected_topk(tokens[i, :n], K)
                    np.testing.assert_array_equal(values[i, :n], want[0])
                    np.testing.assert_array_equal(indices[i, :n], want[1])
    rows = [tuple(count_row(i).tolist()) for i in range(skip, 40)]
    assert got == rows * 2
    assert sorted(seen_rows(log)) == sorted(rows * 2)


def test_skip_rows_must_be_a_count(tmp_path, teacher):
    with make_reader(tmp_path, teacher[0], K, rows=4) as reader:
        for bad in (-1, 1.5, True):
            with pytest.raises(ConfigError, match="skip_rows"):
                reader.distill_reader(skip_rows=bad)
