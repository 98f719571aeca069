"""Tokens, TLS/mTLS, safe defaults and the teacher's Prometheus metrics, on real servers on loopback.

Certificates are made by the tests (``security_support.make_pki``): a CA, a server certificate for
127.0.0.1/localhost, a client certificate and an unrelated CA.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import READER_CONFIG, TeacherProcesses, free_port
from reader_models import make_sample, tag_rows
from security_support import Pki, make_pki
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader import DistillReader, NoTeacherError, TeacherAuthError
from distill_reader.cli import main as cli_main
from distill_reader.config import load_config
from distill_reader.discovery.client import StudentSession, fetch_status, keep_registered
from distill_reader.discovery.commands import discovery
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.server import DiscoveryServer, ServerThread
from distill_reader.discovery.service import status_dict
from distill_reader.errors import ConfigError, DiscoveryError
from distill_reader.security import ClientSecurity, Secret, TokenInterceptor, load_tls, read_token_file
from distill_reader.serving.backends import load_backend
from distill_reader.serving.commands import teacher
from distill_reader.serving.server import InferenceServer, running_server

pytestmark = pytest.mark.timeout(90)

TOKEN = "tok-3f9a71c2e5d84b60-never-print-me"
WRONG = "tok-0000000000000000-wrong"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    return path


@pytest.fixture
def wrong_token_file(tmp_path: Path) -> Path:
    path = tmp_path / "wrong-token"
    path.write_text(WRONG + "\n")
    return path


def server_tls(pki: Pki, mtls: bool = False):
    return load_tls(pki.ca if mtls else None, pki.server_cert, pki.server_key)


def client_tls(pki: Pki, cert: bool = False):
    return load_tls(pki.ca, pki.client_cert if cert else None, pki.client_key if cert else None)


def read_epoch(conf: Path, n: int = 37, **options) -> list[list[np.ndarray]]:
    with DistillReader(conf, 8, 4, capacity=3, occupied_capacity=1, **options) as dr:
        dr.set_sample_generator(lambda: (make_sample(i) for i in range(n)))
        return [[a.copy() for a in batch] for batch in dr.distill_reader()()]


def check_outputs(batches: list[list[np.ndarray]], n: int = 37) -> None:
    labels = np.concatenate([b[1] for b in batches])[:, 0]
    np.testing.assert_array_equal(labels, np.arange(n))
    for img, _label, prediction in batches:
        np.testing.assert_array_equal(prediction, tag_rows(img))


# --- tokens and TLS files ---------------------------------------------------------------------


def test_token_files_and_secret(tmp_path, token_file):
    secret = read_token_file(token_file)
    assert secret.reveal() == TOKEN and secret.matches(TOKEN) and not secret.matches(WRONG)
    assert TOKEN not in repr(secret) and TOKEN not in str(secret) and TOKEN not in f"{secret}"
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match="--token-file: token file .* is empty"):
        read_token_file(empty)
    with pytest.raises(ConfigError, match="--token-file: cannot read token file"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match="go together"):
        load_tls(None, tmp_path / "cert.pem", None)
    with pytest.raises(ConfigError, match="--tls-ca: .* is not a PEM file"):
        load_tls(empty)


def test_config_keys_resolve_relative_to_the_config(tmp_path, write_config, pki):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text(TOKEN + "\n")
    conf = write_config(
        ["127.0.0.1:8001"],
        extra=f"token_file = secrets/token\ntls_ca = {pki.ca}\n"
        f"tls_cert = {pki.client_cert}\ntls_key = {pki.client_key}",
    )
    config = load_config(conf)
    assert config.token == Secret(TOKEN)
    assert config.tls is not None and config.tls.ca == pki.ca.read_bytes()
    assert TOKEN not in repr(config) and "PRIVATE KEY" not in repr(config)
    for extra, message in [
        ("token_file = nope", r"\[conf\] token_file: cannot read token file"),
        ("token_file = empty", r"\[conf\] token_file: token file .* is empty"),
        (f"tls_cert = {pki.client_cert}", r"\[conf\] tls_cert and \[conf\] tls_key go together"),
        ("tls_ca = nope.pem", r"\[conf\] tls_ca: cannot read"),
    ]:
        (tmp_path / "empty").write_text("")
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(["127.0.0.1:8001"], extra=extra))


# --- discovery with a token -------------------------------------------------------------------


def test_discovery_requires_the_token(caplog):
    async def main():
        server = DiscoveryServer("127.0.0.1:0", token=Secret(TOKEN), http="127.0.0.1:0")
        await server.start()
        good, bad, none = ClientSecurity(Secret(TOKEN)), ClientSecurity(Secret(WRONG)), ClientSecurity()
        try:
            with pytest.raises(DiscoveryError, match="UNAUTHENTICATED: discovery requires a token: pass --token-file"):
                await fetch_status(server.address, security=none)
            with pytest.raises(DiscoveryError, match="UNAUTHENTICATED: wrong token"):
                await fetch_status(server.address, security=bad)
            # A student or teacher with the wrong token fails at once instead of retrying forever.
            started = time.monotonic()
            session = StudentSession(server.address, "svc", 1, security=bad)
            with pytest.raises(DiscoveryError, match="wrong token"):
                async for _ in session.assignments():
                    pass
            with pytest.raises(DiscoveryError, match="requires a token"):
                await keep_registered(server.address, "svc", "127.0.0.1:9000", readiness_check=False, security=none)
            assert time.monotonic() - started < 5
            # With the token everything works.
            stop = asyncio.Event()
            keeper = asyncio.create_task(
                keep_registered(
                    server.address, "svc", "127.0.0.1:9000", readiness_check=False, stop=stop, security=good
                )
            )
            session = StudentSession(server.address, "svc", 1, security=good)
            assignments = session.assignments()  # held: the stream stays open
            while [t.endpoint for t in await anext(assignments)] != ["127.0.0.1:9000"]:
                pass
            st = status_dict(await fetch_status(server.address, security=good))
            assert st["services"]["svc"]["teachers"][0]["students"] == [session.student_id]
            await session.close()
            await assignments.aclose()
            stop.set()
            await keeper
            # Refusals are counted; the status page and metrics never show the token.
            metrics = await asyncio.to_thread(http_get, f"http://{server.http_address}/metrics", TOKEN)
            assert re.search(r'distill_discovery_rpcs_total\{code="UNAUTHENTICATED",method="Status"\} 2\.0', metrics)
            for path in ("/", "/status.json", "/metrics"):
                assert TOKEN not in await asyncio.to_thread(http_get, f"http://{server.http_address}{path}", TOKEN)
        finally:
            await server.stop()

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert any("refused a call" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text and WRONG not in caplog.text


def http_get(url: str, token: str | None = None) -> str:
    """GET ``url`` (with the token: the discovery pages need it when discovery has one)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read().decode()


