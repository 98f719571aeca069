"""Sequence models on the built-in teacher server: variable-length requests merged by padding, and
top-k compressed outputs (``distill teacher serve --topk``), each checked exactly against the model
applied to the request alone (every real position) and against a dense ``np.argsort`` reference."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from click.testing import CliRunner
from conftest import TeacherProcesses, free_port
from serving_models import (
    affine,
    assert_topk,
    build_seq_onnx,
    dense_topk,
    expected_seq_lengths,
    expected_seq_onnx,
    seq_logits,
    seq_mean,
    seq_shift,
    seq_tag,
    seq_tag_lengths,
)
from tritonclient.grpc import model_config_pb2

from distill_reader.serving import teacher_model
from distill_reader.serving import topk as topk_module
from distill_reader.serving.backends.python import PythonBackend
from distill_reader.serving.batcher import paddable
from distill_reader.serving.commands import teacher
from distill_reader.serving.server import running_server
from distill_reader.serving.topk import TopKBackend, topk

pytestmark = pytest.mark.timeout(60)

RNG = np.random.default_rng(7)


# --- the top-k computation ------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [50, 1000, 32000, 50257])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_topk_equals_dense_reference(vocab: int, k: int) -> None:
    x = (RNG.standard_normal((3, 5, vocab)) * 4).astype(np.float32)
    for values in ("logprobs", "logits"):
        assert_topk(topk(x, k, values=values), dense_topk(x, k, values))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("model_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_topk_temperature_and_dtypes(temperature: float, model_dtype: type, dtype: str) -> None:
    x = (RNG.standard_normal((4, 9, 4096)) * 5).astype(model_dtype)
    got = topk(x, 16, temperature=temperature, dtype=dtype)
    assert_topk(got, dense_topk(x, 16, temperature=temperature, dtype=np.dtype(dtype)))


@pytest.mark.parametrize("vocab", [40, 3000, 32000])
def test_topk_ties_keep_the_lowest_indices(vocab: int) -> None:
    """Few distinct values (a float16 model's, or a quantized one's): ties everywhere, even at the cut."""
    x = RNG.integers(0, 6, (64, vocab)).astype(np.float16)
    for k in (1, 8, 32):
        assert_topk(topk(x, k), dense_topk(x, k))
        assert_topk(topk(x, k, values="logits", dtype="float16"), dense_topk(x, k, "logits", dtype=np.float16))


def test_topk_edge_rows() -> None:
    v = 2000
    x = np.full((4, v), -np.inf, np.float32)  # masked vocabularies: fewer finite values than k
    x[0, 5] = 1
    x[1, [7, 1999]] = 2
    x[2] = RNG.standard_normal(v)
    x[3, :] = 0.5  # all equal
    assert_topk(topk(x, 8, values="logits"), dense_topk(x, 8, "logits"))
    assert_topk(topk(x[2:], 8), dense_topk(x[2:], 8))
    all_of_them = topk(x[2:], v)  # k = V: the full sort
    assert_topk(all_of_them, dense_topk(x[2:], v))
    x[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        topk(x[2:3], 8)


def test_topk_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch larger than a chunk: every chunk's rows land at their own positions."""
    x = (RNG.standard_normal((7, 13, 3000)) * 4).astype(np.float32)
    whole = topk(x, 8)
    monkeypatch.setattr(topk_module, "CHUNK_ELEMENTS", 3000 * 5)
    monkeypatch.setattr(topk_module, "CHUNK_ROWS", 1)
    assert_topk(topk(x, 8), whole)
    assert_topk(whole, dense_topk(x, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k >= 1"),
        ({"k": 9}, "top-k of 9 from a last axis of 8"),
        ({"values": "probs"}, "logprobs, logits"),
        ({"temperature": 0.0}, "positive"),
        ({"temperature": 2.0, "values": "logits"}, "temperature applies to logprobs"),
    ],
)
def test_topk_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        topk(np.zeros((2, 8), np.float32), **{"k": 4, **kwargs})


# --- the backend wrapper ---------------------------------------------------------------------------


def test_topk_backend_metadata_and_outputs() -> None:
    backend = TopKBackend(PythonBackend(seq_tag), 8, dtype="float16")
    assert [(s.name, s.datatype, s.shape) for s in backend.outputs] == [
        ("logits_topk_values", "FP16", (-1, 8)),
        ("logits_topk_indices", "INT32", (-1, 8)),
    ]
    assert backend.inputs == PythonBackend(seq_tag).inputs
    tokens = RNG.integers(0, 30, (3, 11))
    out = backend.infer({"tokens": tokens})
    assert_topk(
        (out["logits_topk_values"], out["logits_topk_indices"]), dense_topk(seq_logits(tokens), 8, dtype=np.float16)
    )
    assert "top-8 logprobs of logits in float16" in backend.describe()


