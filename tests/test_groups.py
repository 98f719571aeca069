"""Teacher groups (``[teacher NAME]``): every sample goes to a teacher of each group, end to end
against real teacher servers on loopback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import free_port, settled_stats
from reader_models import label_rows, make_sample, tag_rows

from distill_reader import DistillReader, NoTeacherError

pytestmark = pytest.mark.timeout(120)

TWO_GROUPS = """\
[conf]
mode = fixed

[teacher a]
servers = {a!r}

[teacher b]
servers = {b!r}
predict_feed_ids = [1]

[feed]
feed_vars = ['img', 'label']
feed_types = ['float32', 'int64']
feed_shapes = [(1, 4, 4), (1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['a.prediction', 'b.prediction']
fetch_types = ['float32', 'float32']
fetch_shapes = [(10,), (3,)]
"""


def two_groups(tmp_path, a: list[str], b: list[str]):
    path = tmp_path / "groups.conf"
    path.write_text(TWO_GROUPS.format(a=a, b=b))
    return path


def sample_lists(n: int, size: int = 8):
    def reader():
        for start in range(0, n, size):
            yield [make_sample(i) for i in range(start, min(start + size, n))]

    return reader


def check_epoch(batches: list[list[np.ndarray]], n: int, batch_size: int) -> None:
    """Every sample exactly once, in order, with group a's output (tag of its image) and group b's
    (label_rows of its label) of that very sample."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert [len(b[0]) for b in batches] == sizes
    labels = np.concatenate([b[1] for b in batches])[:, 0]
    np.testing.assert_array_equal(labels, np.arange(n))
    for img, label, a, b in batches:
        np.testing.assert_array_equal(img, np.stack([make_sample(i)[0] for i in label[:, 0]]))
        np.testing.assert_array_equal(a, tag_rows(img))
        np.testing.assert_array_equal(b, label_rows(label))


def test_two_groups_every_row_of_both_with_a_teacher_of_one_killed(tmp_path, teachers):
    a = [teachers.start("reader_models:slow_tag") for _ in range(2)]
    b = [teachers.start("reader_models:slow_label") for _ in range(2)]
    dr = DistillReader(two_groups(tmp_path, a, b), 16, 4, capacity=6, occupied_capacity=1, copy=True)
    n = 800
    dr.set_sample_list_generator(sample_lists(n))
    with dr:
        batches = []
        for step, batch in enumerate(dr.distill_reader()()):
            batches.append(batch)
            if step == 5:
                teachers.kill(b[0])
        check_epoch(batches, n, 16)
        # And the next epoch runs on group b's survivor.
        check_epoch(list(dr.distill_reader()()), n, 16)
        stats = settled_stats(dr)
    groups = stats.groups
    assert set(groups) == {"a", "b"}
    assert {t.endpoint for t in groups["a"]} == set(a)
    assert {t.endpoint for t in groups["b"]} == set(b)
    # Each group answered every row of both epochs once (rows counts only answers that were used).
    assert sum(t.rows for t in groups["a"]) == sum(t.rows for t in groups["b"]) == 2 * n
    assert not next(t for t in groups["b"] if t.endpoint == b[0]).healthy


def test_a_group_without_teacher_fails_the_epoch_naming_it(tmp_path, teachers, caplog):
    a = [teachers.start("reader_models:slow_tag")]
    dr = DistillReader(
        two_groups(tmp_path, a, [f"127.0.0.1:{free_port()}"]), 4, 2, capacity=2, occupied_capacity=0, teacher_timeout=2
    )
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(10)))
    with (
        caplog.at_level(logging.WARNING, logger="distill_reader"),
        dr,
        pytest.raises(NoTeacherError, match=r"^\[teacher b\] no teacher answered for 2 s"),
    ):
        list(dr.distill_reader()())
    assert any(r.getMessage().startswith("[teacher b] no teacher answers") for r in caplog.records)
