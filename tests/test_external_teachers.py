"""External OIP servers as teachers: NVIDIA Triton (through PyTriton) and Seldon MLServer, for real.

Each server runs from its own virtual environment (``scripts/external-teachers.sh``; the tests skip
when it is missing) and serves two models: ``digits``, the demo's MLP exported to ONNX and run with
onnxruntime (checked with allclose against the numpy forward pass), and ``tag``, the exact model of
``reader_models`` (checked bit for bit). The reader streams through them in fixed mode and, through
``distill teacher register`` and a discovery server, in discover mode.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import SEED_CONFIG, free_port, wait_for
from external_support import (
    ExternalServer,
    missing_external_teacher,
    require_venv,
    session_pids,
    start_mlserver,
    start_triton,
)
from prometheus_client.parser import text_string_to_metric_families
from reader_models import make_sample
from test_reader import check_epoch, sample_list_reader

from distill_reader import DistillReader, TeacherMismatchError
from distill_reader.discovery.client import fetch_status
from distill_reader.discovery.server import running_discovery

pytestmark = pytest.mark.timeout(120)

READY_TIMEOUT_S = 90.0
SERVERS = {
    # name: (venv under build/teachers, module its python must import)
    "triton": ("pytriton-venv", "pytriton.triton, onnxruntime"),
    "mlserver": ("mlserver-venv", "mlserver, onnxruntime"),
}


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory):
    """The demo's teacher: weights (the numpy reference), its ONNX file and the test images."""
    try:
        import onnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        missing_external_teacher(f"{exc.name} is not installed (pip install -e '.[demo]')")
    from distill_reader.demo.digits import load_digits_split, train_teacher, write_onnx

    data = load_digits_split()
    weights = train_teacher(data, hidden=64)
    onnx = write_onnx(weights, tmp_path_factory.mktemp("digits") / "digits.onnx")
    return weights, onnx, data.x_test


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[ExternalServer]:
    """One external server (per parameter), started once for the module's tests."""
    venv, module = SERVERS[request.param]
    python = require_venv(venv, module)
    _, onnx, _ = request.getfixturevalue("digits_teacher")  # trained only when a server can run
    workdir = tmp_path_factory.mktemp(request.param)
    if request.param == "triton":
        started = start_triton(python, onnx, workdir, digits_name="digits", tag_name="tag")
    else:
        started = start_mlserver(python, onnx, workdir)
    try:
        started.wait_ready(READY_TIMEOUT_S)
        yield started
    finally:
        started.stop()
        assert not session_pids(started.process.pid), f"{started.name} left processes behind"


def tag_config(write_config, conf: str) -> Path:
    """The tag models' seed config with ``[conf]`` replaced by ``conf``."""
    text = SEED_CONFIG.format(servers=[], extra="").replace("mode = fixed\nservers = []\n", conf + "\n")
    return write_config(text=text)


def digits_config(tmp_path: Path, conf: str) -> Path:
    from distill_reader.demo.digits import CONFIG_TEMPLATE, INPUT_NAME, N_CLASSES, N_FEATURES, OUTPUT_NAME

    text = CONFIG_TEMPLATE.format(
        servers=[], input=INPUT_NAME, output=OUTPUT_NAME, features=N_FEATURES, classes=N_CLASSES
    )
    path = tmp_path / "digits.conf"
    path.write_text(text.replace("mode = fixed\nservers = []\nmodel_name = 'digits'", conf))
    return path


def run_tag(config: Path, n: int = 600, epochs: int = 2) -> None:
    """Epochs through the ``tag`` teacher: every row once, in order, its own exact output."""
    dr = DistillReader(config, 32, 8, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=30)
    dr.set_sample_list_generator(sample_list_reader(n, 8))
    with dr:
        for _ in range(epochs):
            check_epoch(list(dr.distill_reader()()), n, 32)