def test_interceptor_protects_streams_and_ignores_other_methods():
    interceptor = TokenInterceptor(Secret(TOKEN), "x", methods=["/a/B"])
    assert interceptor.check([("authorization", f"Bearer {TOKEN}")]) is None
    assert interceptor.check([("authorization", f"Bearer {WRONG}")]) == "wrong token"
    assert "Bearer" in interceptor.check([("authorization", TOKEN)])
    assert "requires a token" in interceptor.check([])

    async def main():
        server = DiscoveryServer("127.0.0.1:0", token=Secret(TOKEN))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as ch:
                call = pb_grpc.DiscoveryStub(ch).WatchAssignment(
                    pb.WatchAssignmentRequest(service_name="svc", require_num=1),
                    metadata=(("authorization", f"Bearer {WRONG}"),),
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert info.value.details() == "wrong token"
        finally:
            await server.stop()

    run(main())


def test_cli_token_flags_and_no_token_in_output(token_file, wrong_token_file, capfd, caplog):
    thread = ServerThread(token=Secret(TOKEN)).start()
    runner = CliRunner()
    try:
        result = runner.invoke(discovery, ["status", "--discovery", thread.address])
        assert result.exit_code != 0 and "discovery requires a token: pass --token-file" in result.output
        result = runner.invoke(
            discovery, ["status", "--discovery", thread.address, "--token-file", str(wrong_token_file)]
        )
        assert result.exit_code != 0 and "wrong token" in result.output and WRONG not in result.output
        result = runner.invoke(
            discovery, ["status", "--discovery", thread.address, "--token-file", str(token_file), "--json"]
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["services"] == {}
        assert TOKEN not in result.output
        result = runner.invoke(discovery, ["status", "--discovery", thread.address, "--token-file", "/nonexistent"])
        assert result.exit_code == 2 and "--token-file: cannot read token file" in result.output
        # teacher register: fatal, with a clear message, instead of retrying forever.
        result = runner.invoke(
            cli_main,
            ["teacher", "register", "--discovery", thread.address, "--service-name", "svc", "--endpoint", "127.0.0.1:9",
             "--token-file", str(wrong_token_file), "--no-readiness-check"],
        )  # fmt: skip
        assert result.exit_code == 1 and "wrong token" in result.output
    finally:
        thread.stop()
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text and WRONG not in text


# --- teachers with a token and TLS -------------------------------------------------------------


def test_teacher_token_and_mtls_reader_fixed_mode(tmp_path, write_config, pki, token_file, capfd, caplog):
    backend = load_backend("reader_models:tag")
    tls = server_tls(pki, mtls=True)
    with running_server(backend, token=Secret(TOKEN), tls=tls) as address:
        tls_keys = f"tls_ca = {pki.ca}\ntls_cert = {pki.client_cert}\ntls_key = {pki.client_key}\n"
        conf = write_config([address], extra=f"token_file = {token_file}\n{tls_keys}")
        check_outputs(read_epoch(conf))
        # No token, or a wrong one: the epoch fails at once with a clear message.
        with pytest.raises(TeacherAuthError, match="this teacher requires a token.*set \\[conf\\] token_file"):
            read_epoch(write_config([address], extra=tls_keys))
        wrong = tmp_path / "wrong"
        wrong.write_text(WRONG)
        with pytest.raises(TeacherAuthError, match=r"wrong token\); check \[conf\] token_file"):
            read_epoch(write_config([address], extra=f"token_file = {wrong}\n{tls_keys}"))
        # Without a client certificate the handshake fails: transient, then NoTeacherError with a hint.
        no_cert = write_config([address], extra=f"token_file = {token_file}\ntls_ca = {pki.ca}")
        with pytest.raises(NoTeacherError, match="client certificate"):
            read_epoch(no_cert, teacher_timeout=1.5)
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text and WRONG not in text


def test_reader_over_tls_and_plain_client_against_tls(write_config, pki):
    backend = load_backend("reader_models:tag")
    with running_server(backend, tls=server_tls(pki)) as address:
        check_outputs(read_epoch(write_config([address], extra=f"tls_ca = {pki.ca}")))
        with pytest.raises(NoTeacherError, match=r"if the server uses TLS, pass --tls-ca \(readers: \[conf\] tls_ca\)"):
            read_epoch(write_config([address]), teacher_timeout=1.5)
        with pytest.raises(NoTeacherError, match="TLS handshake failed"):
            read_epoch(write_config([address], extra=f"tls_ca = {pki.other_ca}"), teacher_timeout=1.5)


def test_teacher_token_protects_only_model_methods():
    backend = load_backend("reader_models:tag")
    with running_server(backend, token=Secret(TOKEN)) as address, grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready  # health checks stay open
        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="teacher")).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="teacher"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        meta = stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name="teacher"), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        assert meta.name == "teacher"


