"""The one interface every discovery store implements, and ``--store`` URL parsing.

A store holds, per service: teacher leases, student leases and the current assignment. Leases
carry a TTL and disappear on their own when not kept; the assignment is written with
compare-and-swap so that several discovery servers on one store agree on a single history.
Everything a discovery server needs to compute an assignment is in the store, so any server
can answer any client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from distill_reader.errors import ConfigError, DiscoveryError
from distill_reader.rpc import require_hostport
from distill_reader.security import Secret, TlsFiles, load_tls, read_token_file

log = logging.getLogger(__name__)

Kind = Literal["teacher", "student"]

# Default keep_group: how many per-member keeps run at once.
_KEEP_BATCH = 64


@dataclass
class ServiceState:
    """A service as read from the store.

    ``teachers``: endpoint -> {"model_name", "weight", "healthy"}; ``students``: id ->
    {"require_num"}; ``assignment``: student id -> endpoints; ``version``: opaque, for
    :meth:`Store.write_assignment`.
    """

    teachers: dict[str, dict] = field(default_factory=dict)
    students: dict[str, dict] = field(default_factory=dict)
    assignment: dict[str, list[str]] = field(default_factory=dict)
    version: str | None = None


def encode_assignment(assignment: dict[str, list[str] | tuple[str, ...]]) -> str:
    """Canonical JSON, so equal assignments are equal strings (used as the CAS version)."""
    return json.dumps({s: list(ts) for s, ts in sorted(assignment.items())}, sort_keys=True)


class Store(ABC):
    """Leases with TTLs, an assignment per service, and change notifications."""

    url: str

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Connect; called once before anything else."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks."""

    @abstractmethod
    async def register(self, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float) -> str:
        """Create or take over (same ``instance``) a lease; returns its id.

        Raises :class:`AlreadyRegistered` if a live lease for ``member`` has another instance.
        """

    @abstractmethod
    async def keep(
        self, kind: Kind, service: str, member: str, lease: str, ttl: float, data: dict | None = None
    ) -> bool:
        """Extend a lease (and replace its data if given); False if the lease is gone."""

    @abstractmethod
    async def drop(self, kind: Kind, service: str, member: str, lease: str) -> None:
        """End a lease now, if it is still this one."""

    async def expire_silent(self, kind: Kind, service: str, member: str, lease: str, ttl: float, silence: float) -> str:
        """End a lease (kept with ``ttl``) if it was not kept for ``silence`` seconds, by the store's
        own clock (so that a lease kept meanwhile through another server stays). Returns
        ``"ended"``, ``"kept"`` (kept within ``silence``: left alone) or ``"gone"`` (no such lease).

        The discovery server calls it when, by its own clock corrected for its own lag, the lease's
        holder went silent; the store's TTL is then only the bound for a server that died. This
        default cannot ask the store when the lease was kept and trusts the server: it drops it.
        """
        await self.drop(kind, service, member, lease)
        return "ended"

    @abstractmethod
    async def services(self) -> list[str]:
        """Names of the services that have any member or assignment."""

    @abstractmethod
    async def read(self, service: str) -> ServiceState:
        """The service's live members and assignment."""

    @abstractmethod
    async def write_assignment(self, service: str, version: str | None, assignment: dict) -> bool:
        """Replace the assignment if it is still at ``version``; False if someone wrote first."""

    @abstractmethod
    def changes(self) -> AsyncIterator[str | None]:
        """Yields a service name whenever something in it may have changed, or None for
        "anything may have changed" (after a reconnect). Runs until the store is closed."""

    # --- bulk leases and incremental writes ---------------------------------------------------
    #
    # A discovery server streams to many students and keeps their leases. Instead of one lease per
    # student, a server *joins* its students to a *group* (one per server) and keeps the group: one
    # store operation per keep-alive interval however many students it streams to. A member of a
    # group lives while the group is kept and until it leaves; when the group is not kept for a TTL
    # (the server died or stalled), every member goes with it.
    #
    # The defaults below are built from the per-member primitives (one lease per member, kept in
    # concurrent batches), so a store without native groups works unchanged; the memory and Redis
    # stores override them natively.

    def _group_book(self) -> dict[str, dict[tuple[str, str, str], str]]:
        """The default implementation's bookkeeping: group -> (kind, service, member) -> lease."""
        return vars(self).setdefault("_default_groups", {})

    async def join(
        self, group: str, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float
    ) -> str:
        """Create or take over (same ``instance``) a member whose lease is ``group``'s; returns an id
        for :meth:`leave`. Raises :class:`AlreadyRegistered` like :meth:`register`."""
        lease = await self.register(kind, service, member, instance, data, ttl)
        self._group_book().setdefault(group, {})[(kind, service, member)] = lease
        return lease

    async def keep_group(self, group: str, ttl: float) -> list[tuple[str, str, str]]:
        """Extend the lease of every member of ``group``; returns the ``(kind, service, member)`` whose
        lease had lapsed (they are no longer members: join them again)."""
        members = self._group_book().get(group, {})
        items = list(members.items())
        lapsed: list[tuple[str, str, str]] = []
        for i in range(0, len(items), _KEEP_BATCH):
            batch = items[i : i + _KEEP_BATCH]
            results = await asyncio.gather(
                *(self.keep(k, s, m, lease, ttl) for (k, s, m), lease in batch), return_exceptions=True
            )
            for (key, lease), ok in zip(batch, results):
                if isinstance(ok, BaseException):
                    raise ok
                if not ok and members.get(key) == lease:
                    del members[key]
                    lapsed.append(key)
        return lapsed

    async def leave(self, group: str, kind: Kind, service: str, member: str, lease: str) -> None:
        """End a member's lease now, if it is still this one."""
        members = self._group_book().get(group, {})
        if members.get((kind, service, member)) == lease:
            del members[(kind, service, member)]
        await self.drop(kind, service, member, lease)

    async def update_assignment(
        self,
        service: str,
        version: str | None,
        assignment: dict[str, list[str]],
        changed: dict[str, list[str]],
        removed: list[str],
    ) -> bool:
        """Like :meth:`write_assignment`, given also what changed since ``version`` (``changed``:
        students with a new set, ``removed``: students gone), so that a store can write only that."""
        return await self.write_assignment(service, version, assignment)


