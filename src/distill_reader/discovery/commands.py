"""``distill discovery serve|status`` and the ``register`` command (mounted as ``distill teacher register``)."""

from __future__ import annotations

import asyncio
import functools
import json
import sys

import click

from distill_reader.discovery.service import DEFAULT_KEEPALIVE_S, DEFAULT_TTL_S
from distill_reader.discovery.stores.base import PASSWORD_ENV, StoreSecurity
from distill_reader.errors import DistillReaderError
from distill_reader.rpc import run_until_signal

DEFAULT_LISTEN = "127.0.0.1:7400"

_FILE = click.Path(dir_okay=False)


def token_option(role: str):
    """``--token-file``: for a server (``role="server"``) the token to require, else the one to send."""
    text = (
        "Require this token (the file's content, stripped) from every client; without it, anyone who "
        "can reach the port may use it."
        if role == "server"
        else "Send this token (the file's content, stripped) to discovery servers that require one."
    )
    return click.option("--token-file", type=_FILE, default=None, metavar="FILE", help=text)


def tls_options(role: str):
    """``--tls-cert/--tls-key/--tls-ca`` for a server or a client (PEM files)."""
    if role == "server":
        helps = (
            "Serve TLS with this certificate (PEM; needs --tls-key).",
            "The certificate's private key (PEM).",
            "Require client certificates signed by this CA (mTLS).",
        )
    else:
        helps = (
            "Client certificate (PEM) for servers that require one (mTLS; needs --tls-key).",
            "The client certificate's private key (PEM).",
            "Connect with TLS, verifying the server's certificate with this CA (PEM).",
        )

    def decorate(f):
        for name, text in reversed(list(zip(("--tls-cert", "--tls-key", "--tls-ca"), helps))):
            f = click.option(name, type=_FILE, default=None, metavar="FILE", help=text)(f)
        return f

    return decorate


def client_security_or_exit(token_file: str | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None):
    """The :class:`~distill_reader.security.ClientSecurity` of the client flags; a usage error if bad."""
    from distill_reader.security import client_security

    try:
        return client_security(token_file, tls_ca, tls_cert, tls_key)
    except DistillReaderError as exc:
        raise click.UsageError(str(exc)) from None


def store_options(default: str = "memory"):
    """``--store`` and its credentials (``--store-user``, ``--store-password-file``, ``--store-ca``,
    ``--store-cert``, ``--store-key``; the password may also come from ``$DISTILL_STORE_PASSWORD``).

    The command receives ``store`` (the URL) and ``store_security`` (a
    :class:`~distill_reader.discovery.stores.base.StoreSecurity` or None); a bad combination is a
    usage error naming the flag. Use it on every command that opens a store.
    """
    flags = [
        click.option(
            "--store",
            default=default,
            show_default=True,
            help="Where state lives: memory (this process only), redis://[USER@]HOST:PORT[/DB], rediss://… (TLS), "
            "etcd://[USER@]HOST:PORT or etcds://… (TLS). Several servers on one Redis or etcd serve the same "
            "clients. Never put a password in it: see --store-password-file.",
        ),
        click.option("--store-user", default=None, metavar="NAME", help="Store user (or USER@ in the URL)."),
        click.option(
            "--store-password-file",
            type=_FILE,
            default=None,
            metavar="FILE",
            help=f"The store password (the file's content, stripped); or set ${PASSWORD_ENV}. "
            "Without a user, Redis's default user (requirepass).",
        ),
        click.option(
            "--store-ca",
            type=_FILE,
            default=None,
            metavar="FILE",
            help="CA (PEM) that signed the TLS store's certificate.",
        ),
        click.option(
            "--store-cert",
            type=_FILE,
            default=None,
            metavar="FILE",
            help="Client certificate (PEM) for a TLS store that requires one (needs --store-key).",
        ),
        click.option(
            "--store-key", type=_FILE, default=None, metavar="FILE", help="The client certificate's key (PEM)."
        ),
    ]

    def decorate(f):
        @functools.wraps(f)
        def command(*args, store_user, store_password_file, store_ca, store_cert, store_key, **kwargs):
            from distill_reader.discovery.stores.base import store_security

            try:
                kwargs["store_security"] = store_security(
                    kwargs["store"],
                    user=store_user,
                    password_file=store_password_file,
                    ca=store_ca,
                    cert=store_cert,
                    key=store_key,
                )
            except DistillReaderError as exc:
                raise click.UsageError(str(exc)) from None
            return f(*args, **kwargs)

        for flag in reversed(flags):
            command = flag(command)
        return command

    return decorate


