"""``distill teacher …``: serve a model as an OIP teacher."""

from __future__ import annotations

import click

from distill_reader.serving.server import DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def teacher() -> None:
    """Teacher servers: serve a model over the Open Inference Protocol (KServe v2 gRPC)."""


@teacher.command("serve")
@click.option(
    "--model",
    "spec",
    required=True,
    metavar="SPEC",
    help="The model: a path to an .onnx file, or module:function (a Python function decorated "
    "with distill_reader.serving.teacher_model; module may be a path to a .py file).",
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
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Intra-op threads of ONNX Runtime (default: its own choice). Ignored by Python models.",
)
@click.option(
    "--max-message-mb",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_MESSAGE_BYTES // (1024 * 1024),
    show_default=True,
    help="Largest gRPC message sent or received, in MiB.",
)
def serve_command(
    spec: str,
    listen: str,
    model_name: str,
    max_batch: int,
    max_delay_ms: float,
    instances: int,
    threads: int | None,
    max_message_mb: int,
) -> None:
    """Serve one model with dynamic batching until SIGINT or SIGTERM."""
    from distill_reader.serving.backends.base import load_backend
    from distill_reader.serving.server import run_server

    try:
        backend = load_backend(spec, threads=threads)
    except Exception as e:  # import errors, ONNX Runtime load errors, bad declarations
        msg = str(e) if str(e).startswith("model ") else f"model {spec!r}: {e}"
        raise click.ClickException(f"cannot load {msg}") from None

    async def announce(address: str) -> None:
        # One line, always shown (not subject to -v): scripts wait for it.
        click.echo(f"teacher {model_name!r} serving on {address}; {backend.describe()}", err=True)

    try:
        run_server(
            backend,
            listen,
            model_name=model_name,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            instances=instances,
            max_message_bytes=max_message_mb * 1024 * 1024,
            on_started=announce,
        )
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        backend.close()