def run_digits(config: Path, digits_teacher) -> None:
    """One epoch of real digits through the ONNX teacher: outputs close to the numpy forward pass."""
    weights, _, x_test = digits_teacher
    dr = DistillReader(config, 64, 16, capacity=4, occupied_capacity=1, copy=True, teacher_timeout=30)
    dr.set_sample_generator(lambda: ((x_test[i], np.array([i], dtype=np.int64)) for i in range(len(x_test))))
    with dr:
        batches = list(dr.distill_reader()())
    assert [len(b[0]) for b in batches] == [64] * (len(x_test) // 64) + [len(x_test) % 64]
    pixels, labels, logits = (np.concatenate(parts) for parts in zip(*batches))
    np.testing.assert_array_equal(labels[:, 0], np.arange(len(x_test)))
    np.testing.assert_array_equal(pixels, x_test)
    assert logits.dtype == np.float32 and logits.shape == (len(x_test), 10)
    np.testing.assert_allclose(logits, weights.logits(x_test), rtol=1e-4, atol=1e-4)


def test_fixed_mode_tag_bit_exact(server, write_config):
    run_tag(tag_config(write_config, f"mode = fixed\nservers = ['{server.endpoint}']\nmodel_name = tag"))


def test_fixed_mode_digits_onnx(server, digits_teacher, tmp_path):
    run_digits(
        digits_config(tmp_path, f"mode = fixed\nservers = ['{server.endpoint}']\nmodel_name = digits"), digits_teacher
    )


def test_metadata_mismatch_is_caught_before_streaming(server, write_config):
    """A wrong model name or a wrong per-sample shape stops the reader with a message naming it."""
    base = f"mode = fixed\nservers = ['{server.endpoint}']\nmodel_name = "
    for conf, fix, message in (
        (base + "no_such_model", None, "no_such_model"),
        (base + "tag", ("fetch_shapes = [(10, )]", "fetch_shapes = [(11, )]"), "'prediction'"),
    ):
        path = tag_config(write_config, conf)
        if fix is not None:
            path.write_text(path.read_text().replace(*fix))
        dr = DistillReader(path, 4, 2, capacity=2, occupied_capacity=0)
        dr.set_sample_generator(lambda: (make_sample(i) for i in range(8)))
        with dr, pytest.raises(TeacherMismatchError) as info:
            list(dr.distill_reader()())
        assert message in str(info.value)


def test_a_model_that_declares_no_tensors_is_checked_by_its_answers(server, write_config, caplog):
    """MLServer's default for a custom runtime: metadata with no tensors. The reader takes the model
    and checks its answers; answers that do not fit the config quarantine it (the only teacher
    here: the epoch fails at once, naming what is wrong)."""
    if server.name != "MLServer":
        pytest.skip("Triton always declares a model's tensors")
    conf = f"mode = fixed\nservers = ['{server.endpoint}']\nmodel_name = tag_undeclared"
    with caplog.at_level(logging.INFO, logger="distill_reader"):
        run_tag(tag_config(write_config, conf), epochs=1)
    assert any("declares no tensors" in r.getMessage() for r in caplog.records)
    path = tag_config(write_config, conf)
    path.write_text(path.read_text().replace("fetch_vars = ['prediction']", "fetch_vars = ['probs']"))
    dr = DistillReader(path, 4, 2, capacity=2, occupied_capacity=0, teacher_timeout=3600)
    dr.set_sample_generator(lambda: (make_sample(i) for i in range(8)))
    with dr, pytest.raises(TeacherMismatchError, match=r"answered without output 'probs' \(\[fetch\] probs\)"):
        list(dr.distill_reader()())


def register(discovery: str, service: str, endpoint: str, model: str) -> subprocess.Popen:
    """``distill teacher register`` for an external server, as its own process."""
    command = [sys.executable, "-m", "distill_reader", "teacher", "register", "--discovery", discovery]
    command += ["--service-name", service, "--endpoint", endpoint, "--model-name", model]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)


def registered_models(discovery: str) -> dict[str, list[tuple[str, str, bool]]]:
    """Per service: (endpoint, model name, healthy) of each teacher, as discovery reports them."""
    status = asyncio.run(fetch_status(discovery))
    return {s.name: [(t.endpoint, t.model_name, t.healthy) for t in s.teachers] for s in status.services}


def keepalives(http: str) -> float:
    """The keep-alives a discovery server answered OK, from its ``/metrics`` on ``http``."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "distill_discovery_rpcs_total" and sample.labels == {"method": "KeepAlive", "code": "OK"}
    )


def test_discover_mode_through_teacher_register(server, digits_teacher, write_config, tmp_path):
    services = {"ext-tag": "tag", "ext-digits": "digits"}
    http = f"127.0.0.1:{free_port()}"
    with running_discovery(http=http) as discovery:
        registrations = [register(discovery, name, server.endpoint, model) for name, model in services.items()]
        try:
            expected = {name: [(server.endpoint, model, True)] for name, model in services.items()}
            wait_for(lambda: registered_models(discovery) == expected, 20, "both registered, ready", every=0.1)
            # Past two keep-alives of each (every 0.5 s, with the readiness check's health): the
            # model names the teachers registered with must still be the ones students are told.
            # (Not the health: on a loaded machine one slow readiness check may flip it for a
            # keep-alive.)
            kept = keepalives(http)
            wait_for(lambda: keepalives(http) >= kept + 2 * len(services), 20, "two keep-alives each", every=0.1)
            named = {
                name: [(endpoint, model) for endpoint, model, _ in ts]
                for name, ts in registered_models(discovery).items()
            }
            assert named == {name: [(server.endpoint, model)] for name, model in services.items()}
            discover = "mode = discover\nhost = {}\nservice_name = {}\nrequire_num = 1"
            run_tag(tag_config(write_config, discover.format(discovery, "ext-tag")), epochs=1)
            run_digits(digits_config(tmp_path, discover.format(discovery, "ext-digits")), digits_teacher)
            assert all(p.poll() is None for p in registrations)
        finally:
            for process in registrations:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
                process.wait(10)


@pytest.mark.parametrize(
    ("value", "fails"),
    [("", False), ("0", False), ("1", True), ("vllm-venv", True), ("pytriton-venv,mlserver-venv", False)],
)
def test_a_missing_venv_skips_or_fails_as_required(monkeypatch, value, fails):
    """`make test` under CI=true sets DISTILL_REQUIRE_EXTERNAL_TEACHERS=1: a missing venv (here
    vLLM's, which builds on x86-64 Linux only) fails, saying how to require only the venvs a machine
    can build; otherwise it skips with the reason."""
    import external_support

    monkeypatch.setenv(external_support.REQUIRE_ENV, value)
    monkeypatch.setattr(external_support, "TEACHER_VENVS", external_support.REPO / "build" / "no-such-folder")
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as raised:
        external_support.require_venv("vllm-venv", "vllm")
    assert raised.type is (pytest.fail.Exception if fails else pytest.skip.Exception), raised.type
    message = str(raised.value)
    assert message.startswith("build/teachers/vllm-venv is missing: run scripts/external-teachers.sh"), message
    if fails:
        assert f"DISTILL_REQUIRE_EXTERNAL_TEACHERS={value}: required here" in message, message
        assert "set DISTILL_REQUIRE_EXTERNAL_TEACHERS to the venvs that can be" in message, message
