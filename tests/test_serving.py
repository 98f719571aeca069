"""The built-in teacher server: real gRPC servers on loopback, OIP clients and raw stubs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from serving_models import B, Recorder, W, affine, build_affine_onnx, expected_affine
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from distill_reader.rpc import BackgroundServer
from distill_reader.serving import teacher_model
from distill_reader.serving.backends import load_backend
from distill_reader.serving.backends.onnx import OnnxBackend
from distill_reader.serving.backends.python import PythonBackend
from distill_reader.serving.server import running_server

TESTS = Path(__file__).parent
DISTILL = Path(sys.executable).with_name("distill")


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_affine_onnx(tmp_path_factory.mktemp("onnx") / "affine.onnx")


@pytest.fixture(scope="module")
def onnx_server(onnx_path: Path):
    with running_server(load_backend(str(onnx_path)), model_name="affine") as address:
        yield address


@pytest.fixture(scope="module")
def py_server():
    with running_server(PythonBackend(affine), max_delay_ms=1) as address:
        yield address


@pytest.fixture(scope="module")
def stub(py_server: str):
    with grpc.insecure_channel(py_server) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _infer_input(name: str, arr: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput(name, list(arr.shape), tc.np_to_triton_dtype(arr.dtype))
    inp.set_data_from_numpy(arr)
    return inp


def _affine_request(x: np.ndarray, m: np.ndarray, **kw) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="teacher", **kw)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.inputs.add(name="m", datatype="INT64", shape=m.shape)
    req.raw_input_contents.extend([x.tobytes(), m.tobytes()])
    return req


def _affine_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 100, (n, 2), dtype=np.int64)


class Gate:
    """A model ``y = x + 1`` whose batches set ``entered`` and then wait for ``release`` (10 s at
    most): a test knows when a request is in the model, and decides when it may leave."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

        @teacher_model(inputs=[("x", "float32", (1,))], outputs=[("y", "float32", (1,))])
        def model(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.entered.set()
            self.release.wait(10)
            return {"y": batch["x"] + 1}

        self.model = model


def _release_once_stopping(address: str, release: threading.Event) -> None:
    """Set ``release`` once the server at ``address`` stops being ready (it is stopping); 10 s at most."""
    probe = tc.InferenceServerClient(address)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            try:
                if not probe.is_server_ready():
                    return
            except InferenceServerException:  # already refusing calls
                return
            time.sleep(0.01)
    finally:
        release.set()
        probe.close()


# --- metadata and inference ------------------------------------------------------------------


def test_onnx_metadata(onnx_server: str) -> None:
    client = tc.InferenceServerClient(onnx_server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("affine")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("affine", as_json=True)
    assert meta["name"] == "affine"
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "3"]}]
    assert client.get_server_metadata().name == "distill-reader"


def test_onnx_infer(onnx_server: str) -> None:
    client = tc.InferenceServerClient(onnx_server)
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    result = client.infer("affine", [_infer_input("x", x)], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("y"), x @ W + B, rtol=1e-5, atol=1e-6)
    assert result.get_response().id == "req-7"


def test_onnx_fixed_batch_dim_runs_in_chunks(tmp_path: Path) -> None:
    backend = load_backend(str(build_affine_onnx(tmp_path / "b1.onnx", batch_dim=1)))
    assert isinstance(backend, OnnxBackend)
    assert backend.inputs[0].shape == (4,)
    with running_server(backend) as address:
        x = np.arange(20, dtype=np.float32).reshape(5, 4)
        result = tc.InferenceServerClient(address).infer("teacher", [_infer_input("x", x)])
        np.testing.assert_allclose(result.as_numpy("y"), x @ W + B, rtol=1e-5)


def test_python_metadata(py_server: str) -> None:
    meta = tc.InferenceServerClient(py_server).get_model_metadata("teacher", as_json=True)
    assert meta["platform"] == "python"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("x", "FP32", ["-1", "4"]),
        ("m", "INT64", ["-1", "2"]),
    ]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
        ("y", "FP32"),
        ("s", "FP64"),
        ("k", "INT64"),
    ]


