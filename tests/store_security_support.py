"""Redis and etcd started with passwords, ACL users, roles and TLS, for the store security tests.

Each is the fault-injection benchmark's :class:`StoreProcess` with extra flags; readiness is
checked over TLS where the server speaks only TLS. Certificates come from ``security_support``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.request
from pathlib import Path

import grpc
from aetcd import rpc
from security_support import Pki

from distill_reader.bench.processes import StoreProcess

REDIS_PASSWORD = "default-pass-0123"  # the default user's (requirepass)
REDIS_USER, REDIS_USER_PASSWORD = "distill", "acl-pass-4567"
# What discovery needs: its keys, its change channel and expiry events (CONFIG is refused, so it
# polls instead of enabling keyspace events, as on managed Redis).
REDIS_ACL = (
    f"{REDIS_USER} on >{REDIS_USER_PASSWORD} ~distill:* &distill:changes &__keyevent@*__:expired +@all -@dangerous"
)
ETCD_ROOT_PASSWORD = "root-pass-89ab"
ETCD_USER, ETCD_PASSWORD = "distill", "etcd-pass-cdef"
ETCD_OUTSIDER, ETCD_OUTSIDER_PASSWORD = "outsider", "no-role-0000"


def redis_with_auth(workdir: Path) -> StoreProcess:
    """Redis whose default user needs ``REDIS_PASSWORD`` and with the ACL user ``REDIS_USER``."""
    acl = workdir / "users.acl"
    acl.write_text(f"user default on >{REDIS_PASSWORD} ~* &* +@all\nuser {REDIS_ACL}\n")
    return StoreProcess("redis", workdir, ["--aclfile", str(acl)])


class TlsStoreProcess(StoreProcess):
    """Redis or etcd speaking only TLS, with client certificates required (signed by ``pki.ca``)."""

    def __init__(self, kind: str, workdir: Path, pki: Pki) -> None:
        if kind == "redis":
            extra = [
                "--port", "0", "--tls-port", "PORT",
                "--tls-cert-file", pki.server_cert, "--tls-key-file", pki.server_key,
                "--tls-ca-cert-file", pki.ca, "--tls-auth-clients", "yes",
            ]  # fmt: skip
        else:
            extra = [
                "--listen-client-urls", "https://127.0.0.1:PORT", "--advertise-client-urls", "https://127.0.0.1:PORT",
                "--cert-file", pki.server_cert, "--key-file", pki.server_key,
                "--client-cert-auth", "--trusted-ca-file", pki.ca,
            ]  # fmt: skip
        super().__init__(kind, workdir)
        self.extra_args = [str(a).replace("PORT", str(self.port)) for a in extra]
        self._context = ssl.create_default_context(cafile=str(pki.ca))
        self._context.load_cert_chain(str(pki.client_cert), str(pki.client_key))

    @property
    def url(self) -> str:
        return f"{self.kind}s://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        try:
            if self.kind == "redis":
                with (
                    socket.create_connection(("127.0.0.1", self.port), 0.5) as raw,
                    self._context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
                ):
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            url = f"https://127.0.0.1:{self.port}/health"
            with urllib.request.urlopen(url, timeout=0.5, context=self._context) as reply:
                return b"true" in reply.read()
        except OSError:
            return False


def enable_etcd_auth(port: int) -> None:
    """Users ``root``, ``ETCD_USER`` (read/write on ``/distill/``) and ``ETCD_OUTSIDER`` (no role); auth on."""

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            auth = rpc.AuthStub(channel)
            for user, password in (
                ("root", ETCD_ROOT_PASSWORD),
                (ETCD_USER, ETCD_PASSWORD),
                (ETCD_OUTSIDER, ETCD_OUTSIDER_PASSWORD),
            ):
                await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password), timeout=5)
            for role in ("root", "distill"):
                await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role), timeout=5)
            perm = rpc.Permission(permType=rpc.Permission.READWRITE, key=b"/distill/", range_end=b"/distill0")
            await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="distill", perm=perm), timeout=5)
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=ETCD_USER, role="distill"), timeout=5)
            await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)

    asyncio.run(main())
