"""Fuzzing: mutated configs, malformed samples, random and oversized bytes at the teacher and
discovery ports. Each gets a clear error naming what is wrong; the servers keep serving."""

from __future__ import annotations

import socket

import grpc
import numpy as np
import pytest
from conftest import SEED_CONFIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reader_models import make_sample, tag_rows
from test_reader import check_epoch
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader import ConfigError, DistillReader, SampleError
from distill_reader.config import load_config
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.server import running_discovery

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# -- configs -----------------------------------------------------------------------------------

GOOD = SEED_CONFIG.format(servers=["127.0.0.1:9292"], extra="")
LINES = GOOD.splitlines()
KEYED = [(i, line.split("=", 1)[0].strip()) for i, line in enumerate(LINES) if "=" in line]
SECTION_OF = {}
_section = ""
for _i, _line in enumerate(LINES):
    if _line.startswith("["):
        _section = _line.strip()
    SECTION_OF[_i] = _section

TRICKY_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "[]",
            "()",
            "None",
            "0",
            "-1",
            "1e9",
            "True",
            "[0]",
            "[5]",
            "[-1]",
            "['img']",
            "['img', 'img']",
            "[(1, 4, 4)]",
            "[(0,)]",
            "[(-1, 4)]",
            "[(1.5,)]",
            "[(True,)]",
            "[('a',)]",
            "[[1, 2]]",
            "['float128']",
            "['float32', 'int64', 'bool']",
            "['complex64']",
            "['object']",
            "['str']",
            "[(10**9,)]",
            "((",
            "[(1, 4, 4), (1,), (2,)]",
            "discover",
            "fixed",
            "['localhost']",
            "['h:0']",
            "['h:99999']",
            "[' ']",
            "{'a': 1}",
            "b'x'",
            "__import__('os')",
            "[" * 200,
        ]
    ),
    st.text(max_size=40).map(lambda s: s.replace("\n", " ").replace("\r", " ")),
)


@st.composite
def mutated_configs(draw) -> tuple[str, str]:
    """(config text, the section the mutation touched)."""
    lines = list(LINES)
    index, key = draw(st.sampled_from(KEYED))
    section = SECTION_OF[index]
    op = draw(st.sampled_from(["value", "value", "value", "drop", "duplicate", "drop-section", "garbage"]))
    if op == "value":
        lines[index] = f"{key} = {draw(TRICKY_VALUES)}"
    elif op == "drop":
        del lines[index]
    elif op == "duplicate":
        lines.insert(index, lines[index])
    elif op == "drop-section":
        lines = [line for line in lines if line.strip() != section]
    else:
        lines.insert(index, draw(st.text(min_size=1, max_size=30)).replace("\n", " ").replace("\r", " "))
    return "\n".join(lines) + "\n", section


@FUZZ
@given(mutated_configs())
def test_mutated_config_is_valid_or_a_config_error_naming_the_place(tmp_path_factory, mutation):
    text, section = mutation
    path = tmp_path_factory.mktemp("cfg") / "fuzz.conf"
    path.write_text(text)
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message and (section in message or "INI" in message or "section" in message), (message, text)
        return
    # Valid: it must describe a usable layout.
    assert config.feeds and config.fetches and config.predict_feeds
    assert all(dim >= 1 for spec in (*config.feeds, *config.fetches) for dim in spec.shape)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("fetch_shapes = [(10, )]", "fetch_shapes = [(100000, 100000, 1000)]"), "fetch_shapes"),
        (("feed_shapes = [(1, 4, 4), (1,)]", "feed_shapes = [(1, 4, 4), (1000000, 1000000)]"), "feed_shapes"),
    ],
)
def test_absurd_shapes_fail_clearly_naming_the_key(write_config, change, message):
    text = SEED_CONFIG.format(servers=["127.0.0.1:9"], extra="").replace(*change)
    with pytest.raises(ConfigError, match=message):
        dr = DistillReader(write_config(text=text), 1024, 4, capacity=4, occupied_capacity=1)
        dr.set_sample_generator(lambda: iter([]))
        with dr:
            list(dr.distill_reader()())


@FUZZ
@given(
    batch_size=st.integers(-2, 2**40),
    d_batch_size=st.integers(-2, 2**40),
    capacity=st.integers(-2, 2**40),
    occupied=st.integers(-2, 2**40),
)
def test_constructor_sizes_are_valid_or_a_config_error(write_config, batch_size, d_batch_size, capacity, occupied):
    config = write_config(["127.0.0.1:9"])
    try:
        dr = DistillReader(config, batch_size, d_batch_size, capacity=capacity, occupied_capacity=occupied)
    except ConfigError as exc:
        assert str(exc)
        return
    dr.close()
    assert batch_size >= 1 and d_batch_size >= 1 and capacity > occupied >= 0


# -- samples -----------------------------------------------------------------------------------

DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]


@st.composite
def fields(draw):
    kind = draw(st.sampled_from(["array", "array", "array", "list", "scalar", "none", "str"]))
    if kind == "array":
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        return np.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
    return {"list": [1.0, 2.0], "scalar": 3.0, "none": None, "str": "img"}[kind]


