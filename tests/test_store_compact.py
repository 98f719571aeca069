"""``[store] precision = compact`` (docs/store.md): top-k knowledge in about 2 bytes per entry.

The codec (:mod:`distill_reader.knowledge.compact`) is checked as a property over varied
distributions (peaked, flat, ties, vocabularies up to 2**18 and beyond), and the store end to end:
top-128 knowledge captured from real teacher servers (``distill teacher serve --topk 128`` over a
model's dense log-probs: a 131,072-token vocabulary with Zipf-shaped distributions whose top ids
are spread over the whole vocabulary, and the tiny GPT-2 of ``llm_support`` where transformers is
installed) with ``precision = compact``, then read back with no teacher: every position's id set
is the teacher's, its distribution within KL 1e-3 nats of the teacher's (both renormalized).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill_reader.bench.sequence import zipf_logits  # the bench's teacher: 128k vocabulary, Zipf-shaped
from distill_reader.serving import teacher_model

V = 131072  # the large vocabulary
K = 128
MAX_LENGTH = 24


@teacher_model(inputs=[("tokens", "int64", (-1,))], outputs=[("logits", "float32", (-1, V))])
def zipf_lm(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"logits": zipf_logits(batch["tokens"])}


_gpt2 = None


@teacher_model(inputs=[("tokens", "int64", (-1,))], outputs=[("logits", "float32", (-1, 2048))])
def tiny_gpt2(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tiny GPT-2 of ``llm_support`` (causal: padding at a row's end changes no real position)."""
    global _gpt2
    import torch
    from llm_support import tiny_lm_dir
    from transformers import AutoModelForCausalLM

    if _gpt2 is None:
        _gpt2 = AutoModelForCausalLM.from_pretrained(tiny_lm_dir(), dtype=torch.float32).eval()
    with torch.inference_mode():
        return {"logits": _gpt2(input_ids=torch.from_numpy(batch["tokens"])).logits.float().numpy()}


def make_row(i: int) -> tuple[np.ndarray, np.ndarray]:
    length = 1 + (i * 7919) % MAX_LENGTH
    return (np.arange(length, dtype=np.int64) * 31 + i * 17) % 997 + 1, np.array([i], dtype=np.int64)


# -- helpers --------------------------------------------------------------------------------------