Member = tuple[str, str, str]  # (kind, service, member)

_join_ids = itertools.count()
_join_prefix = uuid.uuid4().hex[:16]


def _new_join_prefix() -> None:
    global _join_prefix
    _join_prefix = uuid.uuid4().hex[:16]


os.register_at_fork(after_in_child=_new_join_prefix)  # a forked server's ids are its own


def new_join_id() -> str:
    """An id for one join of a student to a group (the id its leave names): a random prefix per
    process and a counter. uuid4 draws from the kernel's random source, a system call each: in a
    burst of 10,000 joins that was 1-5 % of the server's time."""
    return f"{_join_prefix}{next(_join_ids):x}"


class GroupBook:
    """What a store that keeps groups natively (Redis, etcd) knows of its own groups: each group's
    current lease, the members this process joined to it (the id :meth:`Store.leave` checks, and the
    group lease they joined under), and the members lost with a lapsed group until
    :meth:`Store.keep_group` reports them. The group leases are the store's own (a Redis key's
    value, an etcd lease id)."""

    def __init__(self) -> None:
        #: group -> its current lease
        self.leases: dict[str, object] = {}
        self._members: dict[str, dict[Member, tuple[str, object]]] = {}
        self._lapsed: dict[str, list[Member]] = {}

    def joined(self, group: str, key: Member, member_id: str, lease: object) -> None:
        """``key`` joined ``group`` under the group lease ``lease`` (with ``member_id``, for leave);
        if the group lapsed while the join was in flight, it is lapsed with the others."""
        if self.leases.get(group) == lease:
            self._members.setdefault(group, {})[key] = (member_id, lease)
        else:
            self._lapsed.setdefault(group, []).append(key)

    def lose(self, group: str, lease: object) -> None:
        """The group's lease ``lease`` is gone (with every member joined under it): they are lapsed.
        Nothing if the group already has another lease (a join or a keep noticed first)."""
        if group not in self.leases or self.leases[group] != lease:
            return
        del self.leases[group]
        members = self._members.get(group, {})
        lost = [key for key, (_, joined) in members.items() if joined == lease]
        for key in lost:
            del members[key]
        self._lapsed.setdefault(group, []).extend(lost)

    def left(self, group: str, key: Member, member_id: str) -> None:
        """``key`` left ``group``, if it is still the join ``member_id``."""
        members = self._members.get(group, {})
        if key in members and members[key][0] == member_id:
            del members[key]

    def take_lapsed(self, group: str) -> list[Member]:
        """The members lost with ``group``'s lapses since the last call."""
        return self._lapsed.pop(group, [])


