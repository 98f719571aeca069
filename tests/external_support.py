"""Real external OIP servers (NVIDIA Triton via PyTriton, Seldon MLServer) run as test teachers.

Each runs from its own virtual environment made by ``scripts/external-teachers.sh`` under
``build/teachers/``; :func:`require_venv` gives its python, or skips the test saying why, or fails
it where the environment requires external teachers (``make test`` with ``CI=true``):

``DISTILL_REQUIRE_EXTERNAL_TEACHERS``: unset, empty or ``0``: a missing one skips the test (with its
reason, shown by ``-ra``); ``1``: a missing one fails the test; or a comma-separated list of venv
names (``pytriton-venv,mlserver-venv``): those fail, the others skip.
:func:`missing_external_teacher` does the same for any other thing such a test needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from conftest import free_port
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader.bench.llm_openai import session_pids  # (the bench stops its vLLM the same way)

REPO = Path(__file__).resolve().parents[1]
TEACHER_VENVS = REPO / "build" / "teachers"
EXAMPLES = REPO / "examples"


#: Set by ``make test`` when ``CI=true``: see the module's docstring.
REQUIRE_ENV = "DISTILL_REQUIRE_EXTERNAL_TEACHERS"


def required(venv: str | None = None) -> bool:
    """Whether a missing ``venv`` (under ``build/teachers``) fails the test instead of skipping it;
    ``None``: anything an external teacher test needs, when any external teacher is required."""
    value = os.environ.get(REQUIRE_ENV, "").strip()
    if value.lower() in ("", "0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes", "all") or venv is None:
        return True
    return venv in {name.strip() for name in value.split(",")}


def missing_external_teacher(reason: str, venv: str | None = None) -> NoReturn:
    """Skip the test saying ``reason``; fail it instead where :func:`required` says so, saying where
    the venv's install log is and how to require less on a machine that cannot build it."""
    if required(venv):
        log = TEACHER_VENVS / f"{venv}-install.log"
        why = f"; its install log: {log.relative_to(REPO)}" if venv and log.exists() else ""
        pytest.fail(
            f"{reason} ({REQUIRE_ENV}={os.environ.get(REQUIRE_ENV)}: required here, as `make test` does under "
            f"CI=true{why}). Where it cannot be built (vllm-venv: x86-64 Linux only), set {REQUIRE_ENV} to the "
            "venvs that can be (e.g. pytriton-venv,mlserver-venv), or to 0",
            pytrace=False,
        )
    pytest.skip(reason)


def venv_problem(name: str, module: str) -> str | None:
    """Why ``build/teachers/<name>`` cannot be used (missing, or ``module`` does not import), or None."""
    python = TEACHER_VENVS / name / "bin" / "python"
    if not python.exists():
        return f"build/teachers/{name} is missing: run scripts/external-teachers.sh"
    check = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no error output"])[-1]
        return f"build/teachers/{name} is broken (import {module}: {last}): run scripts/external-teachers.sh"
    return None


def venv_python(name: str, module: str) -> Path | None:
    """The python of ``build/teachers/<name>`` when it exists and imports ``module``."""
    return None if venv_problem(name, module) else TEACHER_VENVS / name / "bin" / "python"


def require_venv(name: str, module: str) -> Path:
    """The python of ``build/teachers/<name>``, which imports ``module``; else the test skips, or
    fails where :func:`required` says so."""
    problem = venv_problem(name, module)
    if problem is not None:
        missing_external_teacher(problem, name)
    return TEACHER_VENVS / name / "bin" / "python"