def teacher_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``distill teacher serve --topk k`` publishes for these logits (the same function)."""
    from distill_reader.serving.topk import topk

    return topk(logits, k)


def check_within_bound(values, indices, want_values, want_indices) -> np.ndarray:
    """Per position: the same id set, KL(teacher || decoded) <= 1e-3 (renormalized), the mass kept,
    rank order (values descending, equal values by ascending id). The KLs."""
    from distill_reader.knowledge.compact import KL_BOUND, kl_renormalized

    k = values.shape[-1]
    values, indices = np.asarray(values).reshape(-1, k), np.asarray(indices).reshape(-1, k)
    want_values = np.asarray(want_values).reshape(values.shape)
    want_indices = np.asarray(want_indices).reshape(values.shape)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(want_indices, axis=1))
    kl = kl_renormalized(want_values, want_indices, values, indices)
    assert (kl <= KL_BOUND).all(), f"KL {kl.max():.3g} > {KL_BOUND} at position {int(kl.argmax())}"
    mass = np.logaddexp.reduce(values.astype(np.float64), axis=1)
    want_mass = np.logaddexp.reduce(want_values.astype(np.float64), axis=1)
    np.testing.assert_allclose(mass, want_mass, atol=2e-5)
    step = np.diff(values, axis=1)
    assert (step <= 0).all(), "values not in descending order"
    ties = step == 0
    assert (np.diff(indices, axis=1)[ties] > 0).all(), "equal values not by ascending id"
    return kl


# -- the codec, as a property ---------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def distributions(draw):
    """Top-k log-probs and ids of varied shapes: peaked, flat, Zipf, ties, far tails."""
    k = draw(st.sampled_from([1, 2, 8, 32, 100, 128, 256]))
    vocab = draw(st.sampled_from([k, 2 * k + 3, 2048, 50257, 131072, 262144, 1 << 31]))
    vocab = max(vocab, k)
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["peaked", "flat", "zipf", "ties", "uniform-ish", "extreme", "mixed"]))
    rng = np.random.default_rng(seed)
    if kind == "peaked":
        logits = rng.normal(0, 1, (n, k)) * draw(st.floats(0.1, 3))
        logits[:, 0] += draw(st.floats(2, 40))
    elif kind == "flat":
        logits = rng.normal(0, draw(st.floats(0, 0.05)), (n, k))
    elif kind == "zipf":
        logits = -draw(st.floats(0.3, 3)) * np.log(np.arange(1, k + 1))[None, :] + rng.normal(0, 0.2, (n, k))
    elif kind == "ties":
        logits = np.round(rng.normal(0, 2, (n, k)) * 2) / 2
    elif kind == "uniform-ish":
        logits = rng.uniform(-draw(st.floats(0.1, 30)), 0, (n, k))
    elif kind == "extreme":  # a huge span: tails far below the top
        logits = np.concatenate([rng.normal(0, 1, (n, 1)) + 80, rng.uniform(-80, 0, (n, k - 1))], axis=1)
    else:
        logits = rng.normal(0, draw(st.floats(0.5, 6)), (n, k))
    rest = draw(st.floats(0, 8))  # the mass outside the top-k: log-probs below 0
    values = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True) - rest * rng.uniform(0, 1, (n, 1))
    pick = (lambda: rng.choice(vocab, k, replace=False)) if vocab < 1 << 24 else (lambda: _spread(rng, vocab, k))
    ids = np.stack([pick() for _ in range(n)])
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(values, order, 1).astype(np.float32), np.take_along_axis(ids, order, 1)


def _spread(rng, vocab: int, k: int) -> np.ndarray:
    ids = np.unique(rng.integers(0, vocab, 4 * k))
    return rng.permutation(ids)[:k] if len(ids) >= k else np.arange(k)


@settings(max_examples=300, deadline=None)
@given(distributions())
def test_every_position_decodes_within_the_bound(distribution):
    from distill_reader.knowledge.compact import decode, encode_rows

    values, ids = distribution
    n, k = values.shape
    split = [n // 3, n - n // 3]  # rows of several positions
    flat, offsets = encode_rows(values, ids, np.array(split))
    got_values, got_ids = decode(flat, offsets, np.array(split), k)
    assert got_values.dtype == np.float32
    check_within_bound(got_values, got_ids, values, ids)


def test_a_corrupt_row_is_refused():
    from distill_reader.knowledge.compact import decode, encode_rows

    rng = np.random.default_rng(0)
    values = np.sort(rng.normal(-5, 2, (4, 32)), axis=1)[:, ::-1].astype(np.float32)
    ids = np.stack([rng.choice(50000, 32, replace=False) for _ in range(4)])
    flat, offsets = encode_rows(values, ids, np.array([4]))
    broken = flat.copy()
    broken[-3:] = 0xFF  # Elias-Fano high bits of the last position
    with pytest.raises(ValueError, match="compact top-k"):
        decode(broken, offsets, np.array([4]), 32)
    with pytest.raises(ValueError, match="compact top-k"):
        decode(flat, offsets, np.array([3]), 32)  # the row holds 4 positions


def test_rows_of_no_position_and_rows_read_out_of_order():
    from distill_reader.knowledge.compact import decode, decode_rows, encode_rows

    rng = np.random.default_rng(1)
    values = np.sort(rng.normal(-5, 2, (5, 16)), axis=1)[:, ::-1].astype(np.float32)
    ids = np.stack([rng.choice(100000, 16, replace=False) for _ in range(5)])
    flat, offsets = encode_rows(values, ids, np.array([0, 2, 0, 3, 0]))
    got_values, got_ids = decode_rows(flat, offsets, np.array([3, 2, 1]), np.array([3, 0, 2]), 16)
    check_within_bound(got_values, got_ids, values[[2, 3, 4, 0, 1]], ids[[2, 3, 4, 0, 1]])
    flat, offsets = encode_rows(values[:0], ids[:0], np.array([0, 0]))
    assert len(flat) == 0 and decode(flat, offsets, np.array([0, 0]), 16)[0].shape == (0, 16)


def large_vocabulary_topk(count: int, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``count`` positions of :func:`zipf_logits` (128k vocabulary, ids spread over it)."""
    tokens = np.arange(count, dtype=np.int64)[None, :] * 7 + 1
    return teacher_topk(zipf_logits(tokens)[0], k)


