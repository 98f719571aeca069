"""Running teacher servers on this machine: the one way to start a ``distill teacher serve``
process, a free port, and waiting until a server is ready (internal, not public API).

Used by ``distill demo``, ``distill bench`` and the tests.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO

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


def start_teacher(
    model: str,
    listen: str,
    *options: str,
    env: Mapping[str, str] | None = None,
    output: int | IO | None = subprocess.DEVNULL,
    prefix: Sequence[str] = (),
    wait: bool = True,
) -> subprocess.Popen:
    """Start ``distill teacher serve --model MODEL --listen LISTEN OPTIONS…`` as a child process in its
    own session (a terminal's Ctrl-C goes to the parent, which stops it); with ``wait``, return once it
    is ready (see :func:`wait_until_ready`). ``output``: where its stdout and stderr go (None: ours);
    ``prefix``: a command to run it under (e.g. ``ip netns exec NS``)."""
    command = [*prefix, sys.executable, "-m", "distill_reader", "teacher", "serve", "--model", model]
    process = subprocess.Popen(
        [*command, "--listen", listen, *options],
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output not in (None, subprocess.DEVNULL) else output,
        start_new_session=True,
    )
    if wait:
        try:
            wait_until_ready(listen, process)
        except BaseException:
            stop_processes([process])
            raise
    return process


def stop_processes(processes: Sequence[subprocess.Popen], timeout: float = 5.0) -> None:
    """SIGTERM every process still running, then SIGKILL what has not exited after ``timeout`` s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
