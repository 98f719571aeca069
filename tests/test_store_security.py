"""Stores a cluster can trust: Redis AUTH (default user and ACL user), Redis over TLS with client
certificates, etcd over TLS with client certificates, etcd users and roles, each on a real server
started by the test. With the right credentials a teacher registers and a student gets it; with
wrong or missing ones the discovery server refuses to start with an error saying what to fix, and
a store client without them cannot register a teacher."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import grpc
import pytest
from security_support import make_pki
from store_security_support import (
    ETCD_OUTSIDER,
    ETCD_OUTSIDER_PASSWORD,
    ETCD_PASSWORD,
    ETCD_USER,
    REDIS_PASSWORD,
    REDIS_USER,
    REDIS_USER_PASSWORD,
    TlsStoreProcess,
    enable_etcd_auth,
    redis_with_auth,
)
from test_discovery_support import ServiceProcess, Watch, free_port, have

from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.proto import discovery_pb2_grpc as pb_grpc
from distill_reader.discovery.server import DiscoveryServer
from distill_reader.discovery.stores import open_discovery_store
from distill_reader.discovery.stores.base import (
    PASSWORD_ENV,
    StoreSecurity,
    parse_store_url,
    store_security,
)
from distill_reader.errors import DiscoveryError, StoreRefused
from distill_reader.security import Secret

pytestmark = pytest.mark.timeout(60)


def needs(binary: str) -> None:
    if not have(binary):
        pytest.skip(f"{binary} is not installed (scripts/install-services.sh installs it)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def redis_auth(tmp_path_factory):
    needs("redis-server")
    proc = redis_with_auth(tmp_path_factory.mktemp("redis-auth"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def etcd_auth(tmp_path_factory):
    needs("etcd")
    proc = ServiceProcess("etcd", tmp_path_factory.mktemp("etcd-auth"))
    proc.start()
    enable_etcd_auth(proc.port)
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["redis", "etcd"])
def tls_store(request, tmp_path_factory, pki):
    needs("redis-server" if request.param == "redis" else "etcd")
    proc = TlsStoreProcess(request.param, tmp_path_factory.mktemp(f"{request.param}-tls"), pki)
    proc.start()
    yield proc
    proc.stop()


def secure(username: str | None = None, password: str | None = None, **tls) -> StoreSecurity:
    return StoreSecurity(username, Secret(password) if password else None, **{k: str(v) for k, v in tls.items()})


async def teacher_reaches_student(url: str, security: StoreSecurity | None) -> None:
    """A discovery server on the store: a teacher registers and a student is assigned it."""
    server = DiscoveryServer("127.0.0.1:0", url, store_security=security)
    await server.start()
    try:
        service = f"svc-{uuid.uuid4().hex[:8]}"
        watch = Watch(server.address, service, 1)
        async with grpc.aio.insecure_channel(server.address) as channel:
            request = pb.RegisterTeacherRequest(service_name=service, endpoint="127.0.0.1:9000")
            await pb_grpc.DiscoveryStub(channel).RegisterTeacher(request, timeout=5)
        await watch.wait_for(lambda s: s == ["127.0.0.1:9000"])
        await watch.close()
    finally:
        await server.stop()


async def refused_at_start(url: str, security: StoreSecurity | None) -> str:
    """The DiscoveryError a discovery server with these credentials fails to start with."""
    server = DiscoveryServer("127.0.0.1:0", url, store_security=security)
    with pytest.raises(DiscoveryError) as info:
        await server.start()
    return str(info.value)


async def cannot_register(url: str, security: StoreSecurity | None = None) -> str:
    """What a store client without the right credentials gets when it writes a teacher's lease."""
    store = open_discovery_store(url, security)
    try:
        with pytest.raises(StoreRefused) as info:
            await store.register("teacher", "svc", "127.0.0.1:9000", "i", {"model_name": "m"}, 2)
    finally:
        await store.close()
    return str(info.value)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 50))


def test_redis_auth(redis_auth):
    url = redis_auth.url
    user_url = f"redis://{REDIS_USER}@127.0.0.1:{redis_auth.port}"

    async def main():
        await teacher_reaches_student(url, secure(password=REDIS_PASSWORD))  # the default user
        await teacher_reaches_student(user_url, secure(REDIS_USER, REDIS_USER_PASSWORD))  # an ACL user
        wrong = await refused_at_start(user_url, secure(REDIS_USER, "not-the-password"))
        assert "authentication failed" in wrong and user_url + "/0" in wrong and "not-the-password" not in wrong
        assert "--store-password-file" in wrong
        missing = await refused_at_start(url, None)
        assert "requires authentication and none was given" in missing
        assert "requires authentication" in await cannot_register(url)

    run(main())