# --- discovery over mTLS, end to end with the CLI ----------------------------------------------


def test_discovery_mtls_token_end_to_end(tmp_path, pki, token_file, capfd):
    thread = ServerThread(token=Secret(TOKEN), tls=server_tls(pki, mtls=True)).start()
    tls_args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca)]
    fleet = TeacherProcesses(output=subprocess.PIPE)  # its log: stdout, stderr merged in
    register = ("--register", thread.address, "--service-name", "svc")
    endpoint = fleet.start(None, "--token-file", str(token_file), *tls_args, *register, wait=False)
    process = fleet.processes[endpoint]
    client = ClientSecurity(Secret(TOKEN), client_tls(pki, cert=True))
    try:
        deadline = time.monotonic() + 30
        while True:
            st = status_dict(run(fetch_status(thread.address, security=client)))
            teachers = st["services"].get("svc", {}).get("teachers", [])
            if teachers and teachers[0]["healthy"]:
                break
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, f"teacher never registered healthy: {st}"
            time.sleep(0.2)
        assert teachers[0]["endpoint"] == endpoint
        # A student in discover mode: token and mTLS to discovery and to the teacher.
        conf = tmp_path / "discover.conf"
        conf.write_text(
            DISCOVER_CONFIG.format(
                host=thread.address, token=token_file, ca=pki.ca, cert=pki.client_cert, key=pki.client_key
            )
        )
        check_outputs(read_epoch(conf))
        # The CLI with the client flags; without a client certificate, a clear error.
        runner = CliRunner()
        args = ["status", "--discovery", thread.address, "--token-file", str(token_file), "--tls-ca", str(pki.ca)]
        result = runner.invoke(discovery, [*args, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)])
        assert result.exit_code == 0, result.output
        assert endpoint in result.output and TOKEN not in result.output
        result = runner.invoke(discovery, args)
        assert result.exit_code == 1 and "client certificate (--tls-cert/--tls-key)" in result.output
        result = runner.invoke(discovery, ["status", "--discovery", thread.address, "--token-file", str(token_file)])
        assert result.exit_code == 1 and "if the server uses TLS, pass --tls-ca" in result.output
        # An oversized message is refused; the server keeps serving.
        with pytest.raises(DiscoveryError, match="RESOURCE_EXHAUSTED"):
            run(fetch_status(thread.address, "s" * (5 * 1024 * 1024), security=client))
        assert "svc" in status_dict(run(fetch_status(thread.address, security=client)))["services"]
    finally:
        process.terminate()  # not SIGKILL: the log is read to its end
        try:
            log, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            fleet.stop_all()
            log, _ = process.communicate()
        thread.stop()
    log = log.decode(errors="replace")
    assert "token required" in log and TOKEN not in log
    assert TOKEN not in capfd.readouterr().err


