"""Tokens and TLS for every gRPC server and client of distill-reader, in one place.

- A **token** is a shared secret read from a file (its content, stripped). Clients send it as gRPC
  metadata ``authorization: Bearer <token>``; servers compare it with :func:`hmac.compare_digest`
  in :class:`TokenInterceptor` and refuse other calls with ``UNAUTHENTICATED``. The token is held
  in a :class:`Secret`, whose ``repr`` and ``str`` never show it, so it cannot leak into logs,
  exception messages or status output by accident.
- **TLS** material is read once into :class:`TlsFiles` (PEM bytes). A server needs a certificate and
  key; a CA on a server means client certificates are required (mTLS). A client uses the CA to
  verify the server and presents its certificate and key where the server wants mTLS.

See ``docs/security.md`` for the flags and ``[conf]`` keys that reach this module.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
The flags and ``[conf]`` keys are the contract, not this module's names.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from distill_reader.errors import ConfigError

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"
_SCHEME = "Bearer "
_REFUSAL_LOG_EVERY_S = 10.0


class Secret:
    """A string that never shows itself: ``repr``/``str`` print ``***``; ``reveal()`` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself (for the wire only)."""
        return self._value

    def matches(self, candidate: str | bytes) -> bool:
        """Constant-time comparison with ``candidate``."""
        if isinstance(candidate, str):
            candidate = candidate.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(self._value.encode(), candidate)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.matches(other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __getstate__(self) -> str:
        return self._value

    def __setstate__(self, state: str) -> None:
        self._value = state


def read_token_file(path: str | Path, what: str = "--token-file", *, noun: str = "token") -> Secret:
    """The secret in ``path`` (its content, stripped); ConfigError naming ``what`` if unreadable or empty.

    ``noun`` names the secret in messages (a token, a store password); the content never appears.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {noun} file {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {noun} file {str(path)!r} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{what}: {noun} file {str(path)!r} is empty")
    if not all(32 <= ord(c) < 127 for c in text):
        # gRPC metadata values are printable ASCII; say so without echoing the content.
        raise ConfigError(f"{what}: {noun} file {str(path)!r} must hold one line of printable ASCII")
    return Secret(text)


@dataclass(frozen=True)
class TlsFiles:
    """PEM contents: ``ca`` (verifies the peer), ``cert`` and ``key`` (this side's identity)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server TLS; with a CA, clients must present a certificate it signed (mTLS)."""
        if not (self.cert and self.key):
            raise ConfigError("a TLS server needs a certificate and a key (--tls-cert and --tls-key)")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client TLS: the CA verifies the server (system roots without one); cert+key for mTLS."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what}: {str(path)!r} is not a PEM file")
    return data


def load_tls(
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    *,
    names: Sequence[str] = ("--tls-ca", "--tls-cert", "--tls-key"),
) -> TlsFiles | None:
    """Read the PEM files given (None if none is); ``names`` name them in ConfigErrors."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ConfigError(f"{names[1]} and {names[2]} go together")
    return TlsFiles(
        ca=_read_pem(ca, names[0]) if ca else None,
        cert=_read_pem(cert, names[1]) if cert else None,
        key=_read_pem(key, names[2]) if key else None,
    )


@dataclass(frozen=True)
class ClientSecurity:
    """What a client sends: a token (as metadata) and TLS (the channel's credentials); both optional."""

    token: Secret | None = None
    tls: TlsFiles | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata carrying the token, or None."""
        if self.token is None:
            return None
        return ((AUTH_METADATA_KEY, _SCHEME + self.token.reveal()),)

    def channel(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        """An asyncio channel to ``target``: TLS if configured, plaintext otherwise."""
        if self.tls is not None:
            return grpc.aio.secure_channel(target, self.tls.channel_credentials(), options=options)
        return grpc.aio.insecure_channel(target, options=options)


NO_SECURITY = ClientSecurity()


def client_security(
    token_file: str | Path | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> ClientSecurity:
    """A :class:`ClientSecurity` from the command-line flags' values (ConfigError naming the flag)."""
    token = read_token_file(token_file) if token_file else None
    return ClientSecurity(token, load_tls(tls_ca, tls_cert, tls_key))


def add_port(server: grpc.aio.Server, listen: str, tls: TlsFiles | None) -> int:
    """Bind ``listen`` with TLS or plaintext; the bound port (0 or RuntimeError if it failed)."""
    if tls is not None:
        return server.add_secure_port(listen, tls.server_credentials())
    return server.add_insecure_port(listen)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of a listen address) is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(listen: str, token: Secret | None, what: str, logger: logging.Logger = log) -> bool:
    """Log a WARNING when ``listen`` is not loopback and no token is required; True if warned."""
    host = listen.rpartition(":")[0]
    if token is not None or is_loopback(host):
        return False
    logger.warning(
        "%s listens on %s without a token: anyone who can reach this address can use it; "
        "pass --token-file (and --tls-cert/--tls-key) or listen on 127.0.0.1",
        what,
        listen,
    )
    return True


def missing_token_message(what: str) -> str:
    return f"{what} requires a token: pass --token-file (readers: [conf] token_file)"


WRONG_TOKEN_MESSAGE = "wrong token"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right ``authorization: Bearer`` token with ``UNAUTHENTICATED``.

    ``methods``: the full method names to protect (``/package.Service/Method``); None protects every
    method. ``on_refused(method)`` is called for each refused call (e.g. to count it).
    """

    def __init__(
        self,
        token: Secret,
        what: str,
        methods: Collection[str] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._token = token
        self._what = what
        self._methods = frozenset(methods) if methods is not None else None
        self._on_refused = on_refused
        self._last_log = 0.0

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None if ``metadata`` carries the token, else the reason to refuse (without any token)."""
        values = [v for k, v in (metadata or ()) if k == AUTH_METADATA_KEY]
        if not values:
            return missing_token_message(self._what)
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if not value.startswith(_SCHEME):
            return f"{WRONG_TOKEN_MESSAGE} (expected 'authorization: Bearer <token>')"
        if not self._token.matches(value[len(_SCHEME) :]):
            return WRONG_TOKEN_MESSAGE
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (self._methods is not None and method not in self._methods):
            return handler
        reason = self.check(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        if self._on_refused is not None:
            self._on_refused(method)
        now = time.monotonic()
        if now - self._last_log >= _REFUSAL_LOG_EVERY_S:
            self._last_log = now
            log.warning("%s refused a call to %s: %s", self._what, method, reason)
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED with ``reason``."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)


def explain_unavailable(exc: grpc.aio.AioRpcError | grpc.RpcError, security: ClientSecurity | None) -> str:
    """``exc``'s details plus a hint where an UNAVAILABLE looks like a TLS mismatch."""
    details = exc.details() or ""  # type: ignore[union-attr]
    if exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[union-attr]
        return details
    low = details.lower()
    if security is not None and security.tls is not None:
        if "handshake" in low or "ssl" in low or "certificate" in low:
            return (
                f"{details} (TLS handshake failed: does the server use TLS, with a certificate signed by the "
                "CA given (--tls-ca, readers: [conf] tls_ca) for this address?)"
            )
        if "socket closed" in low or "connection reset" in low:
            return f"{details} (closed by the server: does it require a client certificate (--tls-cert/--tls-key)?)"
        return details
    if "socket closed" in low or "connection reset" in low or "handshake" in low or "ssl" in low:
        return f"{details} (if the server uses TLS, pass --tls-ca (readers: [conf] tls_ca))"
    return details
