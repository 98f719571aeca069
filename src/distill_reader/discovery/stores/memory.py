"""The embedded store: everything in this process (one discovery server, state lost on exit)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from distill_reader.discovery.stores.base import (
    AlreadyRegistered,
    Kind,
    ServiceState,
    Store,
    encode_assignment,
)

_SWEEP_S = 0.05  # how often expired leases are removed; small next to the 2 s TTL


class MemoryStore(Store):
    """Dicts and a sweeper task; change notifications go to in-process queues."""

    url = "memory"

    def __init__(self) -> None:
        # (kind, service) -> member -> (lease, instance, data, deadline)
        self._members: dict[tuple[str, str], dict[str, tuple[str, str, dict, float]]] = {}
        self._assignments: dict[str, str] = {}
        self._queues: list[asyncio.Queue[str | None]] = []
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for q in self._queues:
            q.put_nowait(StopAsyncIteration)  # type: ignore[arg-type]

    def _notify(self, service: str) -> None:
        for q in self._queues:
            q.put_nowait(service)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for (_, service), members in self._members.items():
                dead = [m for m, (_, _, _, deadline) in members.items() if deadline <= now]
                for m in dead:
                    del members[m]
                if dead:
                    self._notify(service)

    async def register(self, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float) -> str:
        members = self._members.setdefault((kind, service), {})
        old = members.get(member)
        if old and old[3] > time.monotonic() and old[1] != instance:
            raise AlreadyRegistered(member)
        lease = uuid.uuid4().hex
        members[member] = (lease, instance, dict(data), time.monotonic() + ttl)
        self._notify(service)
        return lease

    async def keep(
        self, kind: Kind, service: str, member: str, lease: str, ttl: float, data: dict | None = None
    ) -> bool:
        members = self._members.get((kind, service), {})
        old = members.get(member)
        if not old or old[0] != lease or old[3] <= time.monotonic():
            return False
        # Keep-alives carry only what changes (readiness): merge, as the Redis and etcd stores do.
        merged = {**old[2], **data} if data is not None else old[2]
        members[member] = (lease, old[1], merged, time.monotonic() + ttl)
        if merged != old[2]:
            self._notify(service)
        return True

    async def drop(self, kind: Kind, service: str, member: str, lease: str) -> None:
        members = self._members.get((kind, service), {})
        if member in members and members[member][0] == lease:
            del members[member]
            self._notify(service)

    async def services(self) -> list[str]:
        names = {s for (_, s), members in self._members.items() if members}
        return sorted(names | set(self._assignments))

    async def read(self, service: str) -> ServiceState:
        import json

        now = time.monotonic()

        def live(kind: str) -> dict[str, dict]:
            members = self._members.get((kind, service), {})
            return {m: dict(v[2]) for m, v in members.items() if v[3] > now}

        version = self._assignments.get(service)
        return ServiceState(live("teacher"), live("student"), json.loads(version) if version else {}, version)

    async def write_assignment(self, service: str, version: str | None, assignment: dict) -> bool:
        if self._assignments.get(service) != version:
            return False
        self._assignments[service] = encode_assignment(assignment)
        self._notify(service)
        return True

    async def changes(self) -> AsyncIterator[str | None]:
        q: asyncio.Queue[str | None] = asyncio.Queue()
        self._queues.append(q)
        try:
            while True:
                item = await q.get()
                if item is StopAsyncIteration:
                    return
                yield item
        finally:
            self._queues.remove(q)
