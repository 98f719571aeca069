"""``distill teacher …``: serve a model as an OIP teacher."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import click

from distill_reader.discovery.commands import tls_options
from distill_reader.errors import DistillReaderError
from distill_reader.rpc import MAX_MESSAGE_BYTES, stop_on_signals
from distill_reader.serving.backends.base import Backend
from distill_reader.serving.server import DEFAULT_LISTEN


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def teacher() -> None:
    """Teacher servers: serve a model over the Open Inference Protocol (KServe v2 gRPC)."""


@teacher.command("serve")
@click.option(
    "--model",
    "spec",
    required=True,
    metavar="SPEC",
    help="The model: a path to an .onnx file, hf:DIR (a local transformers causal LM, see docs/llm.md), "
    "or module:function (a Python function decorated with distill_reader.serving.teacher_model; module "
    "may be a path to a .py file).",
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Address to listen on; port 0 picks a free port. Use 0.0.0.0:PORT to accept remote clients.",
)
@click.option("--name", "model_name", default="teacher", show_default=True, help="Model name clients ask for.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Most rows merged into one model batch (larger requests run alone).",
)
@click.option(
    "--max-delay-ms",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="How long a batch waits for more requests once its first request is queued.",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Model instances: batches that may run at the same time.",
)
@click.option(
    "--pad-merge/--no-pad-merge",
    "pad_variable",
    default=True,
    show_default=True,
    help="For a sequence model (docs/sequences.md), merge requests that differ in their variable (-1) dim "
    "by padding them with zeros to the longest. Turn off for a model whose outputs at real positions "
    "change with padding and that takes no <var>_length input.",
)
@click.option(
    "--topk",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="Publish the top K of each selected output X ([..., V]) as X_topk_values and X_topk_indices (INT32), "
    "[..., K], instead of X (see docs/sequences.md).",
)
@click.option(
    "--topk-output",
    "topk_outputs",
    multiple=True,
    metavar="NAME",
    help="An output to compress with --topk (repeatable; default: every floating-point output whose last "
    "dim is larger than K).",
)
@click.option(
    "--topk-values",
    type=click.Choice(["logprobs", "logits"]),
    default=None,
    help="What the top-k values are: log_softmax(X / temperature) [default], or X itself.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Temperature of the --topk log-probs (default 1.0).",
)
@click.option(
    "--topk-dtype",
    type=click.Choice(["float32", "float16"]),
    default=None,
    help="Dtype of the --topk values (default float32; float16 halves their bytes).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Intra-op threads of ONNX Runtime, Paddle or torch (default: their own choice). Ignored by Python models.",
)
@click.option(
    "--device",
    default=None,
    metavar="cpu|cuda[:N]",
    help="hf: models: where the model runs (default: CUDA when available, else the CPU).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="hf: models: the dtype the model runs in (default float32).",
)
@click.option(
    "--max-batch-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="hf: models: most padded tokens (rows x longest row) per forward pass; larger batches and "
    "requests are cut into several passes (default 8192).",
)
@click.option(
    "--max-message-mb",
    type=click.IntRange(min=1),
    default=MAX_MESSAGE_BYTES // (1024 * 1024),
    show_default=True,
    help="Largest gRPC message sent or received, in MiB.",
)
@click.option(
    "--register",
    "discovery_endpoints",
    default=None,
    metavar="HOST:PORT[,HOST:PORT...]",
    help="Register this teacher with these discovery servers while it serves (needs --service-name).",
)
@click.option("--service-name", default=None, help="The service to join when --register is given.")
@click.option(
    "--weight",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Capacity weight announced to discovery (2 = twice the students of a weight-1 teacher).",
)
@click.option(
    "--advertise",
    default=None,
    metavar="HOST:PORT",
    help="The address students should use (default: the listen address; with 0.0.0.0 this machine's host name).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Require this token (the file's content, stripped) on the calls that use or describe the model "
    "(inference, metadata, config, statistics, repository index); also sent to the discovery servers of --register.",
)
@tls_options("server")
@click.option(
    "--metrics",
    "metrics_listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (off by default).",
)
@click.option(
    "--shared-memory/--no-shared-memory",
    default=True,
    show_default=True,
    help="Offer the OIP system shared-memory extension: readers on this host (same /dev/shm, same user) "
    "map their batch pool instead of sending tensors; behind --token-file like inference (docs/transports.md).",
)
def serve_command(
    spec: str,
    listen: str,
    model_name: str,
    max_batch: int,
    max_delay_ms: float,
    instances: int,
    pad_variable: bool,
    topk: int | None,
    topk_outputs: tuple[str, ...],
    topk_values: str | None,
    temperature: float | None,
    topk_dtype: str | None,
    threads: int | None,
    device: str | None,
    dtype: str | None,
    max_batch_tokens: int | None,
    max_message_mb: int,
    discovery_endpoints: str | None,
    service_name: str | None,
    weight: float,
    advertise: str | None,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    metrics_listen: str | None,
    shared_memory: bool,
) -> None:
    """Serve one model with dynamic batching until SIGINT or SIGTERM.

    With --tls-* and --register, the same files secure the calls to discovery: --tls-ca verifies the
    discovery servers and --tls-cert/--tls-key are the client certificate where they require one.
    """
    from distill_reader.security import ClientSecurity, load_tls, read_token_file
    from distill_reader.serving.backends import load_backend

    if bool(discovery_endpoints) != bool(service_name):
        raise click.UsageError("--register and --service-name go together")
    topk_options = {
        "--topk-output": topk_outputs,
        "--topk-values": topk_values,
        "--temperature": temperature,
        "--topk-dtype": topk_dtype,
    }
    if topk is None and (given := [k for k, v in topk_options.items() if v]):
        raise click.UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --topk K")
    try:
        token = read_token_file(token_file) if token_file else None
        tls = load_tls(tls_ca, tls_cert, tls_key)
    except DistillReaderError as e:
        raise click.UsageError(str(e)) from None
    if tls is not None and not tls.cert:
        raise click.UsageError("--tls-ca on a server needs --tls-cert and --tls-key")
    security = ClientSecurity(token, tls)
    if discovery_endpoints and service_name:
        from distill_reader.discovery.client import parse_endpoints
        from distill_reader.discovery.service import check_service_name
        from distill_reader.discovery.stores.base import check_hostport

        try:
            parse_endpoints(discovery_endpoints)
            check_service_name(service_name)
            if advertise:
                check_hostport(advertise, "--advertise")
        except DistillReaderError as e:
            raise click.UsageError(str(e)) from None
    try:
        backend = load_backend(spec, threads=threads, device=device, dtype=dtype, max_batch_tokens=max_batch_tokens)
    except Exception as e:  # import errors, ONNX Runtime load errors, bad declarations
        msg = str(e) if str(e).startswith("model ") else f"model {spec!r}: {e}"
        raise click.ClickException(f"cannot load {msg}") from None
    if topk is not None:
        from distill_reader.serving.topk import TopKBackend

        try:
            backend = TopKBackend(
                backend,
                topk,
                outputs=topk_outputs or None,
                values=topk_values or "logprobs",
                temperature=1.0 if temperature is None else temperature,
                dtype=topk_dtype or "float32",
            )
        except ValueError as e:
            backend.close()
            raise click.UsageError(f"--topk: {e}") from None
    options = dict(
        model_name=model_name,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        instances=instances,
        pad_variable=pad_variable,
        max_message_bytes=max_message_mb * 1024 * 1024,
        token=token,
        tls=tls,
        metrics_listen=metrics_listen,
        shared_memory=shared_memory,
    )
    try:
        asyncio.run(
            _serve_until_signal(
                backend, listen, options, discovery_endpoints, service_name, weight, advertise, security
            )
        )
    except (OSError, ValueError, DistillReaderError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        backend.close()


async def _serve_until_signal(
    backend: Backend,
    listen: str,
    options: dict[str, Any],
    discovery_endpoints: str | None,
    service_name: str | None,
    weight: float,
    advertise: str | None,
    security: Any = None,
) -> None:
    """Serve until SIGINT/SIGTERM. With discovery, deregister first, then drain and stop the server,
    so students move to other teachers before this one goes away."""
    from distill_reader.serving.server import serve

    stop, server_stop, registration_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    # What the stop lines name: the signal that stopped us, and the bound address once known.
    received: list[signal.Signals] = []
    where = [f"teacher {options['model_name']!r} on {listen}"]

    def on_signal(sig: signal.Signals) -> None:
        if not received:
            received.append(sig)
            click.echo(f"{where[0]} stopping ({sig.name})", err=True)

    stop_on_signals(stop, on_signal)
    registration: list[asyncio.Task] = []

    async def started(address: str) -> None:
        where[0] = f"teacher {options['model_name']!r} on {address}"
        # One line, always shown (not subject to -v): scripts wait for it.
        security_note = ", TLS" if options["tls"] else ""
        security_note += ", token required" if options["token"] else ""
        if options["metrics_listen"]:
            security_note += f", metrics on http://{options['metrics_listen']}/metrics"
        click.echo(
            f"teacher {options['model_name']!r} serving on {address}{security_note}; {backend.describe()}", err=True
        )
        if discovery_endpoints and service_name:
            from distill_reader.discovery.client import keep_registered

            endpoint = advertise or advertised_address(address)
            registration.append(
                loop.create_task(
                    keep_registered(
                        discovery_endpoints,
                        service_name,
                        endpoint,
                        model_name=options["model_name"],
                        weight=weight,
                        readiness_check=True,
                        stop=registration_stop,
                        security=security,
                        teacher_security=security,
                    )
                )
            )
            click.echo(f"registering {endpoint} in service {service_name!r} via {discovery_endpoints}", err=True)

    server = loop.create_task(serve(backend, listen, on_started=started, stop_event=server_stop, **options))
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait([stopping, server], return_when=asyncio.FIRST_COMPLETED)
    finally:
        registration_stop.set()
        if registration:
            await asyncio.gather(*registration, return_exceptions=True)
        server_stop.set()
        stopping.cancel()
        await server
        if received:
            click.echo(f"{where[0]} stopped", err=True)


def advertised_address(bound: str) -> str:
    """The address to give students for a server bound to ``bound``."""
    host, _, port = bound.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"