class NativeGroupStore(Store):
    """A store that keeps a discovery server's *students* in groups of its own (one lease for the
    group, kept with one store operation); teachers keep their own leases (their keep-alives carry
    their readiness) through the per-member defaults. Subclasses implement :meth:`_keep_group_lease`
    and the student side of :meth:`join` and :meth:`leave`, recording in ``self._groups``."""

    def __init__(self) -> None:
        self._groups = GroupBook()

    @abstractmethod
    async def _keep_group_lease(self, group: str, lease: object, ttl: float) -> bool:
        """Extend the group lease ``lease`` by ``ttl``; False if it is gone."""

    async def keep_group(self, group: str, ttl: float) -> list[Member]:
        """One keep of the group's lease for all its students (and the defaults' per-member keeps)."""
        lease = self._groups.leases.get(group)
        if lease is not None and not await self._keep_group_lease(group, lease, ttl):
            self._groups.lose(group, lease)
        return self._groups.take_lapsed(group) + await super().keep_group(group, ttl)


_STORE_HELP = (
    "expected 'memory', 'redis://[USER@]HOST:PORT[/DB]', 'rediss://…' (TLS), 'etcd://[USER@]HOST:PORT' "
    "or 'etcds://…' (TLS)"
)
_TLS_SCHEMES = {"rediss": "redis", "etcds": "etcd"}
PASSWORD_ENV = "DISTILL_STORE_PASSWORD"
PASSWORD_HELP = f"--store-password-file FILE or ${PASSWORD_ENV}"
STORE_FLAGS = ("--store-ca", "--store-cert", "--store-key")


@dataclass(frozen=True)
class StoreURL:
    """A parsed ``--store`` value: ``kind`` is ``memory``, ``redis`` or ``etcd``; ``tls`` for ``rediss``/``etcds``."""

    kind: str
    host: str = ""
    port: int = 0
    db: int = 0
    username: str | None = None
    tls: bool = False

    def __str__(self) -> str:
        """The URL as shown in logs and status: never a password (a URL cannot hold one)."""
        if self.kind == "memory":
            return "memory"
        scheme = self.kind + ("s" if self.tls else "")
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        db = f"/{self.db}" if self.kind == "redis" else ""
        return f"{scheme}://{user}{host}:{self.port}{db}"


@dataclass(frozen=True)
class StoreSecurity:
    """How to authenticate to a store: a user and password, and TLS files (PEM paths).

    Whether TLS is used is the URL's scheme (``rediss://``, ``etcds://``): ``ca`` verifies the
    store (the system's CAs without one), ``cert``/``key`` are this side's identity for stores
    that want client certificates. The password is a :class:`Secret`: its ``repr`` never shows it.
    """

    username: str | None = None
    password: Secret | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def tls_files(self) -> TlsFiles:
        """The PEM contents; DiscoveryError naming the ``--store-*`` flag of an unreadable file."""
        try:
            return load_tls(self.ca, self.cert, self.key, names=STORE_FLAGS) or TlsFiles()
        except ConfigError as exc:
            raise DiscoveryError(str(exc)) from None