def _run_until_signal(main) -> None:
    """Run ``main(stop)`` with SIGINT/SIGTERM setting ``stop``; DistillReaderError becomes a usage error."""
    try:
        run_until_signal(main)
    except DistillReaderError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def discovery() -> None:
    """Discovery: teachers register, students get a fair share of them pushed live."""


@discovery.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="gRPC address, HOST:PORT (port 0: any).")
@store_options()
@click.option(
    "--http",
    default=None,
    help="Also serve a live dashboard (/), /status.json, /metrics and /healthz on HOST:PORT; all but /healthz "
    "need the token with --token-file, and it is HTTPS with --tls-cert/--tls-key (docs/operations.md).",
)
@click.option("--ttl", default=DEFAULT_TTL_S, show_default=True, type=float, help="Lease TTL in seconds.")
@click.option(
    "--keepalive",
    default=DEFAULT_KEEPALIVE_S,
    show_default=True,
    type=float,
    help="Keep-alive interval clients are told to use, seconds (stretched, with the TTL, for a fleet too large "
    "for 1,000 keep-alives a second per server: docs/discovery.md).",
)
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Server processes sharing the --listen port (SO_REUSEPORT; about one per core) and the store, which "
    "must be redis:// or etcd://. Process i serves --http on its port + i. One that dies is started again.",
)
@token_option("server")
@tls_options("server")
def serve(
    listen: str,
    store: str,
    store_security: StoreSecurity | None,
    http: str | None,
    ttl: float,
    keepalive: float,
    processes: int,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
) -> None:
    """Run a discovery server (or --processes of them) until SIGINT/SIGTERM."""
    from distill_reader.discovery import server as discovery_server
    from distill_reader.security import load_tls, read_token_file

    try:
        token = read_token_file(token_file) if token_file else None
        tls = load_tls(tls_ca, tls_cert, tls_key)
        if tls is not None and not tls.cert:
            raise click.UsageError("--tls-ca on a server needs --tls-cert and --tls-key")
    except DistillReaderError as exc:
        raise click.UsageError(str(exc)) from None
    if processes > 1:
        from distill_reader.discovery.processes import serve_processes

        async def main_processes(stop: asyncio.Event) -> None:
            await serve_processes(
                processes,
                listen,
                store,
                http=http,
                stop=stop,
                ttl=ttl,
                keepalive=keepalive,
                token=token,
                tls=tls,
                store_security=store_security,
            )
            click.echo("discovery stopped", err=True)

        _run_until_signal(main_processes)
        return

    started = []

    def announce(server: discovery_server.DiscoveryServer) -> None:
        started.append(server)
        extra = f", http://{server.http_address}/" if server.http_address else ""
        click.echo(f"discovery listening on {server.address} (store {server.store.url}{extra})", err=True)

    async def main(stop: asyncio.Event) -> None:
        try:
            await discovery_server.serve(
                listen,
                store,
                http=http,
                ttl=ttl,
                keepalive=keepalive,
                stop=stop,
                token=token,
                tls=tls,
                store_security=store_security,
                on_started=announce,
            )
        finally:
            if started:
                click.echo("discovery stopped", err=True)

    _run_until_signal(main)


