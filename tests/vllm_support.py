"""A real vLLM (CPU build) as a test teacher, and a TCP relay in front of it that can be killed.

vLLM runs from ``build/teachers/vllm-venv`` (``scripts/external-teachers.sh``), apart from the
project's venv (it pins torch and transformers), with the command line and environment of
``distill bench llm-openai``. :func:`vllm_python` says whether it is there.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from external_support import ExternalServer, _popen

from distill_reader.bench.llm_openai import vllm_command, vllm_env, vllm_python, wait_healthy
from distill_reader.teacher.local import free_port

__all__ = ["Relay", "VllmServer", "start_vllm", "vllm_python"]


@dataclass
class VllmServer(ExternalServer):
    """``endpoint`` is the ``host:port`` of its HTTP API."""

    def wait_ready(self, timeout: float) -> float:
        """Wait for ``GET /health`` to answer 200; returns the seconds it took."""
        return wait_healthy(self.endpoint, self.process, timeout, self.log)


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

async def pipe(reader, writer, delay=0.0):
    try:
        while data := await reader.read(1 << 16):
            await asyncio.sleep(delay)
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
    await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer, float(sys.argv[4])))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class Relay:
    """A TCP relay process on a free port to ``target`` (``host:port``): a second endpoint of the
    same server, which dies like a server does when killed (its connections reset). ``delay``:
    seconds it holds each piece of the server's answers, so that a request through it stays in
    flight at least that long."""

    def __init__(self, target: str, delay: float = 0.0, timeout: float = 30.0) -> None:
        host, _, port = target.rpartition(":")
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", RELAY, str(self.port), host, port, str(delay)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        ready = select.select([self.process.stdout], [], [], timeout)[0]
        line = self.process.stdout.readline() if ready else b""
        if line != b"ready\n":
            self.kill()
            raise RuntimeError(f"the relay to {target} did not start within {timeout:g} s (it said {line!r})")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
