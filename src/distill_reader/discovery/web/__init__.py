"""The discovery server's HTTP side (aiohttp): the live dashboard, ``/status.json``, ``/metrics``.

* ``/``: the dashboard (one self-contained page, ``index.html``: no CDN, nothing fetched from
  elsewhere); it polls ``/status.json`` once per report interval and draws the last minutes.
* ``/status.json``: the Status RPC's answer plus what the students report (see
  :mod:`distill_reader.discovery.fleet`) and a few minutes of history.
* ``/metrics``: Prometheus.
* ``/healthz``: ``ok``, always open (for probes).

With a token (``--token-file``) every path but ``/healthz`` answers 401 unless the request has
``Authorization: Bearer TOKEN``. A browser never sends that header when it navigates, so ``/``
answers 401 with the dashboard's page itself, which holds no data: it asks for the token once,
keeps it in the tab's ``sessionStorage`` and sends it with every ``/status.json`` request. With
TLS the same certificate serves HTTPS; with a CA (``--tls-ca``) clients must present a certificate
it signed, as on the gRPC side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import tempfile
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from distill_reader.errors import StoreUnavailable
from distill_reader.security import Secret, TlsFiles

if TYPE_CHECKING:
    from distill_reader.discovery.server import DiscoveryServer

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz"})
# The page may talk to its own server only (and loads nothing from anywhere else).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page() -> str:
    """The dashboard's HTML (read once per request: it is small)."""
    return resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def make_app(server: DiscoveryServer, token: Secret | None) -> web.Application:
    @web.middleware
    async def security(request: web.Request, handler):
        if token is not None and request.path not in OPEN_PATHS:
            given = _bearer(request)
            if given is None or not token.matches(given):
                why = "wrong token" if given is not None else "this discovery server requires its token"
                headers = {**_HEADERS, "WWW-Authenticate": 'Bearer realm="distill discovery"'}
                if request.path == "/" and request.method == "GET":
                    # The page itself (no data in it): it asks for the token.
                    return web.Response(status=401, text=page(), content_type="text/html", headers=headers)
                return web.json_response({"error": why}, status=401, headers=headers)
        response = await handler(request)
        response.headers.update(_HEADERS)
        return response

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page(), content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        try:
            body = await server.status_with_figures()
        except StoreUnavailable as exc:
            return web.json_response({"error": f"store unavailable: {exc}"}, status=503)
        return web.Response(text=json.dumps(body, indent=1), content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(server.service.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(middlewares=[security])
    app.router.add_get("/", index)
    app.router.add_get("/status.json", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


def ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """HTTPS with the server's certificate; with a CA, client certificates it signed are required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert and tls.key
    # ssl loads a key only from a file: a private temporary one, removed at once.
    fd, path = tempfile.mkstemp(prefix="distill-tls-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tls.cert + b"\n" + tls.key)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if tls.ca:
        ctx.load_verify_locations(cadata=tls.ca.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_web(
    server: DiscoveryServer, host: str, port: int, token: Secret | None, tls: TlsFiles | None
) -> tuple[web.AppRunner, int]:
    """Serve the dashboard on ``host:port`` (HTTPS with ``tls``); the runner and the bound port."""
    # shutdown_timeout: stopping waits that long at most for requests being answered.
    runner = web.AppRunner(make_app(server, token), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context(tls) if tls else None, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
