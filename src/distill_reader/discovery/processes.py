"""``distill discovery serve --processes N``: N discovery server processes behind one port.

Each process is a whole discovery server (``serve``) on the same Redis or etcd store, listening on
the same port with ``SO_REUSEPORT``: the kernel spreads new connections over the processes, so each
takes a share of the students' streams and the teachers' keep-alives, on a core of its own. Every
process reconciles every service: balance is deterministic and an assignment is written with
compare-and-swap, so they agree (the first write wins, the others read it and find the same answer).
The same holds for servers on several hosts sharing the store.

A process that dies is started again after a second; meanwhile its students reconnect (to another
process, within a second or so) and its teachers keep alive through another one: their leases live
in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
import sys
import time
from typing import Any

from distill_reader.errors import DiscoveryError
from distill_reader.rpc import require_hostport

log = logging.getLogger(__name__)

_RESTART_DELAY_S = 1.0
_STOP_WAIT_S = 10.0


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind (not listen) a ``SO_REUSEPORT`` socket on ``listen``; returns it and ``host:port`` with the
    port chosen (``listen``'s port 0: any free one). Kept open, it holds the port for the processes."""
    host, port = require_hostport(listen, "--listen", allow_port_zero=True, error=DiscoveryError)
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise DiscoveryError(f"cannot listen on {listen}: {exc}") from None
    return sock, f"{host}:{sock.getsockname()[1]}"


def _child(
    index: int, listen: str, store: str, http: str | None, kwargs: dict[str, Any], listening: Any, errors: Any
) -> None:
    """One server process: ``serve`` on the shared port until SIGTERM/SIGINT. An error that ends it is
    printed and sent on ``errors`` (a pipe's end), for the parent to name on the command line."""
    from distill_reader.discovery.server import serve
    from distill_reader.errors import DistillReaderError
    from distill_reader.rpc import run_until_signal

    logging.basicConfig(level=logging.WARNING, format=f"discovery[{index}] %(levelname)s %(message)s")

    def announce(server: Any) -> None:
        listening.set()
        extra = f", http://{server.http_address}/" if server.http_address else ""
        print(
            f"discovery process {index} (pid {multiprocessing.current_process().pid}) listening on "
            f"{server.address}{extra}",
            file=sys.stderr,
            flush=True,
        )

    try:
        run_until_signal(
            lambda stop: serve(listen, store, http=http, stop=stop, reuse_port=True, on_started=announce, **kwargs)
        )
    except Exception as exc:  # any error, not only ours: the parent names it instead of an exit code
        message = str(exc) if isinstance(exc, DistillReaderError) else f"{type(exc).__name__}: {exc}"
        print(f"discovery process {index}: {message}", file=sys.stderr, flush=True)
        errors.send(message)
        sys.exit(1)


def _http_of(http: str | None, index: int) -> str | None:
    """Process ``index``'s HTTP address: ``http``'s port + ``index`` (port 0: any)."""
    if not http:
        return None
    host, port = require_hostport(http, "--http", allow_port_zero=True, error=DiscoveryError)
    if port + index > 65535:
        raise DiscoveryError(
            f"--http {http}: process {index} would serve HTTP on port {port + index}, past 65535 "
            "(process i takes the port + i): give a lower port"
        )
    return f"{host}:{port + index if port else 0}"


async def serve_processes(
    processes: int, listen: str, store: str, *, http: str | None, stop: asyncio.Event, **kwargs: Any
) -> str:
    """Run ``processes`` discovery servers on ``listen`` (one port, SO_REUSEPORT) and ``store`` until
    ``stop``; a process that dies is started again. Process ``i`` serves HTTP on ``http``'s port + i.
    ``kwargs`` go to :func:`~distill_reader.discovery.server.serve` (ttl, keepalive, token, tls,
    store_security). Raises DiscoveryError if a process fails to start (its message on stderr)."""
    if processes > 1 and store == "memory":
        raise DiscoveryError("--processes above 1 needs a shared store (redis:// or etcd://): memory is per process")
    sock, address = reserve_port(listen)
    ctx = multiprocessing.get_context("spawn")
    # Each process, whether it got as far as listening (one that did not failed to start), and the
    # pipe's end its error comes on.
    running: list[tuple[multiprocessing.process.BaseProcess, Any, Any] | None] = [None] * processes

    def start(i: int) -> None:
        listening = ctx.Event()
        errors, child_errors = ctx.Pipe(duplex=False)
        args = (i, address, store, _http_of(http, i), kwargs, listening, child_errors)
        p = ctx.Process(target=_child, args=args, daemon=False)
        p.start()
        child_errors.close()  # the child holds its copy
        running[i] = (p, listening, errors)

    def why(p: multiprocessing.process.BaseProcess, errors: Any) -> str:
        """What ended a process: the error it sent, else its exit code."""
        with contextlib.suppress(EOFError, OSError):
            if errors.poll():
                return str(errors.recv())
        return f"exit code {p.exitcode}"

    try:
        for i in range(processes):
            start(i)
        print(f"discovery: {processes} processes on {address} (store {store})", file=sys.stderr, flush=True)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            for i, entry in enumerate(running):
                if entry is None or entry[0].is_alive() or stop.is_set():
                    continue
                p, listening, errors = entry
                reason = why(p, errors)
                errors.close()
                if not listening.is_set():
                    raise DiscoveryError(f"discovery process {i} failed to start: {reason}")
                log.warning("discovery process %d (pid %s) ended (%s); starting it again", i, p.pid, reason)
                print(
                    f"discovery process {i} (pid {p.pid}) ended ({reason}); starting it again",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(asyncio.TimeoutError):  # the delay, cut short by a stop
                    await asyncio.wait_for(stop.wait(), _RESTART_DELAY_S)
                if not stop.is_set():
                    start(i)
        return address
    finally:
        for entry in running:
            if entry is not None:
                entry[2].close()
        alive = [entry[0] for entry in running if entry is not None and entry[0].is_alive()]
        for p in alive:
            p.terminate()  # SIGTERM: the process stops serving and leaves the store cleanly
        deadline = time.monotonic() + _STOP_WAIT_S
        for p in alive:
            await asyncio.to_thread(p.join, max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5)
        sock.close()