def test_python_infer_all_and_requested_outputs(py_server: str) -> None:
    client = tc.InferenceServerClient(py_server)
    x, m = _affine_data(5)
    expected = expected_affine(x, m)
    result = client.infer("teacher", [_infer_input("x", x), _infer_input("m", m)])
    assert [o.name for o in result.get_response().outputs] == ["y", "s", "k"]
    for name, value in expected.items():
        np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-6)
    # Requested outputs come back in the requested order, and only those.
    wanted = [tc.InferRequestedOutput("k"), tc.InferRequestedOutput("y")]
    result = client.infer("teacher", [_infer_input("x", x), _infer_input("m", m)], outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["k", "y"]
    np.testing.assert_array_equal(result.as_numpy("k"), expected["k"])


def test_raw_stub_response_uses_raw_contents(stub) -> None:
    x, m = _affine_data(3)
    resp = stub.ModelInfer(_affine_request(x, m, id="abc"))
    assert resp.id == "abc" and resp.model_name == "teacher"
    assert [tuple(o.shape) for o in resp.outputs] == [(3, 3), (3, 1), (3, 2)]
    y = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(y, x @ W + B, rtol=1e-6)


def test_typed_contents_accepted(stub) -> None:
    x, m = _affine_data(2)
    req = service_pb2.ModelInferRequest(model_name="teacher")
    tx = req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    tx.contents.fp32_contents.extend(x.ravel().tolist())
    tm = req.inputs.add(name="m", datatype="INT64", shape=m.shape)
    tm.contents.int64_contents.extend(m.ravel().tolist())
    resp = stub.ModelInfer(req)
    k = np.frombuffer(resp.raw_output_contents[2], dtype=np.int64).reshape(2, 2)
    np.testing.assert_array_equal(k, m * 2)


# --- dynamic batching ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_dynamic_batching_merges_concurrent_requests() -> None:
    rec = Recorder()
    with running_server(PythonBackend(rec.model), max_batch=64, max_delay_ms=200) as address:
        client = tc.InferenceServerClient(address)
        data = [np.full((2, 3), i, dtype=np.float32) for i in range(16)]

        def call(x: np.ndarray) -> np.ndarray:
            return client.infer("teacher", [_infer_input("x", x)]).as_numpy("y")

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, data))
    for x, y in zip(data, results, strict=True):
        np.testing.assert_array_equal(y, x * 2)
    assert sum(rec.sizes) == 32
    assert max(rec.sizes) > 2, rec.sizes


@pytest.mark.timeout(30)
def test_max_batch_respected_and_large_request_runs_alone() -> None:
    rec = Recorder()
    with running_server(PythonBackend(rec.model), max_batch=4, max_delay_ms=100) as address:
        client = tc.InferenceServerClient(address)
        data = [np.full((1, 2), i, dtype=np.float32) for i in range(12)] + [np.ones((10, 2), np.float32)]

        def call(x: np.ndarray) -> np.ndarray:
            return client.infer("teacher", [_infer_input("x", x)]).as_numpy("y")

        with ThreadPoolExecutor(13) as pool:
            results = list(pool.map(call, data))
    for x, y in zip(data, results, strict=True):
        np.testing.assert_array_equal(y, x * 2)
    assert sorted(rec.sizes)[-1] == 10
    assert all(s <= 4 for s in rec.sizes if s != 10), rec.sizes
    assert sum(rec.sizes) == 22