@discovery.command()
@click.option("--discovery", "discovery_", required=True, help="Discovery server(s), HOST:PORT[,HOST:PORT…].")
@click.option("--service-name", default="", help="Only this service.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@token_option("client")
@tls_options("client")
def status(
    discovery_: str,
    service_name: str,
    as_json: bool,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
) -> None:
    """Show services, their teachers and students, and who is assigned to whom."""
    from distill_reader.discovery.client import fetch_status
    from distill_reader.discovery.service import status_dict

    security = client_security_or_exit(token_file, tls_ca, tls_cert, tls_key)

    async def main(stop: asyncio.Event) -> None:
        data = status_dict(await fetch_status(discovery_, service_name, security=security))
        if as_json:
            click.echo(json.dumps(data, indent=2))
            return
        _print_table(data)

    _run_until_signal(main)


def _print_table(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not data["services"]:
        console.print("no services registered")
    for name, svc in sorted(data["services"].items()):
        table = Table(title=f"service {name}", title_justify="left")
        for col in ("teacher", "model", "weight", "healthy", "students"):
            table.add_column(col)
        for t in svc["teachers"]:
            table.add_row(
                t["endpoint"],
                t["model_name"],
                str(t["weight"]),
                "yes" if t["healthy"] else "NO",
                ", ".join(t["students"]) or "-",
            )
        console.print(table)
        table = Table(show_header=True)
        for col in ("student", "wants", "teachers"):
            table.add_column(col)
        for s in svc["students"]:
            table.add_row(s["id"], str(s["require_num"]), ", ".join(s["teachers"]) or "-")
        console.print(table)


@click.command()
@click.option("--discovery", "discovery_", required=True, help="Discovery server(s), HOST:PORT[,HOST:PORT…].")
@click.option("--service-name", required=True, help="Service the teacher joins.")
@click.option(
    "--endpoint",
    "endpoints",
    required=True,
    multiple=True,
    help="The teacher's address, HOST:PORT: its OIP gRPC port, or its HTTP API (openai). Repeat it (or give "
    "HOST:PORT,HOST:PORT…) to keep several teachers of this host registered, their keep-alives in one message.",
)
@click.option("--model-name", default="teacher", show_default=True, help="Model the students should ask for.")
@click.option(
    "--protocol",
    type=click.Choice(["oip", "openai"]),
    default="oip",
    show_default=True,
    help="What students speak to it: Open Inference Protocol over gRPC, or an OpenAI-compatible completions "
    "API with prompt log-probs (vLLM).",
)
@click.option("--weight", default=1.0, show_default=True, type=float, help="Capacity weight (> 0).")
@click.option(
    "--readiness-check/--no-readiness-check",
    default=True,
    show_default=True,
    help="Keep the teacher registered only while it answers OIP ServerReady/ModelReady (openai: GET /health).",
)
@token_option("client")
@tls_options("client")
@click.option(
    "--teacher-plaintext",
    is_flag=True,
    help="Check the teacher's readiness over plaintext even with --tls-* (which otherwise apply to it too).",
)
def register(
    discovery_: str,
    service_name: str,
    endpoints: tuple[str, ...],
    model_name: str,
    protocol: str,
    weight: float,
    readiness_check: bool,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    teacher_plaintext: bool,
) -> None:
    """Register any OIP teacher (Triton, KServe, …) or OpenAI-compatible one (vLLM) until SIGINT/SIGTERM;
    with several --endpoint, all of them (a host's), their keep-alives in one message."""
    from distill_reader.discovery.client import TeacherRegistration, keep_all_registered
    from distill_reader.security import ClientSecurity

    security = client_security_or_exit(token_file, tls_ca, tls_cert, tls_key)
    teacher_security = ClientSecurity(None, None if teacher_plaintext else security.tls)
    names = [e.strip() for value in endpoints for e in value.split(",") if e.strip()]
    teachers = [TeacherRegistration(e, model_name, weight, protocol) for e in names]

    async def main(stop: asyncio.Event) -> None:
        click.echo(f"keeping {', '.join(names)} ({protocol}) registered in {service_name!r} via {discovery_}", err=True)
        await keep_all_registered(
            discovery_,
            service_name,
            teachers,
            readiness_check,
            stop,
            security=security,
            teacher_security=teacher_security,
        )

    _run_until_signal(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(discovery())
