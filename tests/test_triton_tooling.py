"""NVIDIA's own client (``tritonclient.grpc``) against ``distill teacher serve``: the Triton calls that
perf_analyzer, Model Analyzer and dashboards use (ModelConfig, RepositoryIndex, ModelStatistics,
ModelStreamInfer), on real teacher processes on loopback."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import TeacherProcesses
from serving_models import B, W, build_affine_onnx, expected_affine
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from distill_reader.serving import teacher_model
from distill_reader.serving.backends.python import PythonBackend
from distill_reader.serving.batcher import DynamicBatcher
from distill_reader.serving.server import TeacherServer, running_server

pytestmark = pytest.mark.timeout(90)

TOKEN = "triton-tooling-token"
REQUEST_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def fleet() -> Iterator[TeacherProcesses]:
    with TeacherProcesses() as processes:
        yield processes


@pytest.fixture(scope="module")
def onnx_teacher(fleet: TeacherProcesses, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ONNX affine model as ``affine``, with non-default batching so the config shows them."""
    path = build_affine_onnx(tmp_path_factory.mktemp("onnx") / "affine.onnx")
    return fleet.start(str(path), "--name", "affine", "--max-batch", "16", "--max-delay-ms", "5", "--instances", "2")


@pytest.fixture(scope="module")
def py_teacher(fleet: TeacherProcesses) -> str:
    """``serving_models:affine`` (two inputs, three outputs of different dtypes) with the defaults."""
    return fleet.start("serving_models:affine")


