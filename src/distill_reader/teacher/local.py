"""Running teacher servers on this machine: a free port, and waiting until a server is ready.

Used by ``distill demo``, ``distill bench`` and the tests, which start ``distill teacher serve``
processes of their own.
"""

from __future__ import annotations

import socket
import subprocess
import time

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(endpoint: str, process: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Wait until the OIP server at ``endpoint`` answers ServerReady; RuntimeError if ``process``
    exits first, TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the teacher on {endpoint} exited with code {process.returncode}")
            try:
                if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=0.5).ready:
                    return
            except grpc.RpcError:
                time.sleep(0.05)
    raise TimeoutError(f"the teacher on {endpoint} was not ready after {timeout:.0f} s")