def test_topk_backend_selects_and_refuses_outputs() -> None:
    # affine: y FP32 (3,), s FP64 (1,), k INT64 (2,): only y has a last dim > 2.
    selected = TopKBackend(PythonBackend(affine), 2)
    assert [s.name for s in selected.outputs] == ["y_topk_values", "y_topk_indices", "s", "k"]
    for outputs, k, message in (
        (None, 3, "no output to compress to the top 3"),
        (["nope"], 2, "'nope' is not an output of the model"),
        (["k"], 1, "'k' is INT64"),
        (["s"], 1, r"per-sample shape \[1\]; top-1 needs a last dimension larger than 1"),
    ):
        with pytest.raises(ValueError, match=message):
            TopKBackend(PythonBackend(affine), k, outputs=outputs)


# --- variable-length requests merged by padding -----------------------------------------------------


def _input(name: str, arr: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput(name, list(arr.shape), tc.np_to_triton_dtype(arr.dtype))
    inp.set_data_from_numpy(arr)
    return inp


def _concurrently(client: tc.InferenceServerClient, requests: list[list[tuple[str, np.ndarray]]], model="teacher"):
    """Each request's result, all sent at once (so the dynamic batcher merges them)."""

    def call(inputs: list[tuple[str, np.ndarray]]) -> tc.InferResult:
        return client.infer(model, [_input(n, a) for n, a in inputs])

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(call, requests))


def _token_requests(n: int, max_length: int = 40) -> list[np.ndarray]:
    """``n`` requests of 1-3 rows, each request of its own length (1 .. max_length)."""
    lengths = RNG.permutation(np.arange(1, max_length + 1))[:n]
    return [RNG.integers(0, 1000, (int(RNG.integers(1, 4)), int(n_))) for n_ in lengths]


def _execution_count(client: tc.InferenceServerClient) -> tuple[int, int]:
    (stats,) = client.get_inference_statistics("teacher").model_stats
    return stats.execution_count, stats.inference_count


@pytest.mark.timeout(30)
def test_requests_of_different_lengths_are_merged_and_cut_back() -> None:
    requests = _token_requests(24)
    with running_server(PythonBackend(seq_tag), max_batch=64, max_delay_ms=300) as address:
        client = tc.InferenceServerClient(address)
        results = _concurrently(client, [[("tokens", t)] for t in requests])
        batches, rows = _execution_count(client)
    for tokens, result in zip(requests, results, strict=True):
        # Every real position of every row, exactly the model applied to this request alone.
        np.testing.assert_array_equal(result.as_numpy("logits"), seq_logits(tokens))
    assert rows == sum(len(t) for t in requests)
    assert batches < len(requests), "requests of different lengths were never merged"


@pytest.mark.timeout(30)
def test_length_input_reaches_the_model_with_its_rows() -> None:
    """Rows padded by the client, with ``tokens_length``: the server pads again and merges; each row's
    length stays with its row, so the model masks exactly the client's padding."""
    requests = []
    for tokens in _token_requests(16, 30):
        lengths = RNG.integers(1, tokens.shape[1] + 1, len(tokens))
        lengths[0] = tokens.shape[1]  # the request is padded to its own longest row
        tokens = np.where(np.arange(tokens.shape[1]) < lengths[:, None], tokens, 0)
        requests.append((tokens, lengths.astype(np.int64)))
    with running_server(PythonBackend(seq_tag_lengths), max_delay_ms=300) as address:
        client = tc.InferenceServerClient(address)
        results = _concurrently(client, [[("tokens", t), ("tokens_length", n)] for t, n in requests])
        batches, _ = _execution_count(client)
    for (tokens, lengths), result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy("logits"), expected_seq_lengths(tokens, lengths))
    assert batches < len(requests)


@pytest.mark.timeout(30)
def test_outputs_with_lengths_of_their_own_are_not_padded() -> None:
    """A model whose variable output is not per-token: its first padded batch is rerun request by
    request, then requests of different lengths are no longer merged; every answer stays right."""
    requests = _token_requests(12)
    with running_server(PythonBackend(seq_shift), max_delay_ms=300) as address:
        client = tc.InferenceServerClient(address)
        for _ in range(2):
            results = _concurrently(client, [[("tokens", t)] for t in requests])
            for tokens, result in zip(requests, results, strict=True):
                np.testing.assert_array_equal(result.as_numpy("shifted")[:, 1:], tokens)
        batches, _ = _execution_count(client)
    assert batches == 2 * len(requests)  # the refused padded batch is not counted; the rest ran alone