@pytest.fixture(scope="module")
def fuzz_reader(tag_teachers, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "reader.conf"
    path.write_text(SEED_CONFIG.format(servers=tag_teachers, extra=""))
    dr = DistillReader(path, 2, 1, capacity=4, occupied_capacity=0, copy=True)
    yield dr
    dr.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(sample=st.one_of(st.lists(fields(), max_size=4).map(tuple), fields()))
def test_malformed_sample_is_a_sample_error_naming_the_sample(fuzz_reader, sample):
    def reader():
        yield from (make_sample(i) for i in range(3))
        yield sample
        yield from (make_sample(i) for i in range(4, 8))

    fuzz_reader.set_sample_generator(reader)
    try:
        batches = list(fuzz_reader.distill_reader()())
    except SampleError as exc:
        assert "sample 3" in str(exc), str(exc)
    else:  # accepted: it must have matched the config
        assert len(batches) == 4
        assert batches[1][0].shape == (2, 1, 4, 4)
    # The reader keeps working.
    fuzz_reader.set_sample_generator(lambda: (make_sample(i) for i in range(6)))
    check_epoch(list(fuzz_reader.distill_reader()()), 6, 2)


def test_nan_in_samples_passes_through_unchanged(fuzz_reader):
    """NaN is data: it reaches the teacher and comes back in the batch, no error."""
    samples = []
    for i in range(20):
        img, label = make_sample(i)
        if i % 3 == 0:
            img = img.copy()
            img[0, 0, i % 4] = np.nan
        samples.append((img, label))
    fuzz_reader.set_sample_generator(lambda: iter(samples))
    batches = list(fuzz_reader.distill_reader()())
    imgs = np.concatenate([b[0] for b in batches])
    expected = np.stack([s[0] for s in samples])
    np.testing.assert_array_equal(imgs, expected)  # NaN where NaN was
    predictions = np.concatenate([b[2] for b in batches])
    np.testing.assert_array_equal(predictions, tag_rows(expected))
    assert np.isnan(predictions[::3]).any() and not np.isnan(predictions[1::3]).any()


# -- bytes at the ports ------------------------------------------------------------------------


def _blast(endpoint: str, data: bytes) -> None:
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.settimeout(2)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass  # the server may close on us: that is fine


def _teacher_serves(endpoint: str) -> None:
    with grpc.insecure_channel(endpoint) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        img = np.stack([make_sample(i)[0] for i in range(3)])
        request = service_pb2.ModelInferRequest(
            model_name="teacher",
            inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="img", datatype="FP32", shape=[3, 1, 4, 4])],
            raw_input_contents=[img.tobytes()],
        )
        response = stub.ModelInfer(request, timeout=10)
        out = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 10)
        np.testing.assert_array_equal(out, tag_rows(img))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.binary(max_size=4096), st.just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 70000)))
def test_random_bytes_at_the_teacher_port(tag_teachers, data):
    _blast(tag_teachers[0], data)
    _teacher_serves(tag_teachers[0])


def test_oversized_bytes_at_the_teacher_port(tag_teachers):
    _blast(tag_teachers[0], np.random.default_rng(0).bytes(16 << 20))
    _teacher_serves(tag_teachers[0])


INFER = st.builds(
    lambda name, dtype, shape, raws: service_pb2.ModelInferRequest(
        model_name="teacher",
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=shape)],
        raw_input_contents=raws,
    ),
    st.sampled_from(["img", "image", ""]),
    st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "XX"]),
    st.lists(st.integers(-2, 2**40), max_size=5),
    st.lists(st.binary(max_size=512), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=INFER)
def test_malformed_infer_requests_get_a_clear_error(tag_teachers, request):
    with grpc.insecure_channel(tag_teachers[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), exc
            assert exc.details()
        else:  # only a well-formed request may succeed
            assert request.inputs[0].name == "img" and request.inputs[0].datatype == "FP32"
    _teacher_serves(tag_teachers[1])


@pytest.fixture(scope="module")
def discovery():
    with running_discovery() as address:
        yield address


def _discovery_serves(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DiscoveryStub(channel)
        stub.Status(pb.StatusRequest(), timeout=10)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=4096))
def test_random_bytes_at_the_discovery_port(discovery, data):
    _blast(discovery, data)
    _discovery_serves(discovery)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["RegisterTeacher", "KeepAlive", "DeregisterTeacher", "Status"]),
    payload=st.one_of(st.binary(max_size=2048), st.just(b"\x0a\xff\xff\x7f" + b"x" * (200 << 10))),
)
def test_garbage_messages_to_discovery_get_a_clear_error(discovery, method, payload):
    with grpc.insecure_channel(discovery) as channel:
        call = channel.unary_unary(f"/distill_reader.discovery.Discovery/{method}")
        try:
            call(payload, timeout=10)
        except grpc.RpcError as exc:
            assert exc.details()
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in exc.details():
                assert "not a valid distill_reader.discovery." in exc.details()
    _discovery_serves(discovery)


@pytest.mark.parametrize("method", ["RegisterTeacher", "KeepAlive", "Status"])
def test_malformed_protobuf_to_discovery_is_invalid_argument(discovery, method):
    with grpc.insecure_channel(discovery) as channel:
        call = channel.unary_unary(f"/distill_reader.discovery.Discovery/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


def test_oversized_bytes_at_the_discovery_port(discovery):
    _blast(discovery, np.random.default_rng(1).bytes(16 << 20))
    _discovery_serves(discovery)


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "ServerReady"])
def test_malformed_protobuf_to_a_teacher_is_invalid_argument(tag_teachers, method):
    with grpc.insecure_channel(tag_teachers[0]) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "not a valid inference." in info.value.details()