def test_top128_of_a_128k_vocabulary_in_at_most_300_bytes_per_token():
    from distill_reader.knowledge.compact import decode, encode_rows

    values, ids = large_vocabulary_topk(200)
    assert ids.max() > V // 2  # spread over the vocabulary, not clustered at low ids
    flat, offsets = encode_rows(values, ids, np.array([100, 100]))
    per_token = len(flat) / len(values)
    assert per_token <= 300, per_token
    check_within_bound(*decode(flat, offsets, np.array([100, 100]), K), values, ids)


# -- the store, end to end ------------------------------------------------------------------------

NOWHERE = ["127.0.0.1:1"]


def compact_config(write_config, servers, path: Path, policy: str, precision: str | None = "compact", k: int = K):
    from distill_reader.bench.sequence import sequence_config

    text = sequence_config(list(servers), MAX_LENGTH, k, values_dtype="float32")
    extra = f"precision = {precision}\n" if precision else ""
    return write_config(text=f"{text}\n[store]\npath = {path}\npolicy = {policy}\n{extra}")


def run_epoch(conf: Path, n: int, d_batch: int = 4) -> list[list[np.ndarray]]:
    from distill_reader import DistillReader

    dr = DistillReader(conf, 8, d_batch, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=1)
    dr.set_sample_generator(lambda: (make_row(i) for i in range(n)))
    with dr:
        return list(dr.distill_reader()())


def check_rows_against(batches, reference) -> tuple[int, float]:
    """Every row's decoded top-k against ``reference(tokens) -> (values, ids)``: tokens, max KL."""
    worst, tokens = 0.0, 0
    for row_tokens, row_id, values, indices, lengths in batches:
        assert values.dtype == np.float32 and indices.dtype == np.int32
        for r in range(len(row_tokens)):
            want_tokens, _ = make_row(int(row_id[r, 0]))
            length = len(want_tokens)
            assert lengths[r] == length
            want_values, want_ids = reference(want_tokens)
            kl = check_within_bound(values[r, :length], indices[r, :length], want_values, want_ids)
            assert not values[r, length:].any() and not indices[r, length:].any()
            worst, tokens = max(worst, float(kl.max())), tokens + length
    return tokens, worst


