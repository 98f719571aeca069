"""The one interface every discovery store implements, and ``--store`` URL parsing.

A store holds, per service: teacher leases, student leases and the current assignment. Leases
carry a TTL and disappear on their own when not kept; the assignment is written with
compare-and-swap so that several discovery servers on one store agree on a single history.
Everything a discovery server needs to compute an assignment is in the store, so any server
can answer any client.
"""

from __future__ import annotations

import asyncio
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from distill_reader.errors import DiscoveryError

Kind = Literal["teacher", "student"]

# Default keep_group: how many per-member keeps run at once.
_KEEP_BATCH = 64


class StoreUnavailable(Exception):
    """The store cannot be reached right now (the caller retries)."""


class AlreadyRegistered(Exception):
    """A live lease for this member is held by another instance."""


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


_STORE_HELP = "expected 'memory', 'redis://HOST:PORT[/DB]' or 'etcd://HOST:PORT'"
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def parse_store_url(url: str) -> tuple[str, str, int, int]:
    """``(scheme, host, port, db)`` of a ``--store`` value; raises DiscoveryError if malformed."""
    if url == "memory":
        return ("memory", "", 0, 0)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DiscoveryError(f"bad store URL {url!r}: {exc}; {_STORE_HELP}") from None
    if parts.scheme not in ("redis", "etcd") or not parts.hostname or port is None:
        raise DiscoveryError(f"bad store URL {url!r}; {_STORE_HELP}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise DiscoveryError(f"bad store URL {url!r}: no credentials, query or fragment; {_STORE_HELP}")
    path = parts.path.strip("/")
    db = 0
    if parts.scheme == "redis" and path:
        if not path.isdigit():
            raise DiscoveryError(f"bad store URL {url!r}: the Redis database must be a number")
        db = int(path)
    elif parts.scheme == "etcd" and path:
        raise DiscoveryError(f"bad store URL {url!r}: etcd URLs take no path")
    return (parts.scheme, parts.hostname, port, db)


def open_store(url: str) -> Store:
    """A store for a ``--store`` URL (not started yet)."""
    scheme, host, port, db = parse_store_url(url)
    if scheme == "memory":
        from distill_reader.discovery.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "redis":
        from distill_reader.discovery.stores.redis import RedisStore

        return RedisStore(host, port, db)
    from distill_reader.discovery.stores.etcd import EtcdStore

    return EtcdStore(host, port)


def check_hostport(value: str, what: str = "endpoint", *, allow_port_zero: bool = False) -> str:
    """``value`` if it is ``host:port`` (port 1-65535, or 0 if allowed), else DiscoveryError."""
    m = _HOSTPORT.match(value or "")
    low = 0 if allow_port_zero else 1
    if not m or not low <= int(m.group(2)) < 65536 or len(value) > 262:
        raise DiscoveryError(f"{what} must be HOST:PORT with a port in {low}-65535, got {value!r}")
    return value