@dataclass
class ExternalServer:
    """An external server process in its own session; ``endpoint`` is its OIP gRPC address."""

    name: str
    process: subprocess.Popen
    endpoint: str
    log: Path
    models: list[str] = field(default_factory=list)
    #: log lines that mean start-up failed for good (no use waiting for readiness)
    fatal: tuple[str, ...] = ()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Wait for OIP ServerReady and ModelReady of every model; returns the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        with grpc.insecure_channel(self.endpoint) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with code {self.process.returncode}; log:\n{self.log_tail()}"
                    )
                log = self.log.read_text(errors="replace") if self.fatal else ""
                if any(marker in log for marker in self.fatal):
                    raise RuntimeError(f"{self.name} failed to start; log:\n{self.log_tail()}")
                try:
                    if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1).ready and all(
                        stub.ModelReady(service_pb2.ModelReadyRequest(name=m), timeout=1).ready for m in self.models
                    ):
                        return time.monotonic() - start
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.name} on {self.endpoint} not ready after {timeout} s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the whole session, SIGKILL what is left after 10 s."""
        sid = self.process.pid  # start_new_session: the session id is the leader's pid
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in session_pids(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while session_pids(sid) and time.monotonic() < deadline:
                if self.process.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(0.1)
                else:
                    time.sleep(0.1)
            if not session_pids(sid):
                break
        if self.process.poll() is None:
            self.process.wait(5)


def _popen(name: str, command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _clean_env() -> dict[str, str]:
    """This environment without the test venv's and pytest's Python variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start_pytriton(
    python: Path, script: str, args: list[str], workdir: Path, models: list[str], env: dict[str, str] | None = None
) -> ExternalServer:
    """``examples/triton_teacher/SCRIPT ARGS`` on free ports, serving ``models``."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    environ = {**_clean_env(), **(env or {})}
    # Triton's Python stub links libpython: point it at the interpreter's own (ENVIRONMENT.md).
    libdir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip() or sysconfig.get_config_var("LIBDIR")
    environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, environ.get("LD_LIBRARY_PATH", "")) if p)
    command = [
        str(python),
        str(EXAMPLES / "triton_teacher" / script),
        *args,
        *("--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)),
    ]
    log = workdir / "triton.log"
    process = _popen("triton", command, log, workdir, environ)
    return ExternalServer("Triton (PyTriton)", process, f"127.0.0.1:{grpc_port}", log, models, ("failed to load",))


def start_triton(python: Path, onnx: Path, workdir: Path, digits_name: str, tag_name: str) -> ExternalServer:
    """``examples/triton_teacher/serve_digits.py`` serving the ONNX file and the exact ``tag`` model."""
    args = ["--onnx", str(onnx), "--model-name", digits_name, "--tag-model", tag_name]
    return _start_pytriton(python, "serve_digits.py", args, workdir, [digits_name, tag_name])


def start_triton_tag(python: Path, workdir: Path, tag_name: str = "teacher") -> ExternalServer:
    """``examples/triton_teacher/serve_digits.py`` serving only the exact ``tag`` model as ``tag_name``,
    its system shared-memory extension open to readers."""
    args = ["--tag-model", tag_name, "--shared-memory"]
    return _start_pytriton(python, "serve_digits.py", args, workdir, [tag_name])


def start_triton_sequences(python: Path, workdir: Path, model_name: str, *args: str) -> ExternalServer:
    """``examples/triton_teacher/serve_sequences.py`` (its top-k options in ``args``) as ``model_name``;
    the project's ``src`` on its path for ``distill_reader.serving.topk``."""
    return _start_pytriton(
        python,
        "serve_sequences.py",
        ["--model-name", model_name, *args],
        workdir,
        [model_name],
        env={"PYTHONPATH": str(REPO / "src")},
    )


def start_mlserver(python: Path, onnx: Path, workdir: Path) -> ExternalServer:
    """``mlserver start`` on a copy of ``examples/mlserver`` with free ports and the ONNX file."""
    root = workdir / "mlserver"
    shutil.copytree(EXAMPLES / "mlserver", root, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(onnx, root / "digits" / "digits.onnx")
    grpc_port = free_port()
    settings = json.loads((root / "settings.json").read_text())
    settings.update(grpc_port=grpc_port, http_port=free_port(), metrics_port=free_port())
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    mlserver = python.parent / "mlserver"
    log = workdir / "mlserver.log"
    process = _popen("mlserver", [str(mlserver), "start", str(root)], log, workdir, _clean_env())
    return ExternalServer("MLServer", process, f"127.0.0.1:{grpc_port}", log, ["digits", "tag", "tag_undeclared"])
