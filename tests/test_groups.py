"""Teacher groups (``[teacher NAME]``): every sample goes to a teacher of each group, end to end
against real teacher servers on loopback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import TAG_FEED, free_port, settled_stats
from reader_models import label_rows, make_sample, tag_rows
from test_fleet_view import by_id, running, status_json, wait_for
from test_openai_teacher import V, check_fake_topk, fake_vllm, fake_vllm_server

from distill_reader import DistillReader, NoTeacherError
from distill_reader.discovery.server import ServerThread

pytestmark = pytest.mark.timeout(120)

TWO_GROUPS = """\
[conf]
mode = fixed

[teacher a]
servers = {a!r}

[teacher b]
servers = {b!r}
predict_feed_ids = [1]

"""
TWO_GROUPS += TAG_FEED
TWO_GROUPS += """
[fetch]
fetch_vars = ['a.prediction', 'b.prediction']
fetch_types = ['float32', 'float32']
fetch_shapes = [(10,), (3,)]
"""


def two_groups(tmp_path, a: list[str], b: list[str]):
    path = tmp_path / "groups.conf"
    path.write_text(TWO_GROUPS.format(a=a, b=b))
    return path


def two_discovered_groups(tmp_path, discovery: str):
    """Group a from service ``tagger``, group b from service ``labeler``, one teacher each."""
    text = TWO_GROUPS.format(a=[], b=[]).replace("mode = fixed", f"mode = discover\nhost = {discovery}")
    text = text.replace("servers = []\n", "service_name = tagger\nrequire_num = 1\n", 1)
    text = text.replace("servers = []\n", "service_name = labeler\nrequire_num = 1\n", 1)
    path = tmp_path / "discover-groups.conf"
    path.write_text(text)
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


def test_a_teacher_that_does_not_fit_is_quarantined_in_its_group_only(tmp_path, teachers, caplog):
    """Group a: a right teacher and one whose served names differ; group b: one teacher. The wrong
    one is quarantined (its requests go to a's other teacher) and every row of both is right."""
    a = [teachers.start("reader_models:slow_tag"), teachers.start("reader_models:tag_paddle_names")]
    b = [teachers.start("reader_models:slow_label")]
    dr = DistillReader(two_groups(tmp_path, a, b), 16, 4, capacity=6, occupied_capacity=1, copy=True)
    n = 160
    dr.set_sample_list_generator(sample_lists(n))
    with dr, caplog.at_level(logging.WARNING, logger="distill_reader"):
        check_epoch(list(dr.distill_reader()()), n, 16)
        stats = settled_stats(dr)
    wrong = next(t for t in stats.groups["a"] if t.endpoint == a[1])
    assert wrong.quarantined is not None and wrong.quarantined.startswith("[feed] var 'img': teacher"), wrong
    assert wrong.rows == 0 and next(t for t in stats.groups["a"] if t.endpoint == a[0]).rows == n
    assert [(t.quarantined, t.rows) for t in stats.groups["b"]] == [(None, n)]


def test_a_group_without_teacher_fails_the_epoch_naming_it(tmp_path, teachers, caplog):
    a = [teachers.start("reader_models:slow_tag")]
    b = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    # 8 s: longer than a teacher's longest back-off (5 s), so the next epoch gets b's new teacher.
    dr = DistillReader(two_groups(tmp_path, a, [b]), 4, 2, capacity=2, occupied_capacity=0, teacher_timeout=8)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(10)))
    with dr:
        with (
            caplog.at_level(logging.WARNING, logger="distill_reader"),
            pytest.raises(NoTeacherError, match=r"^\[teacher b\] no teacher answered for 8 s"),
        ):
            list(dr.distill_reader()())
        assert any(r.getMessage().startswith("[teacher b] no teacher answers") for r in caplog.records)
        # The failure does not outlive its epoch: with group b's teacher up, the next one is whole.
        teachers.start("reader_models:slow_label", endpoint=b)
        check_epoch([[a.copy() for a in batch] for batch in dr.distill_reader()()], 10, 4)


def test_discover_mode_registers_once_per_groups_service_and_shows_under_each(tmp_path, teachers):
    with running(ServerThread(http="127.0.0.1:0")) as discovery:
        base = f"http://{discovery.http_address}"
        tagger = teachers.start("reader_models:slow_tag", "--register", discovery.address, "--service-name", "tagger")
        labeler = teachers.start(
            "reader_models:slow_label", "--register", discovery.address, "--service-name", "labeler"
        )
        dr = DistillReader(two_discovered_groups(tmp_path, discovery.address), 16, 4, 6, 1, teacher_timeout=30)
        n = 320
        dr.set_sample_list_generator(sample_lists(n))
        with dr:
            check_epoch([[a.copy() for a in batch] for batch in dr.distill_reader()()], n, 16)
            student = dr.config.student_id

            def shown_under_each() -> dict | None:
                services = status_json(base)["services"]
                a = by_id(services["tagger"]["students"], "id", student)
                b = by_id(services["labeler"]["students"], "id", student)
                # Each service's entry lists the group's own teacher, and its figures were reported.
                return services if (a["teachers"], b["teachers"]) == ([tagger], [labeler]) and a["reported"] else None

            services = wait_for(shown_under_each, 20, "the student under both services")
            assert by_id(services["labeler"]["students"], "id", student)["reported"]
            for name in ("tagger", "labeler"):
                assert [s["id"] for s in services[name]["students"]] == [student]  # registered once in each


