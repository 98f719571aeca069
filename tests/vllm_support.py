"""A real vLLM (CPU build) as a test teacher, and a TCP relay in front of it that can be killed.

vLLM runs from ``build/teachers/vllm-venv`` (``scripts/external-teachers.sh``), apart from the
project's venv (it pins torch and transformers). :func:`vllm_python` says whether it is there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from external_support import TEACHER_VENVS, ExternalServer, _clean_env, _popen

from distill_reader.teacher.local import free_port

VENV = "vllm-venv"


def vllm_python() -> Path | None:
    """The python of ``build/teachers/vllm-venv`` when it exists and has vllm (found, not imported:
    importing it takes 10-30 s here)."""
    python = TEACHER_VENVS / VENV / "bin" / "python"
    if not python.exists():
        return None
    found = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return python if subprocess.run([python, "-c", found], capture_output=True, timeout=60).returncode == 0 else None


def vllm_command(
    python: Path, model: Path, port: int, name: str, *, max_logprobs: int, max_model_len: int = 256, extra=()
) -> list[str]:
    """The command line serving ``model`` as ``name`` on ``127.0.0.1:port`` (float32, eager: no
    compilation at start-up, which halves the start on 2 cores)."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", str(model), "--served-model-name", name),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", str(max_model_len), "--dtype", "float32", "--max-logprobs", str(max_logprobs)),
        "--enforce-eager",
        *("--uvicorn-log-level", "warning"),
        *extra,
    ]


def vllm_env() -> dict[str, str]:
    """vLLM's CPU settings: 1 GiB of KV cache (ENVIRONMENT.md); no usage reports."""
    env = _clean_env()
    env.pop("OMP_NUM_THREADS", None)  # vLLM binds its own OpenMP threads
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    return env


@dataclass
class VllmServer(ExternalServer):
    """``endpoint`` is the ``host:port`` of its HTTP API."""

    def wait_ready(self, timeout: float) -> float:
        """Wait for ``GET /health`` to answer 200; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() < start + timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.process.returncode}; log:\n{self.log_tail()}")
            health = f"http://{self.endpoint}/health"
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(health, timeout=2) as answer,
            ):
                if answer.status == 200:
                    return time.monotonic() - start
            time.sleep(0.5)
        raise TimeoutError(f"vLLM on {self.endpoint} not ready after {timeout} s; log:\n{self.log_tail()}")


def start_vllm(
    python: Path, model: Path, workdir: Path, name: str, *, max_logprobs: int, api_key: str | None = None
) -> VllmServer:
    """vLLM serving ``model`` as ``name`` on a free port (``api_key``: its ``--api-key``)."""
    port = free_port()
    extra = ("--api-key", api_key) if api_key else ()
    command = vllm_command(python, model, port, name, max_logprobs=max_logprobs, extra=extra)
    log = workdir / "vllm.log"
    process = _popen("vllm", command, log, workdir, vllm_env())
    return VllmServer("vLLM", process, f"127.0.0.1:{port}", log)


RELAY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def handle(client_reader, client_writer):
    try:
        reader, writer = await asyncio.open_connection(sys.argv[2], int(sys.argv[3]))
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class Relay:
    """A TCP relay process on a free port to ``target`` (``host:port``): a second endpoint of the
    same server, which dies like a server does when killed (its connections reset)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", RELAY, str(self.port), host, port],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline() == b"ready\n"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