def _input(name: str, arr: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput(name, list(arr.shape), tc.np_to_triton_dtype(arr.dtype))
    inp.set_data_from_numpy(arr)
    return inp


def _x(rows: int, seed: int, cols: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def _tensors(specs) -> list[tuple[str, str, list[int]]]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in specs]


def _stats(client: tc.InferenceServerClient, name: str = "affine") -> service_pb2.ModelStatistics:
    (stats,) = client.get_inference_statistics(name).model_stats
    return stats


def _not_found(call) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    assert err.value.status() == "StatusCode.NOT_FOUND"
    return err.value.message()


# --- ModelConfig ---------------------------------------------------------------------------------


def test_model_config_onnx(onnx_teacher: str) -> None:
    client = tc.InferenceServerClient(onnx_teacher)
    config = client.get_model_config("affine").config
    assert (config.name, config.platform, config.backend) == ("affine", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 16
    # Triton's dims leave the batch dimension out when max_batch_size > 0.
    assert _tensors(config.input) == [("x", "TYPE_FP32", [4])]
    assert _tensors(config.output) == [("y", "TYPE_FP32", [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert config.version_policy.latest.num_versions == 1
    assert client.get_model_config("affine", "1").config == config
    assert "'nosuch'" in _not_found(lambda: client.get_model_config("nosuch"))
    assert "version '2'" in _not_found(lambda: client.get_model_config("affine", "2"))
    # The JSON form tools print.
    assert client.get_model_config("affine", as_json=True)["config"]["max_batch_size"] == 16


def test_model_config_python(py_teacher: str) -> None:
    config = tc.InferenceServerClient(py_teacher).get_model_config("teacher").config
    assert (config.platform, config.backend, config.max_batch_size) == ("python", "python", 64)
    assert _tensors(config.input) == [("x", "TYPE_FP32", [4]), ("m", "TYPE_INT64", [2])]
    assert _tensors(config.output) == [("y", "TYPE_FP32", [3]), ("s", "TYPE_FP64", [1]), ("k", "TYPE_INT64", [2])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [g.count for g in config.instance_group] == [1]


@teacher_model(inputs=[("x", "float32", ())], outputs=[("y", "int64", (-1, 2))])
def _scalar_in(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": np.zeros((len(batch["x"]), 1, 2), np.int64)}


def test_model_config_scalar_sample_and_variable_dims() -> None:
    with running_server(PythonBackend(_scalar_in)) as address:
        config = tc.InferenceServerClient(address).get_model_config("teacher").config
    # Like Triton: a per-sample scalar is dims [1] reshaped to []; -1 is a variable dim.
    (x,) = config.input
    assert list(x.dims) == [1] and x.HasField("reshape") and list(x.reshape.shape) == []
    (y,) = config.output
    assert list(y.dims) == [-1, 2] and not y.HasField("reshape")


# --- RepositoryIndex -----------------------------------------------------------------------------


def test_repository_index(onnx_teacher: str) -> None:
    index = tc.InferenceServerClient(onnx_teacher).get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [("affine", "1", "READY")]
    with grpc.insecure_channel(onnx_teacher) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready_only = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
    assert [(m.name, m.state) for m in ready_only.models] == [("affine", "READY")]


def test_repository_index_of_a_server_not_serving() -> None:
    # A servicer that was never started is what a stopping server looks like: not ready.
    servicer = TeacherServer(PythonBackend(_scalar_in), DynamicBatcher(PythonBackend(_scalar_in)))

    async def index(ready: bool) -> service_pb2.RepositoryIndexResponse:
        return await servicer.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=ready), None)

    assert list(asyncio.run(index(True)).models) == []
    (model,) = asyncio.run(index(False)).models
    assert (model.name, model.state) == ("teacher", "UNAVAILABLE") and model.reason


# --- ModelStatistics -----------------------------------------------------------------------------


def _delta(after: service_pb2.StatisticDuration, before: service_pb2.StatisticDuration) -> tuple[int, int]:
    return after.count - before.count, after.ns - before.ns


def _batch_counts(stats: service_pb2.ModelStatistics) -> dict[int, int]:
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def test_statistics_count_every_request_row_and_batch(onnx_teacher: str) -> None:
    client = tc.InferenceServerClient(onnx_teacher)
    assert [s.name for s in client.get_inference_statistics().model_stats] == ["affine"]  # "" = all models
    assert "'nosuch'" in _not_found(lambda: client.get_inference_statistics("nosuch"))
    assert _stats(client).version == "1"

    def infer_round(requests: int, rows: int, seed: int) -> service_pb2.ModelStatistics:
        # One at a time: each request is a batch of its own.
        for i in range(requests):
            x = _x(rows, seed + i)
            y = client.infer("affine", [_input("x", x)]).as_numpy("y")
            np.testing.assert_allclose(y, x @ W + B, rtol=1e-5, atol=1e-6)
        return _stats(client)

    before = _stats(client)
    started_ms = time.time_ns() // 1_000_000
    first = infer_round(5, 3, seed=100)
    assert started_ms <= first.last_inference <= time.time_ns() // 1_000_000
    second = infer_round(4, 3, seed=200)

    for stats, earlier, n in ((first, before, 5), (second, first, 4)):
        assert stats.inference_count - earlier.inference_count == n * 3
        assert stats.execution_count - earlier.execution_count == n
        assert _batch_counts(stats).get(3, 0) - _batch_counts(earlier).get(3, 0) == n
        success_count, success_ns = _delta(stats.inference_stats.success, earlier.inference_stats.success)
        assert success_count == n and success_ns > 0
        assert _delta(stats.inference_stats.fail, earlier.inference_stats.fail) == (0, 0)
        parts_ns = 0
        for part in REQUEST_PARTS:
            count, ns = _delta(getattr(stats.inference_stats, part), getattr(earlier.inference_stats, part))
            assert count == n and ns > 0, part  # times are cumulative: they only grow
            parts_ns += ns
        # The parts are disjoint spans of each request's time from receipt to answer.
        assert parts_ns <= success_ns
    assert second.last_inference >= first.last_inference

    # Failures: a request that does not fit the model; one for another model is nobody's.
    with pytest.raises(InferenceServerException):
        client.infer("affine", [_input("x", _x(2, 0, cols=5))])
    with pytest.raises(InferenceServerException):
        client.infer("nosuch", [_input("x", _x(2, 0))])
    failed = _stats(client)
    assert _delta(failed.inference_stats.fail, second.inference_stats.fail)[0] == 1
    assert failed.inference_stats.success == second.inference_stats.success
    assert failed.inference_count == second.inference_count


def test_statistics_of_merged_batches_add_up(onnx_teacher: str) -> None:
    client = tc.InferenceServerClient(onnx_teacher)
    before = _stats(client)
    data = [_x(2, i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: client.infer("affine", [_input("x", x)]).as_numpy("y"), data))
    for x, y in zip(data, results, strict=True):
        np.testing.assert_allclose(y, x @ W + B, rtol=1e-5, atol=1e-6)
    after = _stats(client)
    assert after.inference_count - before.inference_count == 16
    assert _delta(after.inference_stats.success, before.inference_stats.success)[0] == 8
    sizes_before, sizes_after = _batch_counts(before), _batch_counts(after)
    ran = {size: count - sizes_before.get(size, 0) for size, count in sizes_after.items()}
    # However the requests were merged, the batches hold exactly their rows.
    assert sum(size * count for size, count in ran.items()) == 16
    assert sum(ran.values()) == after.execution_count - before.execution_count <= 8


# --- ModelStreamInfer ----------------------------------------------------------------------------


class StreamResults:
    """A ``start_stream`` callback collecting ``(result, error)`` pairs in arrival order."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self._queue.put((result, error))

    def take(self, n: int) -> list[tuple]:
        return [self._queue.get(timeout=30) for _ in range(n)]


def test_stream_answers_in_order_and_survives_bad_requests(py_teacher: str) -> None:
    client = tc.InferenceServerClient(py_teacher)
    before = _stats(client, "teacher")
    data = [(_x(1 + i % 3, i), np.arange(2 * (1 + i % 3), dtype=np.int64).reshape(-1, 2) + i) for i in range(10)]
    bad_shape, bad_model = 4, 7
    results = StreamResults()
    client.start_stream(results)
    try:
        # Sent without waiting: the server answers them together, and in order.
        for i, (x, m) in enumerate(data):
            if i == bad_shape:
                x = _x(len(x), i, cols=5)
            model = "ghost" if i == bad_model else "teacher"
            client.async_stream_infer(model, [_input("x", x), _input("m", m)], request_id=str(i))
        answers = results.take(len(data))
    finally:
        client.stop_stream()
    for i, ((x, m), (result, error)) in enumerate(zip(data, answers, strict=True)):
        if i == bad_shape:
            assert result is None and f"input 'x' has shape [{len(x)}, 5], expected [-1, 4]" in error.message()
            continue
        if i == bad_model:
            assert result is None and "model 'ghost' not found" in error.message()
            continue
        assert error is None, error
        assert result.get_response().id == str(i)
        expected = expected_affine(x, m)
        np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("s"), expected["s"], rtol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("k"), expected["k"])
    # Streamed requests take ModelInfer's path: counted like it (an unknown model is nobody's).
    after = _stats(client, "teacher")
    assert _delta(after.inference_stats.success, before.inference_stats.success)[0] == 8
    assert _delta(after.inference_stats.fail, before.inference_stats.fail)[0] == 1
    rows = sum(len(x) for i, (x, _) in enumerate(data) if i not in (bad_shape, bad_model))
    assert after.inference_count - before.inference_count == rows


def test_stream_with_a_malformed_message_goes_on(py_teacher: str) -> None:
    x, m = _x(2, 1), np.ones((2, 2), np.int64)
    good = service_pb2.ModelInferRequest(model_name="teacher", id="good")
    good.inputs.add(name="x", datatype="FP32", shape=x.shape)
    good.inputs.add(name="m", datatype="INT64", shape=m.shape)
    good.raw_input_contents.extend([x.tobytes(), m.tobytes()])
    with grpc.insecure_channel(py_teacher) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        raw = list(call(iter([good.SerializeToString(), b"\xff\xff\xff", good.SerializeToString()]), timeout=30))
    first, broken, last = (service_pb2.ModelStreamInferResponse.FromString(r) for r in raw)
    assert broken.error_message.startswith("malformed request: not a valid inference.ModelInferRequest")
    for answer in (first, last):
        assert answer.error_message == "" and answer.infer_response.id == "good"
        y = np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32).reshape(2, 3)
        np.testing.assert_allclose(y, x @ W + B, rtol=1e-6)


# --- security ------------------------------------------------------------------------------------


def test_token_protects_the_triton_calls(teachers: TeacherProcesses, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    address = teachers.start("serving_models:affine", "--token-file", str(token_file))
    client = tc.InferenceServerClient(address)
    for call in (
        lambda **kw: client.get_model_config("teacher", **kw),
        lambda **kw: client.get_model_repository_index(**kw),
        lambda **kw: client.get_inference_statistics("teacher", **kw),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "StatusCode.UNAUTHENTICATED" and "token" in err.value.message()
        call(headers={"authorization": f"Bearer {TOKEN}"})
    x, m = _x(2, 3), np.ones((2, 2), np.int64)
    for headers in (None, {"authorization": f"Bearer {TOKEN}"}):
        results = StreamResults()
        client.start_stream(results, headers=headers)
        try:
            try:
                client.async_stream_infer("teacher", [_input("x", x), _input("m", m)])
            except InferenceServerException:
                # The refusal may end the stream before the request is sent: the client then says
                # so here, and reports the refusal through the callback either way.
                assert headers is None
            ((result, error),) = results.take(1)
        finally:
            client.stop_stream()
        if headers is None:
            assert result is None and error.status() == "StatusCode.UNAUTHENTICATED"
        else:
            assert error is None and np.array_equal(result.as_numpy("k"), m * 2)