@pytest.mark.timeout(30)
def test_requests_with_different_sample_shapes_get_their_own_shapes() -> None:
    """Requests that differ in a -1 dim are merged padded and cut back (tests/test_serving_sequences.py)."""
    rec = Recorder()
    with running_server(PythonBackend(rec.model), max_delay_ms=100) as address:
        client = tc.InferenceServerClient(address)
        data = [np.full((1, 2 + i % 2), i, dtype=np.float32) for i in range(8)]

        def call(x: np.ndarray) -> np.ndarray:
            return client.infer("teacher", [_infer_input("x", x)]).as_numpy("y")

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, data))
    for x, y in zip(data, results, strict=True):
        np.testing.assert_array_equal(y, x * 2)


@pytest.mark.timeout(30)
def test_backend_error_fails_only_its_batch() -> None:
    rec = Recorder(fail_when_negative=True)
    with running_server(PythonBackend(rec.model), max_delay_ms=0) as address:
        client = tc.InferenceServerClient(address)
        with pytest.raises(InferenceServerException) as err:
            client.infer("teacher", [_infer_input("x", -np.ones((2, 2), np.float32))])
        assert err.value.status() == "StatusCode.INTERNAL"
        assert "negative input in this batch" in err.value.message()
        y = client.infer("teacher", [_infer_input("x", np.ones((2, 2), np.float32))]).as_numpy("y")
        np.testing.assert_array_equal(y, 2 * np.ones((2, 2)))


def test_wrong_output_dtype_is_internal_error_naming_output() -> None:
    from serving_models import wrong_dtype

    with running_server(PythonBackend(wrong_dtype)) as address:
        client = tc.InferenceServerClient(address)
        with pytest.raises(InferenceServerException) as err:
            client.infer("teacher", [_infer_input("x", np.ones((2, 2), np.float32))])
        assert err.value.status() == "StatusCode.INTERNAL"
        assert "'y'" in err.value.message() and "float64" in err.value.message()


@pytest.mark.timeout(30)
def test_in_flight_request_finishes_when_server_stops() -> None:
    gate = Gate()
    with ThreadPoolExecutor(2) as pool:
        with running_server(PythonBackend(gate.model), max_delay_ms=0) as address:
            client = tc.InferenceServerClient(address)
            assert client.is_server_ready()
            pending = pool.submit(client.infer, "teacher", [_infer_input("x", np.full((1, 1), 3, np.float32))])
            assert gate.entered.wait(10)  # the request is in the model
            # It leaves the model only once the server is stopping.
            pool.submit(_release_once_stopping, address, gate.release)
        # Stopping waited (up to the grace period) for the running batch.
        np.testing.assert_array_equal(pending.result(timeout=10).as_numpy("y"), [[4.0]])


@pytest.mark.timeout(30)
def test_client_deadline_while_queued_does_not_disturb_others() -> None:
    gate = Gate()
    with running_server(PythonBackend(gate.model), max_delay_ms=0) as address:
        client = tc.InferenceServerClient(address)
        with ThreadPoolExecutor(2) as pool:
            try:
                busy = pool.submit(client.infer, "teacher", [_infer_input("x", np.full((1, 1), 3, np.float32))])
                assert gate.entered.wait(10)  # the only model instance is busy: the next request queues
                with pytest.raises(InferenceServerException) as err:
                    client.infer("teacher", [_infer_input("x", np.zeros((1, 1), np.float32))], client_timeout=0.1)
                assert "DEADLINE" in str(err.value.status())
            finally:
                gate.release.set()
            assert busy.result(timeout=10).as_numpy("y")[0, 0] == 4.0
        y = client.infer("teacher", [_infer_input("x", np.full((2, 1), 0, np.float32))]).as_numpy("y")
        np.testing.assert_array_equal(y, np.ones((2, 1)))


# --- bad requests ----------------------------------------------------------------------------