def read_epoch(conf, n: int) -> tuple[list[list[np.ndarray]], object]:
    """One epoch of samples 0 … n-1 (teacher_timeout 1 s: a group with no teacher fails it), and stats."""
    dr = DistillReader(conf, 16, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=1)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(n)))
    with dr:
        batches = list(dr.distill_reader()())
        return batches, settled_stats(dr)


def test_the_store_keeps_every_groups_outputs(tmp_path, tag_teachers, teachers):
    b = [teachers.start("reader_models:slow_label")]
    store = f"\n[store]\npath = {tmp_path / 'store'}\npolicy = {{}}\n"
    conf = two_groups(tmp_path, tag_teachers, b)
    text = conf.read_text()
    n = 96
    conf.write_text(text + store.format("write"))
    batches, _ = read_epoch(conf, n)
    check_epoch(batches, n, 16)
    # Read back with no teacher at all in either group: every row of both from the store.
    nowhere = [f"127.0.0.1:{free_port()}"]
    conf.write_text(TWO_GROUPS.format(a=nowhere, b=nowhere) + store.format("read"))
    batches, stats = read_epoch(conf, n)
    check_epoch(batches, n, 16)
    assert not stats.teachers


def test_one_group_from_the_store_while_the_other_is_asked_live(tmp_path, tag_teachers, teachers):
    b = [teachers.start("reader_models:slow_label")]
    store = f"\n[store]\npath = {tmp_path / 'store'}\npolicy = {{}}\ngroups = ['a']\n"
    n = 96
    conf = tmp_path / "write.conf"
    conf.write_text(TWO_GROUPS.format(a=tag_teachers, b=b) + store.format("write"))
    batches, _ = read_epoch(conf, n)
    check_epoch(batches, n, 16)
    manifest = (tmp_path / "store" / "manifest.json").read_text()
    assert "a.prediction" in manifest and "b.prediction" not in manifest  # it keeps group a's only
    # Group a has no teacher now (asking it would fail the epoch): its rows come from the store;
    # group b's teacher is asked for every row.
    nowhere = [f"127.0.0.1:{free_port()}"]
    for policy in ("read", "cache"):
        conf.write_text(TWO_GROUPS.format(a=nowhere, b=b) + store.format(policy))
        batches, stats = read_epoch(conf, n)
        check_epoch(batches, n, 16)
        assert [t.endpoint for t in stats.groups["b"]] == b and stats.groups["b"][0].rows == n
        assert "a" not in stats.groups or not any(t.rows for t in stats.groups["a"])


# -- an OIP teacher beside an OpenAI-compatible one -------------------------------------------------

MIXED = """\
[conf]
mode = fixed
max_length = 24

[teacher a]
servers = {a!r}
predict_feed_ids = [0]

[teacher llm]
servers = {llm!r}
protocol = openai
model_name = tiny
predict_feed_ids = [1]

[feed]
feed_vars = ['img', 'tokens', 'label']
feed_types = ['float32', 'int64', 'int64']
feed_shapes = [(1, 4, 4), (-1,), (1,)]

[fetch]
fetch_vars = ['a.prediction', 'llm.topk_values', 'llm.topk_indices']
fetch_types = ['float32', 'float32', 'int32']
fetch_shapes = [(10,), (-1, 8), (-1, 8)]
"""


def token_row(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, V, 1 + i % 20)


def test_an_oip_group_beside_an_openai_group(tmp_path, tag_teachers):
    """Group a (OIP, the image) and group llm (an OpenAI-compatible server, the tokens): each row's
    three outputs are its own."""
    with fake_vllm_server(fake_vllm()) as llm:
        conf = tmp_path / "mixed.conf"
        conf.write_text(MIXED.format(a=tag_teachers, llm=[llm]))
        dr = DistillReader(conf, 8, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=30)
        n = 40
        dr.set_sample_generator(lambda: ((make_sample(i)[0], token_row(i), make_sample(i)[1]) for i in range(n)))
        with dr:
            batches = list(dr.distill_reader()())
    labels = np.concatenate([b[2] for b in batches])[:, 0]
    np.testing.assert_array_equal(labels, np.arange(n))
    for img, tokens, label, prediction, values, indices, lengths in batches:
        np.testing.assert_array_equal(prediction, tag_rows(img))
        for r, i in enumerate(label[:, 0]):
            row = token_row(int(i))
            assert lengths[r] == len(row)
            np.testing.assert_array_equal(tokens[r, : len(row)], row)
            check_fake_topk(values[r], indices[r], row)