def _redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for error messages)."""
    return re.sub(r"^([a-z]+://[^:@/]*):[^@/]*@", r"\1:***@", url)


def parse_store_url(url: str) -> StoreURL:
    """The parts of a ``--store`` value; raises DiscoveryError if malformed or if it holds a password."""
    if url == "memory":
        return StoreURL("memory")
    shown = _redacted(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DiscoveryError(f"bad store URL {shown!r}: {str(exc).replace(url, shown)}; {_STORE_HELP}") from None
    kind = _TLS_SCHEMES.get(parts.scheme, parts.scheme)
    if kind not in ("redis", "etcd") or not parts.hostname or port is None:
        raise DiscoveryError(f"bad store URL {shown!r}; {_STORE_HELP}")
    if parts.password is not None:
        raise DiscoveryError(
            f"bad store URL {shown!r}: no password in the URL (command lines and logs would show it); "
            f"give it with {PASSWORD_HELP}"
        )
    if parts.query or parts.fragment:
        raise DiscoveryError(f"bad store URL {shown!r}: no query or fragment; {_STORE_HELP}")
    path = parts.path.strip("/")
    db = 0
    if kind == "redis" and path:
        if not path.isdigit():
            raise DiscoveryError(f"bad store URL {shown!r}: the Redis database must be a number")
        db = int(path)
    elif kind == "etcd" and path:
        raise DiscoveryError(f"bad store URL {shown!r}: etcd URLs take no path")
    user = unquote(parts.username) if parts.username else None
    return StoreURL(kind, parts.hostname, port, db, user, parts.scheme in _TLS_SCHEMES)


def store_security(
    url: str,
    *,
    user: str | None = None,
    password_file: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> StoreSecurity | None:
    """The credentials for ``url`` from the ``--store-*`` flags and ``$DISTILL_STORE_PASSWORD``.

    DiscoveryError names the flag at fault: a user in both the URL and ``--store-user``, a
    password from two places, TLS files for a plaintext URL, an unreadable file.
    """
    parsed = parse_store_url(url)
    environ = os.environ if environ is None else environ
    env_password = environ.get(PASSWORD_ENV) or None
    if parsed.kind == "memory":
        if user or password_file or ca or cert or key:
            raise DiscoveryError("the memory store takes no --store-user, --store-password-file or TLS files")
        return None
    if user and parsed.username and user != parsed.username:
        raise DiscoveryError(f"--store-user {user!r} differs from the user in the store URL ({parsed.username!r})")
    if (ca or cert or key) and not parsed.tls:
        raise DiscoveryError(
            f"--store-ca/--store-cert/--store-key need a TLS store URL (rediss://… or etcds://…), got {str(parsed)!r}"
        )
    if password_file and env_password:
        raise DiscoveryError(f"the store password comes from one place: --store-password-file or ${PASSWORD_ENV}")
    try:
        password = read_token_file(password_file, "--store-password-file", noun="password") if password_file else None
    except ConfigError as exc:
        raise DiscoveryError(str(exc)) from None
    security = StoreSecurity(None, None, ca, cert, key)
    security.tls_files()  # a missing or non-PEM file fails here, naming its flag
    if env_password:
        password = Secret(env_password)
    username = user or parsed.username
    if username and password is None:
        raise DiscoveryError(f"store user {username!r} needs a password: {PASSWORD_HELP}")
    if password is not None and username is None and parsed.kind == "etcd":
        raise DiscoveryError(
            "an etcd password needs a user: etcd://USER@HOST:PORT or --store-user (Redis alone has a default user)"
        )
    if username is None and password is None and not (ca or cert or key):
        return None
    return replace(security, username=username, password=password)


def unreachable_hint(url: str, detail: object) -> str:
    """A hint for a plaintext URL whose store hung up on us: it may speak only TLS."""
    text = str(detail).lower()
    if "://" in url and url.split("://")[0] in ("redis", "etcd") and ("closed" in text or "reset" in text):
        return f" (if the store speaks only TLS, use {url.split('://')[0]}s://)"
    return ""


def auth_failed(url: str, detail: object, given: bool = True) -> DiscoveryError:
    """The error for a store that refused this server's user or password (``url`` holds no secret);
    ``given``: whether this server had credentials for it at all."""
    if not given:
        return DiscoveryError(
            f"store {url} requires authentication and none was given ({detail}); give the user in the URL or "
            f"with --store-user, and the password with {PASSWORD_HELP}"
        )
    return DiscoveryError(
        f"store {url}: authentication failed ({detail}); check the user (in the URL or --store-user) "
        f"and the password ({PASSWORD_HELP})"
    )


def permission_denied(url: str, detail: object) -> DiscoveryError:
    """The error for a store user that may not touch discovery's keys."""
    return DiscoveryError(
        f"store {url}: permission denied ({detail}); the store user needs read and write access to discovery's "
        "keys (docs/security.md shows the Redis ACL and the etcd role)"
    )


def tls_failed(url: str, detail: object) -> DiscoveryError:
    """The error for a TLS handshake with the store that failed."""
    return DiscoveryError(
        f"store {url}: TLS handshake failed ({detail}); check --store-ca (the CA that signed the store's "
        "certificate), --store-cert/--store-key where the store wants client certificates, and that the URL's "
        "scheme matches the store (rediss:// or etcds:// for TLS)"
    )


def check_hostport(value: str, what: str = "endpoint", *, allow_port_zero: bool = False) -> str:
    """``value`` if it is ``host:port`` (port 1-65535, or 0 if allowed), else DiscoveryError."""
    require_hostport(value, what, allow_port_zero=allow_port_zero, error=DiscoveryError)
    return value


async def cancel_until_done(tasks: set[asyncio.Task]) -> None:
    """Cancel ``tasks`` until they end, for 5 s at most: a store client may swallow one cancellation
    (redis-py does, when it arrives mid-command), which would leave a loop running for ever."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(20):
        if not pending:
            return
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.25)
    if pending:
        log.warning("%d discovery tasks did not stop", len(pending))
