"""A real Triton (PyTriton) sequence teacher: variable-length rows with ``<var>_length`` and top-k
outputs computed in the model by ``distill_reader.serving.topk`` (``examples/triton_teacher/
serve_sequences.py``), asked with NVIDIA's own ``tritonclient.grpc``. Skipped without the PyTriton
environment (``scripts/external-teachers.sh``)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
from external_support import ExternalServer, require_venv, session_pids, start_triton_sequences
from serving_models import assert_topk, dense_topk, seq_logits

from distill_reader.bench.sequence import sequence_config

pytestmark = pytest.mark.timeout(120)

K = 8
TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalServer]:
    python = require_venv("pytriton-venv", "pytriton.triton")
    options = ("--topk", str(K), "--topk-dtype", "float16", "--temperature", str(TEMPERATURE))
    started = start_triton_sequences(python, tmp_path_factory.mktemp("triton-seq"), "seq", *options)
    try:
        started.wait_ready(90)
        yield started
    finally:
        started.stop()
        assert not session_pids(started.process.pid), f"{started.name} left processes behind"


def _input(name: str, arr: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput(name, list(arr.shape), tc.np_to_triton_dtype(arr.dtype))
    inp.set_data_from_numpy(arr)
    return inp


def test_metadata_declares_variable_dims(triton: ExternalServer) -> None:
    meta = tc.InferenceServerClient(triton.endpoint).get_model_metadata("seq", as_json=True)
    tensors = [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]]
    assert tensors == [
        ("tokens", "INT64", ["-1", "-1"]),
        ("tokens_length", "INT64", ["-1"]),
        ("logits_topk_values", "FP16", ["-1", "-1", str(K)]),
        ("logits_topk_indices", "INT32", ["-1", "-1", str(K)]),
    ]


def test_rows_of_different_lengths_get_their_exact_topk(triton: ExternalServer) -> None:
    """Requests of several rows, each padded with 0 to its longest row: at every real position the
    top-k of the exact model's logits (dense reference), 0 past each row's length."""
    client = tc.InferenceServerClient(triton.endpoint)
    rng = np.random.default_rng(3)
    for rows, longest in ((1, 1), (3, 7), (5, 33), (16, 64), (2, 5)):
        lengths = rng.integers(1, longest + 1, rows)
        lengths[rng.integers(rows)] = longest
        tokens = rng.integers(0, 1000, (rows, longest))
        tokens[np.arange(longest) >= lengths[:, None]] = 0
        result = client.infer("seq", [_input("tokens", tokens), _input("tokens_length", lengths.astype(np.int64))])
        values, indices = result.as_numpy("logits_topk_values"), result.as_numpy("logits_topk_indices")
        assert values.shape == indices.shape == (rows, longest, K)
        for i, n in enumerate(lengths):
            want = dense_topk(seq_logits(tokens[i : i + 1, :n]), K, temperature=TEMPERATURE, dtype=np.float16)
            assert_topk((values[i : i + 1, :n], indices[i : i + 1, :n]), want)
            assert not values[i, n:].any() and not indices[i, n:].any()


def test_the_reader_streams_variable_rows_through_triton(triton: ExternalServer, tmp_path) -> None:
    """DistillReader in fixed mode against the real Triton: rows of 1-40 tokens grouped by length
    into padded d_batches, each row's lengths sent (the model declares ``tokens_length``); every
    real position of every row gets the exact top-k, in input order."""
    from distill_reader import DistillReader

    conf = tmp_path / "seq.conf"
    conf.write_text(sequence_config([triton.endpoint], 40, K, conf="model_name = seq"))
    rng = np.random.default_rng(5)
    rows = [rng.integers(1, 1000, int(n)) for n in rng.integers(1, 41, 150)]
    dr = DistillReader(conf, 32, 8, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=60)
    dr.set_sample_generator(lambda: ((row, np.array([i])) for i, row in enumerate(rows)))
    with dr:
        batches = list(dr.distill_reader()())
    ids = np.concatenate([b[1][:, 0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(len(rows)))
    for tokens, id_, values, indices, lengths in batches:
        for r in range(len(tokens)):
            row = rows[int(id_[r, 0])]
            n = len(row)
            assert lengths[r] == n
            want = dense_topk(seq_logits(row[None]), K, temperature=TEMPERATURE, dtype=np.float16)
            assert_topk((values[r : r + 1, :n], indices[r : r + 1, :n]), want)
            assert not values[r, n:].any() and not indices[r, n:].any()
