"""The embedded store: everything in this process (one discovery server, state lost on exit)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
import uuid
from collections.abc import AsyncIterator

from distill_reader.discovery.stores.base import Kind, ServiceState, Store, new_join_id
from distill_reader.errors import AlreadyRegistered

_SWEEP_S = 0.05  # how often expired leases are removed; small next to the 2 s TTL
_STALL_S = 0.5  # a sweep this much late means the process itself was stalled

Key = tuple[str, str, str]  # (kind, service, member)


class MemoryStore(Store):
    """Dicts and a sweeper task; change notifications go to in-process queues.

    Members of a group (a discovery server's students) have no deadline of their own: the group's
    deadline is theirs, so keeping them all is one dict update. A lease ends when the sweeper
    removes it; after a stall of this process it first gives every lease the stalled time back.
    The sweeper looks only at the leases due: a heap holds each deadline set (a kept lease's old
    entry is skipped when it comes up), so 10,000 students cost a sweep nothing.
    """

    url = "memory"

    def __init__(self) -> None:
        # (kind, service) -> member -> (lease, instance, data, deadline); a group member's deadline is inf
        self._members: dict[tuple[str, str], dict[str, tuple[str, str, dict, float]]] = {}
        self._groups: dict[str, float] = {}  # group -> deadline
        # (deadline, kind, service, member) for every finite deadline set, earliest first
        self._deadlines: list[tuple[float, str, str, str]] = []
        self._group_members: dict[str, dict[Key, str]] = {}  # group -> member -> lease
        self._lapsed: dict[str, list[Key]] = {}  # group -> members it lost, until keep_group reports them
        self._assignments: dict[str, dict[str, list[str]]] = {}
        self._versions: dict[str, int] = {}
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
        last = time.monotonic()
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            stall = now - last - _SWEEP_S
            last = now
            if stall > _STALL_S:
                # This process did not run for a while (its host was overloaded): the keep-alives
                # that came meanwhile still wait in its sockets. Give every lease that time back
                # rather than expire leases whose holders did keep them (as etcd does after an
                # election).
                self._extend(stall)
            self._expire(now)

    def _extend(self, seconds: float) -> None:
        for members in self._members.values():
            for m, (lease, instance, data, deadline) in list(members.items()):
                members[m] = (lease, instance, data, deadline + seconds)
        for group in self._groups:
            self._groups[group] += seconds
        # The same shift for every entry: still a heap, and each entry still equals its lease's deadline.
        self._deadlines = [(deadline + seconds, *rest) for deadline, *rest in self._deadlines]

    def _set_deadline(self, kind: str, service: str, member: str, deadline: float) -> None:
        heapq.heappush(self._deadlines, (deadline, kind, service, member))

    def _expire(self, now: float) -> None:
        for group in [g for g, deadline in self._groups.items() if deadline <= now]:
            self._lose_group(group)
        services = set()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, kind, service, member = heapq.heappop(heap)
            members = self._members.get((kind, service), {})
            old = members.get(member)
            # Gone already, or kept or taken again since (a later entry holds its deadline): skip.
            if old and old[3] <= now:
                del members[member]
                services.add(service)
        for service in sorted(services):
            self._notify(service)

    def _lose_group(self, group: str) -> None:
        """The group lapsed: its members go, and keep_group will report them."""
        del self._groups[group]
        lost = self._group_members.pop(group, {})
        services = set()
        for (kind, service, member), lease in lost.items():
            members = self._members.get((kind, service), {})
            if member in members and members[member][0] == lease:
                del members[member]
                services.add(service)
        self._lapsed.setdefault(group, []).extend(lost)
        for service in sorted(services):
            self._notify(service)

    def _check_free(self, members: dict, member: str, instance: str) -> None:
        old = members.get(member)
        if old and old[3] > time.monotonic() and old[1] != instance:
            raise AlreadyRegistered(member)

    async def register(self, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float) -> str:
        members = self._members.setdefault((kind, service), {})
        self._check_free(members, member, instance)
        lease = uuid.uuid4().hex
        deadline = time.monotonic() + ttl
        members[member] = (lease, instance, dict(data), deadline)
        self._set_deadline(kind, service, member, deadline)
        self._notify(service)
        return lease

    async def keep(
        self, kind: Kind, service: str, member: str, lease: str, ttl: float, data: dict | None = None
    ) -> bool:
        members = self._members.get((kind, service), {})
        old = members.get(member)
        # A lease ends when the sweeper removes it (not at its deadline): after a stall of this
        # process, the sweeper first gives the leases the stalled time back.
        if not old or old[0] != lease:
            return False
        # Keep-alives carry only what changes (readiness): merge, as the Redis and etcd stores do.
        merged = {**old[2], **data} if data is not None else old[2]
        if math.isinf(old[3]):
            deadline = old[3]
        else:
            deadline = time.monotonic() + ttl
            self._set_deadline(kind, service, member, deadline)
        members[member] = (lease, old[1], merged, deadline)
        if merged != old[2]:
            self._notify(service)
        return True

    async def drop(self, kind: Kind, service: str, member: str, lease: str) -> None:
        members = self._members.get((kind, service), {})
        if member in members and members[member][0] == lease:
            del members[member]
            self._notify(service)

    async def expire_silent(self, kind: Kind, service: str, member: str, lease: str, ttl: float, silence: float) -> str:
        members = self._members.get((kind, service), {})
        old = members.get(member)
        if not old or old[0] != lease:
            return "gone"
        if old[3] - time.monotonic() > ttl - silence:  # kept less than ``silence`` ago
            return "kept"
        del members[member]
        self._notify(service)
        return "ended"

    async def join(
        self, group: str, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float
    ) -> str:
        members = self._members.setdefault((kind, service), {})
        self._check_free(members, member, instance)
        if group not in self._groups:
            self._groups[group] = time.monotonic() + ttl
        lease = new_join_id()
        members[member] = (lease, instance, dict(data), math.inf)
        self._group_members.setdefault(group, {})[(kind, service, member)] = lease
        self._notify(service)
        return lease

    async def keep_group(self, group: str, ttl: float) -> list[tuple[str, str, str]]:
        now = time.monotonic()
        if group in self._groups and self._groups[group] <= now:
            self._lose_group(group)  # lapsed before the sweeper saw it
        if group in self._groups:
            self._groups[group] = now + ttl
        return self._lapsed.pop(group, [])

    async def leave(self, group: str, kind: Kind, service: str, member: str, lease: str) -> None:
        key = (kind, service, member)
        if self._group_members.get(group, {}).get(key) == lease:
            del self._group_members[group][key]
        await self.drop(kind, service, member, lease)

    async def services(self) -> list[str]:
        names = {s for (_, s), members in self._members.items() if members}
        return sorted(names | set(self._assignments))

    async def read(self, service: str) -> ServiceState:
        def live(kind: str) -> dict[str, dict]:
            # Present means live: the sweeper removes expired leases (see keep).
            return {m: dict(v[2]) for m, v in self._members.get((kind, service), {}).items()}

        version = self._versions.get(service)
        # The assignment's lists are never mutated (writes replace them), so a shallow copy is safe.
        assignment = dict(self._assignments.get(service, {}))
        return ServiceState(live("teacher"), live("student"), assignment, None if version is None else str(version))

    async def write_assignment(self, service: str, version: str | None, assignment: dict) -> bool:
        if self._version(service) != version:
            return False
        self._assignments[service] = {s: list(ts) for s, ts in assignment.items()}
        self._bump(service)
        return True

    async def update_assignment(
        self,
        service: str,
        version: str | None,
        assignment: dict[str, list[str]],
        changed: dict[str, list[str]],
        removed: list[str],
    ) -> bool:
        if self._version(service) != version:
            return False
        current = self._assignments.setdefault(service, {})
        for s in removed:
            current.pop(s, None)
        for s, ts in changed.items():
            current[s] = list(ts)
        self._bump(service)
        return True

    def _version(self, service: str) -> str | None:
        v = self._versions.get(service)
        return None if v is None else str(v)

    def _bump(self, service: str) -> None:
        self._versions[service] = self._versions.get(service, 0) + 1
        self._notify(service)

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