@pytest.mark.timeout(30)
@pytest.mark.parametrize("model", ["pad_variable off", "pooled output"])
def test_different_lengths_not_merged(model: str) -> None:
    """With ``pad_variable=False``, or for a model that does not say padding is its business (a pooled
    output, no ``tokens_length``), requests of different lengths run apart, each answered right."""
    if model == "pooled output":
        backend, options, output, expected = PythonBackend(seq_mean), {}, "mean", lambda t: t.mean(1, keepdims=True)
    else:
        backend, options, output, expected = PythonBackend(seq_tag), {"pad_variable": False}, "logits", seq_logits
    requests = _token_requests(10)
    with running_server(backend, max_delay_ms=200, **options) as address:
        client = tc.InferenceServerClient(address)
        results = _concurrently(client, [[("tokens", t)] for t in requests])
        batches, _ = _execution_count(client)
    for tokens, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy(output), expected(tokens))
    assert batches == len(requests)


def test_which_models_are_padded() -> None:
    def declared(inputs, outputs):
        return PythonBackend(teacher_model(inputs=inputs, outputs=outputs)(seq_tag))

    tokens, tokens_length = ("tokens", "int64", (-1,)), ("tokens_length", "int64", ())
    assert paddable(PythonBackend(seq_tag)) and paddable(PythonBackend(seq_tag_lengths))
    assert paddable(declared([tokens, tokens_length], [("pooled", "float32", (4,))]))
    assert not paddable(PythonBackend(seq_mean))  # a fixed output, no length
    assert not paddable(declared([("img", "float32", (3, -1, -1))], [("mask", "float32", (-1, -1))]))
    assert not paddable(PythonBackend(affine))  # nothing variable


# --- distill teacher serve --topk ------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_seq_onnx(tmp_path_factory.mktemp("seq") / "seq.onnx")


@pytest.mark.timeout(90)
def test_cli_topk_onnx_float16_temperature(teachers: TeacherProcesses, seq_onnx: Path) -> None:
    metrics_port = free_port()
    options = ("--topk", "8", "--topk-dtype", "float16", "--temperature", "2", "--max-delay-ms", "300")
    address = teachers.start(str(seq_onnx), *options, "--metrics", f"127.0.0.1:{metrics_port}")
    client = tc.InferenceServerClient(address)
    meta = client.get_model_metadata("teacher", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("logits_topk_values", "FP16", ["-1", "-1", "8"]),
        ("logits_topk_indices", "INT32", ["-1", "-1", "8"]),
    ]
    config = client.get_model_config("teacher").config
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
        ("logits_topk_values", "TYPE_FP16", [-1, 8]),
        ("logits_topk_indices", "TYPE_INT32", [-1, 8]),
    ]
    requests = _token_requests(16)
    results = _concurrently(client, [[("tokens", t)] for t in requests])
    for tokens, result in zip(requests, results, strict=True):
        got = result.as_numpy("logits_topk_values"), result.as_numpy("logits_topk_indices")
        want = dense_topk(expected_seq_onnx(tokens), 8, temperature=2.0, dtype=np.float16)
        assert got[0].shape == (*tokens.shape, 8)
        assert_topk(got, want)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    (padded,) = [line for line in metrics.splitlines() if line.startswith("distill_teacher_padded_positions_total")]
    assert float(padded.split()[-1]) > 0, "no request was padded"


@pytest.mark.timeout(90)
def test_cli_topk_python_model_logits(teachers: TeacherProcesses) -> None:
    address = teachers.start(
        "serving_models:seq_tag", "--topk", "4", "--topk-values", "logits", "--topk-output", "logits"
    )
    client = tc.InferenceServerClient(address)
    tokens = RNG.integers(0, 100, (5, 17))
    result = client.infer("teacher", [_input("tokens", tokens)])
    got = result.as_numpy("logits_topk_values"), result.as_numpy("logits_topk_indices")
    assert_topk(got, dense_topk(seq_logits(tokens), 4, "logits"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "2"], "--temperature needs --topk K"),
        (["--topk-output", "y", "--topk-dtype", "float16"], "--topk-output, --topk-dtype need --topk K"),
        (["--topk", "2", "--topk-output", "nope"], "--topk: top-k output 'nope' is not an output of the model"),
        (["--topk", "3"], "--topk: no output to compress to the top 3"),
        (["--topk", "2", "--topk-values", "logits", "--temperature", "2"], "temperature applies to logprobs"),
    ],
)
def test_cli_topk_bad_options(args: list[str], message: str) -> None:
    result = CliRunner().invoke(teacher, ["serve", "--model", "serving_models:affine", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