def test_etcd_users_and_roles(etcd_auth):
    port = etcd_auth.port
    url = f"etcd://{ETCD_USER}@127.0.0.1:{port}"

    async def main():
        await teacher_reaches_student(url, secure(ETCD_USER, ETCD_PASSWORD))
        wrong = await refused_at_start(url, secure(ETCD_USER, "not-the-password"))
        assert "authentication failed" in wrong and url in wrong and "not-the-password" not in wrong
        missing = await refused_at_start(f"etcd://127.0.0.1:{port}", None)
        assert "requires authentication and none was given" in missing and "user name is empty" in missing
        outsider = f"etcd://{ETCD_OUTSIDER}@127.0.0.1:{port}"
        denied = await refused_at_start(outsider, secure(ETCD_OUTSIDER, ETCD_OUTSIDER_PASSWORD))
        assert "permission denied" in denied
        assert "requires authentication" in await cannot_register(f"etcd://127.0.0.1:{port}")

    run(main())
    # etcd forgets auth tokens when it restarts: the store signs in again by itself.
    etcd_auth.kill()
    etcd_auth.start()
    run(teacher_reaches_student(url, secure(ETCD_USER, ETCD_PASSWORD)))


def test_tls_with_client_certificates(tls_store, pki):
    url = tls_store.url

    async def main():
        await teacher_reaches_student(url, secure(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))
        wrong_ca = await refused_at_start(url, secure(ca=pki.other_ca, cert=pki.client_cert, key=pki.client_key))
        assert "TLS handshake failed" in wrong_ca and "--store-ca" in wrong_ca
        no_cert = await refused_at_start(url, secure(ca=pki.ca))
        assert "TLS handshake failed" in no_cert and "--store-cert" in no_cert
        # Without a client certificate nobody writes to the store, whatever it is told.
        assert "TLS handshake failed" in await cannot_register(url, secure(ca=pki.ca))

    run(main())


def test_cli_password_from_the_environment(redis_auth, tmp_path):
    """``distill discovery serve`` takes the password from $DISTILL_STORE_PASSWORD or a file, never argv,
    and a wrong one stops it with an error that names the store and not the password."""
    url = f"redis://{REDIS_USER}@127.0.0.1:{redis_auth.port}"
    cmd = [sys.executable, "-m", "distill_reader", "discovery", "serve", "--listen", f"127.0.0.1:{free_port()}"]
    env = {**os.environ, PASSWORD_ENV: REDIS_USER_PASSWORD}
    good = subprocess.Popen([*cmd, "--store", url], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in good.stderr.readline()
    finally:
        good.terminate()
        good.wait(10)
    bad_file = tmp_path / "password"
    bad_file.write_text("wrong-one\n")
    bad = subprocess.run(
        [*cmd, "--store", url, "--store-password-file", str(bad_file)], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0
    assert "authentication failed" in bad.stderr and url in bad.stderr and "wrong-one" not in bad.stderr


def test_store_flag_errors(tmp_path, pki):
    """Bad store credentials are refused before anything connects, naming the flag and never the secret."""
    with pytest.raises(DiscoveryError, match="no password in the URL") as info:
        parse_store_url("redis://u:hunter2@h:6379")
    assert "hunter2" not in str(info.value) and "--store-password-file" in str(info.value)
    assert "DISTILL_STORE_PASSWORD" in str(info.value)
    assert parse_store_url("rediss://me@h:1/3").username == "me" and parse_store_url("etcds://h:1").tls
    missing = tmp_path / "nope.pem"
    with pytest.raises(DiscoveryError, match=f"--store-ca: cannot read '{missing}'"):
        store_security("etcds://h:1", ca=str(missing))
    with pytest.raises(DiscoveryError, match="--store-password-file: cannot read password file"):
        store_security("redis://h:1", password_file=str(missing))
    with pytest.raises(DiscoveryError, match="need a TLS store URL"):
        store_security("etcd://h:1", ca=str(pki.ca))
    with pytest.raises(DiscoveryError, match="needs a password"):
        store_security("redis://me@h:1", environ={})
    with pytest.raises(DiscoveryError, match="an etcd password needs a user"):
        store_security("etcd://h:1", environ={PASSWORD_ENV: "x"})
    with pytest.raises(DiscoveryError, match="differs from the user in the store URL"):
        store_security("etcd://a@h:1", user="b", environ={PASSWORD_ENV: "x"})
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret\n")
    with pytest.raises(DiscoveryError, match="one place"):
        store_security("redis://h:1", password_file=str(password_file), environ={PASSWORD_ENV: "x"})
    security = store_security("redis://h:1", user="me", password_file=str(password_file), environ={})
    assert security.username == "me" and security.password.reveal() == "s3cret" and "s3cret" not in repr(security)
    assert store_security("redis://h:1", environ={}) is None
    assert open_discovery_store("rediss://me@h:1/2", security).url == "rediss://me@h:1/2"