def _bad_requests():
    x, m = _affine_data(3)
    x2, _ = _affine_data(2)

    def unknown_model():
        r = _affine_request(x, m)
        r.model_name = "nosuchmodel"
        return r

    def missing_input():
        r = service_pb2.ModelInferRequest(model_name="teacher")
        r.inputs.add(name="x", datatype="FP32", shape=x.shape)
        r.raw_input_contents.append(x.tobytes())
        return r

    def unknown_input():
        r = _affine_request(x, m)
        r.inputs[1].name = "zz"
        return r

    def wrong_dtype():
        r = _affine_request(x, m)
        r.inputs[0].datatype = "FP64"
        return r

    def wrong_rank():
        r = _affine_request(x, m)
        del r.inputs[0].shape[:]
        r.inputs[0].shape.extend([12])
        return r

    def wrong_dim():
        r = _affine_request(x.reshape(6, 2), m)
        r.inputs[0].shape[:] = [6, 2]
        return r

    def raw_size():
        r = _affine_request(x, m)
        r.raw_input_contents[0] = x.tobytes()[:-4]
        return r

    def batch_sizes():
        return _affine_request(x2, m)

    def unknown_output():
        r = _affine_request(x, m)
        r.outputs.add(name="nope")
        return r

    def raw_count():
        r = _affine_request(x, m)
        del r.raw_input_contents[1]
        return r

    return [
        (unknown_model, grpc.StatusCode.NOT_FOUND, "'nosuchmodel'"),
        (missing_input, grpc.StatusCode.INVALID_ARGUMENT, "missing input 'm'"),
        (unknown_input, grpc.StatusCode.INVALID_ARGUMENT, "'zz'"),
        (wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "input 'x' has datatype FP64"),
        (wrong_rank, grpc.StatusCode.INVALID_ARGUMENT, "input 'x' has shape [12]"),
        (wrong_dim, grpc.StatusCode.INVALID_ARGUMENT, "input 'x' has shape [6, 2]"),
        (raw_size, grpc.StatusCode.INVALID_ARGUMENT, "input 'x': raw contents hold 44 bytes"),
        (batch_sizes, grpc.StatusCode.INVALID_ARGUMENT, "input 'm' has batch size 3"),
        (unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'nope'"),
        (raw_count, grpc.StatusCode.INVALID_ARGUMENT, "1 raw_input_contents for 2 inputs"),
    ]


@pytest.mark.parametrize(("make", "code", "message"), _bad_requests(), ids=lambda v: getattr(v, "__name__", ""))
def test_bad_request_gets_code_and_message_and_server_keeps_serving(stub, make, code, message) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(make())
    assert err.value.code() == code
    assert message in err.value.details()
    x, m = _affine_data(2)
    resp = stub.ModelInfer(_affine_request(x, m))
    assert len(resp.raw_output_contents) == 3


def test_model_metadata_unknown_model_not_found(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'ghost'" in err.value.details()


# --- backends --------------------------------------------------------------------------------


def test_load_backend_errors_name_the_spec(tmp_path: Path) -> None:
    for spec in ["model.txt", str(tmp_path / "missing.onnx"), "serving_models:nothing", "no_such_mod:f"]:
        with pytest.raises(ValueError, match=re.escape(repr(spec))):
            load_backend(spec)
    with pytest.raises(ValueError, match="does not declare its inputs and outputs"):
        load_backend("serving_models:undeclared")


def test_load_python_backend_from_module_and_file() -> None:
    for spec in ["serving_models:affine", f"{TESTS / 'serving_models.py'}:affine"]:
        backend = load_backend(spec)
        assert [s.name for s in backend.outputs] == ["y", "s", "k"]
        x, m = _affine_data(3)
        np.testing.assert_array_equal(backend.infer({"x": x, "m": m})["k"], m * 2)


def test_teacher_model_rejects_bad_declarations() -> None:
    with pytest.raises(ValueError, match="'x'"):
        teacher_model(inputs=[("x", "complex128", (2,))], outputs=[("y", "float32", (1,))])
    with pytest.raises(ValueError, match="duplicate"):
        teacher_model(inputs=[("x", "float32", (2,)), ("x", "float32", (2,))], outputs=[])


def test_running_server_reports_bind_failure(py_server: str) -> None:
    with pytest.raises(OSError, match=re.escape(py_server)), running_server(PythonBackend(affine), py_server):
        pass


@pytest.mark.parametrize(
    ("listen", "options", "named"),
    [
        ("localhost", {}, "--listen"),
        ("127.0.0.1:65536", {}, "--listen"),
        ("127.0.0.1:0", {"metrics_listen": "127.0.0.1"}, "--metrics"),
    ],
)
def test_running_server_names_a_bad_address(listen: str, options: dict, named: str) -> None:
    with (
        pytest.raises(ValueError, match=f"{named} must be HOST:PORT with a port in 0-65535"),
        running_server(PythonBackend(affine), listen, **options),
    ):
        pass


def test_running_server_refuses_an_unknown_option() -> None:
    with pytest.raises(TypeError, match="max_batches"), running_server(PythonBackend(affine), max_batches=4):
        pass


def test_running_server_ends_its_thread_and_frees_its_port() -> None:
    before = set(threading.enumerate())  # module fixtures' servers run too
    with running_server(PythonBackend(affine), metrics_listen="127.0.0.1:0") as address:
        ours = [t for t in threading.enumerate() if t not in before and t.name == "teacher server"]
        assert len(ours) == 1 and tc.InferenceServerClient(address).is_server_ready()
    assert not ours[0].is_alive()
    with running_server(PythonBackend(affine), address) as again:  # the port is free again
        assert again == address


def test_background_server_start_times_out_and_ends_its_thread() -> None:
    class NeverBinds:
        async def start(self) -> None:
            await asyncio.Event().wait()

        async def stop(self) -> None:
            pass

    background = BackgroundServer("stuck server", NeverBinds)
    with pytest.raises(TimeoutError, match="the stuck server did not start within 0.2 s"):
        background.start(0.2)
    assert "stuck server" not in [t.name for t in threading.enumerate()]


# --- the command line ------------------------------------------------------------------------


def _start_cli(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [str(DISTILL), "teacher", "serve", "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=env,
    )
    lines = []
    for line in proc.stderr:  # bounded by the test's timeout
        lines.append(line)
        found = re.search(r"serving on (\S+?);", line)
        if found:
            return proc, found.group(1)
    proc.wait()
    raise AssertionError(f"server did not start: {''.join(lines)}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serves_and_stops_on_signal(onnx_path: Path, sig: signal.Signals) -> None:
    proc, address = _start_cli("--model", str(onnx_path), "--name", "affine", "--max-batch", "8")
    try:
        client = tc.InferenceServerClient(address)
        assert client.is_model_ready("affine")
        x = np.ones((3, 4), np.float32)
        np.testing.assert_allclose(client.infer("affine", [_infer_input("x", x)]).as_numpy("y"), x @ W + B, rtol=1e-5)
        client.close()
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=15)  # a server that does not stop on the signal fails here
        stderr = proc.stderr.read()
        assert rc == 0, stderr
        # One line when the signal arrives and one when stopped, like `distill discovery serve`.
        assert f"teacher 'affine' on {address} stopping ({sig.name})\n" in stderr
        assert f"teacher 'affine' on {address} stopped\n" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_cli_serves_python_model() -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc, address = _start_cli("--model", "serving_models:affine", env=env)
    try:
        x, m = _affine_data(4)
        result = tc.InferenceServerClient(address).infer("teacher", [_infer_input("x", x), _infer_input("m", m)])
        np.testing.assert_array_equal(result.as_numpy("k"), m * 2)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", ["nonsense", "missing_file.onnx", "serving_models:undeclared"])
def test_cli_bad_model_exits_nonzero_naming_it(spec: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.run(
        [str(DISTILL), "teacher", "serve", "--model", spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
    )
    assert proc.returncode != 0
    assert spec in proc.stderr
    assert "Traceback" not in proc.stderr