def zipf_reference(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return teacher_topk(zipf_logits(tokens[None])[0], K)


@pytest.fixture(scope="module")
def zipf_teacher():
    from conftest import TeacherProcesses

    fleet = TeacherProcesses()
    try:
        yield fleet.start("test_store_compact:zipf_lm", "--topk", str(K))
    finally:
        fleet.stop_all()


@pytest.mark.timeout(240)
def test_captured_compact_reads_back_within_the_bound_with_no_teacher(write_config, zipf_teacher, tmp_path):
    from distill_reader.knowledge.commands import summarize, verify

    n = 40
    path = tmp_path / "store"
    teacher_batches = run_epoch(compact_config(write_config, [zipf_teacher], path, "write"), n)
    check_rows_against(teacher_batches, zipf_reference)  # (the teacher's own answers: exact)
    batches = run_epoch(compact_config(write_config, NOWHERE, path, "read"), n)
    tokens, worst = check_rows_against(batches, zipf_reference)
    assert tokens == sum(len(make_row(i)[0]) for i in range(n))
    summary = summarize(path)
    assert summary.manifest["precision"] == "compact" and summary.manifest["version"] == 2
    assert verify(path)[1] == []
    # the chunks: one binary column for the pair, its metadata naming both vars; <= 300 bytes per token
    import pyarrow.dataset as ds

    table = ds.dataset(path / "chunks", format="ipc").to_table()
    assert table.schema.names == ["_key", "_fingerprint", "_length", "logits_topk"]
    knowledge = sum(len(value.as_py()) for value in table.column("logits_topk"))
    assert knowledge / tokens <= 300, knowledge / tokens
    assert summary.bytes / tokens <= 300 + 32, summary.bytes / tokens  # + keys, fingerprints, lengths, framing
    field = table.schema.field("logits_topk")
    assert str(field.type) == "binary" and field.metadata[b"precision"] == b"compact"
    assert json.loads(field.metadata[b"vars"]) == ["logits_topk_values", "logits_topk_indices"]


@pytest.mark.timeout(240)
def test_real_distributions_of_a_gpt2_captured_compact(write_config, teachers, tmp_path):
    """The tiny GPT-2's top-128 (2,048-token vocabulary) on text: captured compact, read back with
    no teacher, every position within the bound of transformers' own top-128."""
    from llm_support import reference_topk, require_llm, tiny_lm_dir, token_rows

    require_llm()
    rows = token_rows(tiny_lm_dir(), 24, 1, MAX_LENGTH, seed=5)
    wanted = reference_topk(tiny_lm_dir(), rows, K)
    endpoint = teachers.start("test_store_compact:tiny_gpt2", "--topk", str(K))
    path = tmp_path / "store"
    from distill_reader import DistillReader

    for policy, servers in (("write", [endpoint]), ("read", NOWHERE)):
        conf = compact_config(write_config, servers, path, policy)
        # (the teacher's first request imports torch and loads the model)
        dr = DistillReader(conf, 8, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=60)
        dr.set_sample_generator(lambda: ((row, np.array([i], dtype=np.int64)) for i, row in enumerate(rows)))
        with dr:
            batches = list(dr.distill_reader()())
    for row_tokens, row_id, values, indices, lengths in batches:
        for r in range(len(row_tokens)):
            i = int(row_id[r, 0])
            length = len(rows[i])
            assert lengths[r] == length
            want_values, want_ids = wanted[i]
            check_within_bound(values[r, :length], indices[r, :length], want_values, want_ids)


@pytest.mark.timeout(240)
def test_cache_reads_its_own_rows_back_compact(write_config, zipf_teacher, tmp_path):
    """Epoch 1 asks the teacher; epoch 2 (after the rows were written: 1 s idle) reads them compact."""
    import time

    from conftest import wait_for

    from distill_reader import DistillReader

    n = 24
    conf = compact_config(write_config, [zipf_teacher], tmp_path / "store", "cache")
    dr = DistillReader(conf, 8, 4, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=5)
    dr.set_sample_generator(lambda: (make_row(i) for i in range(n)))
    with dr:
        first = list(dr.distill_reader()())
        wait_for(lambda: list((tmp_path / "store" / "chunks").glob("*.arrow")), 20, "the idle commit's chunk")
        # The chunk's name appears (renamed into place) just before its writer's future is done; the
        # next epoch's first lookup takes a done chunk in. Half a second covers that step.
        time.sleep(0.5)
        second = list(dr.distill_reader()())
        assert dr.stats().teachers  # the teacher answered epoch 1
    check_rows_against(first, zipf_reference)
    check_rows_against(second, zipf_reference)
    quantized = any(not np.array_equal(a[2], b[2]) for a, b in zip(first, second))
    assert quantized, "epoch 2 delivered the teacher's exact values: not read from the compact chunk"


def test_precision_mismatch_is_an_error_naming_precision(write_config, tmp_path):
    from distill_reader import DistillReader, StoreError
    from distill_reader.config import load_config
    from distill_reader.knowledge.layout import prepare_knowledge_store

    compact_path, exact_path = tmp_path / "compact", tmp_path / "exact"
    prepare_knowledge_store(load_config(compact_config(write_config, NOWHERE, compact_path, "write")))
    prepare_knowledge_store(load_config(compact_config(write_config, NOWHERE, exact_path, "write", precision=None)))
    for policy in ("write", "cache"):
        with pytest.raises(StoreError, match=r"\[store\] precision: .* holds compact top-k knowledge; this config "):
            DistillReader(compact_config(write_config, NOWHERE, compact_path, policy, "exact"), 8, 4, 4, 1)
        with pytest.raises(StoreError, match=r"\[store\] precision: .* holds exact top-k knowledge; this config "):
            DistillReader(compact_config(write_config, NOWHERE, exact_path, policy, "compact"), 8, 4, 4, 1)
    # reading takes the store's precision, whatever the config says
    for path, precision in ((compact_path, "exact"), (exact_path, "compact")):
        DistillReader(compact_config(write_config, NOWHERE, path, "read", precision), 8, 4, 4, 1).close()
    manifest = json.loads((exact_path / "manifest.json").read_text())
    assert manifest["version"] == 1 and "precision" not in manifest  # an exact store is what it was


def test_compact_needs_a_topk_pair(write_config, tmp_path):
    from conftest import SEED_CONFIG

    from distill_reader import ConfigError, DistillReader, FakeDistillReader, StoreError

    text = SEED_CONFIG.format(servers=NOWHERE, extra="")
    conf = write_config(text=f"{text}\n[store]\npath = {tmp_path / 's'}\npolicy = write\nprecision = compact\n")
    with pytest.raises(StoreError, match=r"precision = compact .* needs a pair of fetch vars X_topk_values"):
        DistillReader(conf, 8, 4, 4, 1)
    with pytest.raises(StoreError, match=r"precision = compact keeps top-k knowledge of K <= 512; .* K = 600"):
        DistillReader(compact_config(write_config, NOWHERE, tmp_path / "k600", "write", k=600), 8, 4, 4, 1)
    conf = write_config(text=f"{text}\n[store]\npath = s\npolicy = write\nprecision = small\n")
    unknown = r"\[store\] precision: unknown precision 'small'; expected one of exact, compact"
    with pytest.raises(ConfigError, match=unknown):
        FakeDistillReader(conf, 4)


def test_an_exact_store_reads_exact(write_config, zipf_teacher, tmp_path):
    """precision exact (the default): the same config captures and reads back the teacher's values
    bit for bit, in the store's old layout (version 1, one column per fetch var)."""
    n = 12
    path = tmp_path / "store"
    first = run_epoch(compact_config(write_config, [zipf_teacher], path, "write", precision=None), n)
    again = run_epoch(compact_config(write_config, NOWHERE, path, "read", precision="exact"), n)
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert json.loads((path / "manifest.json").read_text())["version"] == 1


def test_cli_info_shows_the_precision(write_config, zipf_teacher, tmp_path):
    from click.testing import CliRunner

    from distill_reader.cli import main

    path = tmp_path / "store"
    run_epoch(compact_config(write_config, [zipf_teacher], path, "write"), 8)
    result = CliRunner().invoke(main, ["store", "info", str(path)])
    assert result.exit_code == 0, result.output
    assert "precision:      compact (top-k pairs in codec topk-ef-q1)\n" in result.output
    result = CliRunner().invoke(main, ["store", "verify", str(path)])
    assert result.exit_code == 0 and result.output.startswith("ok: 8 rows"), result.output