DISCOVER_CONFIG = READER_CONFIG.replace(
    "{conf}",
    """mode = discover
host = {host}
service_name = svc
require_num = 1
token_file = {token}
tls_ca = {ca}
tls_cert = {cert}
tls_key = {key}
""",
)


# --- safe defaults -----------------------------------------------------------------------------


def test_servers_default_to_loopback():
    serve_listen = {p.name: p.default for p in discovery.commands["serve"].params}["listen"]
    teacher_listen = {p.name: p.default for p in teacher.commands["serve"].params}["listen"]
    assert serve_listen.startswith("127.0.0.1:") and teacher_listen.startswith("127.0.0.1:")
    assert InferenceServer.__init__.__defaults__[0].startswith("127.0.0.1:")
    assert DiscoveryServer.__init__.__defaults__[0].startswith("127.0.0.1:")
    for command in (discovery.commands["serve"], teacher.commands["serve"]):
        assert {"token_file", "tls_cert", "tls_key", "tls_ca"} <= {p.name for p in command.params}
    for command in (discovery.commands["status"], cli_main.commands["teacher"].commands["register"]):
        assert {"token_file", "tls_cert", "tls_key", "tls_ca"} <= {p.name for p in command.params}


def test_warning_for_non_loopback_without_token(caplog):
    async def main():
        for token in (None, Secret(TOKEN)):
            server = DiscoveryServer("0.0.0.0:0", token=token)
            await server.start()
            await server.stop()
            teacher_server = InferenceServer(load_backend("reader_models:tag"), "0.0.0.0:0", token=token)
            await teacher_server.start()
            await teacher_server.stop()
        server = DiscoveryServer("127.0.0.1:0")
        await server.start()
        await server.stop()

    with caplog.at_level(logging.WARNING):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "without a token" in w]) == 2, warnings
    assert any(w.startswith("discovery listens on 0.0.0.0:0 without a token") for w in warnings)
    assert any(w.startswith("the teacher server listens on 0.0.0.0:0 without a token") for w in warnings)


# --- teacher metrics ---------------------------------------------------------------------------


def test_teacher_metrics_scrape(token_file):
    metrics_port = free_port()
    fleet = TeacherProcesses()
    endpoint = fleet.start(None, "--token-file", str(token_file), "--metrics", f"127.0.0.1:{metrics_port}")
    try:
        auth = (("authorization", f"Bearer {TOKEN}"),)
        with grpc.insecure_channel(endpoint) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for rows in (3, 5, 8):
                img = np.stack([make_sample(i)[0] for i in range(rows)])
                request = service_pb2.ModelInferRequest(
                    model_name="teacher",
                    inputs=[
                        service_pb2.ModelInferRequest.InferInputTensor(name="img", datatype="FP32", shape=img.shape)
                    ],
                    raw_input_contents=[img.tobytes()],
                )
                stub.ModelInfer(request, metadata=auth)
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(request)  # no token
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(service_pb2.ModelInferRequest(model_name="teacher"), metadata=auth)  # invalid
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        fleet.stop_all()

    def value(name: str) -> float:
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} not in the metrics:\n{text}"
        return float(match.group(1))

    assert value('distill_teacher_requests_total{outcome="ok"}') == 3
    assert value('distill_teacher_requests_total{outcome="unauthenticated"}') == 1
    assert value('distill_teacher_requests_total{outcome="invalid"}') == 1
    assert value("distill_teacher_rows_total") == 16
    assert value("distill_teacher_batch_rows_sum") == 16
    assert value("distill_teacher_batch_rows_count") == 3
    assert value("distill_teacher_request_seconds_count") == 4  # ok and invalid; the refused one never ran
    assert value("distill_teacher_queue_requests") == 0
    assert value("distill_teacher_queue_rows") == 0
    assert value("distill_teacher_in_flight") == 0
    assert TOKEN not in text
