"""etcd (v3 API through its HTTP gateway, via etcd3gw) store: real etcd leases and a prefix watch.

Keys (``{s}`` a service, ``{k}`` ``teacher`` or ``student``)::

    /distill/{s}/{k}/{id}        JSON {lease, instance, data}, attached to an etcd lease
    /distill/{s}/assignment      JSON of the assignment, written with a compare-and-swap txn

The lease id handed to clients is the etcd lease id, so any discovery server can keep it alive.
etcd TTLs are whole seconds (at least 2 with default etcd settings) and etcd checks for expired
leases every 0.5 s. etcd3gw is synchronous; its calls run in a small thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import etcd3gw
import requests
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.lease import Lease

from distill_reader.discovery.stores.base import (
    AlreadyRegistered,
    Kind,
    ServiceState,
    Store,
    StoreUnavailable,
    encode_assignment,
)

log = logging.getLogger(__name__)

_PREFIX = "/distill/"


class EtcdStore(Store):
    """State in etcd; any number of discovery servers may share it."""

    def __init__(self, host: str, port: int) -> None:
        self.url = f"etcd://{host}:{port}"
        self._host, self._port = host, port
        self._client = etcd3gw.client(host=host, port=port, timeout=2.0, api_path="/v3/")
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="etcd")
        self._watch_stop = threading.Event()
        self._responses: list[requests.Response] = []

    async def close(self) -> None:
        self._watch_stop.set()
        for resp in list(self._responses):
            resp.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, *args, **kwargs):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except (Etcd3Exception, requests.RequestException, OSError) as exc:
            raise StoreUnavailable(f"{self.url}: {exc}") from exc

    @staticmethod
    def _key(service: str, kind: str, member: str) -> str:
        return f"{_PREFIX}{service}/{kind}/{member}"

    async def _get(self, key: str) -> dict | None:
        values = await self._run(self._client.get, key)
        return json.loads(values[0]) if values else None

    async def register(self, kind: Kind, service: str, member: str, instance: str, data: dict, ttl: float) -> str:
        key = self._key(service, kind, member)
        old = await self._get(key)
        if old and old["instance"] != instance:
            raise AlreadyRegistered(member)
        lease = await self._run(self._client.lease, max(2, math.ceil(ttl)))
        value = json.dumps({"lease": str(lease.id), "instance": instance, "data": data})
        await self._run(self._client.put, key, value, lease)
        if old:  # a takeover: the old lease holds nothing now; end it rather than let it linger
            await self._run(Lease(int(old["lease"]), self._client).revoke)
        return str(lease.id)

    async def keep(
        self, kind: Kind, service: str, member: str, lease: str, ttl: float, data: dict | None = None
    ) -> bool:
        key = self._key(service, kind, member)
        old = await self._get(key)
        if not old or old["lease"] != lease:
            return False
        if await self._run(Lease(int(lease), self._client).refresh) <= 0:
            return False
        if data and any(old["data"].get(k) != v for k, v in data.items()):
            old["data"].update(data)
            await self._run(self._client.put, key, json.dumps(old), Lease(int(lease), self._client))
        return True

    async def drop(self, kind: Kind, service: str, member: str, lease: str) -> None:
        key = self._key(service, kind, member)
        old = await self._get(key)
        if old and old["lease"] == lease:
            await self._run(Lease(int(lease), self._client).revoke)  # deletes the key with it

    async def services(self) -> list[str]:
        items = await self._run(self._client.get_prefix, _PREFIX)
        return sorted({meta["key"].decode()[len(_PREFIX) :].split("/", 1)[0] for _, meta in items})

    async def read(self, service: str) -> ServiceState:
        prefix = f"{_PREFIX}{service}/"
        state = ServiceState()
        for value, meta in await self._run(self._client.get_prefix, prefix):
            rest = meta["key"].decode()[len(prefix) :]
            if rest == "assignment":
                state.version = value.decode()
                state.assignment = json.loads(value)
                continue
            kind, _, member = rest.partition("/")
            record = json.loads(value)["data"]
            if kind == "teacher":
                state.teachers[member] = record
            elif kind == "student":
                state.students[member] = record
        return state

    async def write_assignment(self, service: str, version: str | None, assignment: dict) -> bool:
        key = f"{_PREFIX}{service}/assignment"
        new = encode_assignment(assignment)
        if version is None:
            return bool(await self._run(self._client.create, key, new))
        return bool(await self._run(self._client.replace, key, version, new))

    def _watch(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Thread: stream the prefix watch; put service names, then an exception when it ends."""
        end: BaseException = StoreUnavailable(f"{self.url}: watch ended")
        try:
            client = etcd3gw.client(host=self._host, port=self._port, api_path="/v3/")
            start = {
                "key": etcd3gw.utils._encode(_PREFIX),
                "range_end": etcd3gw.utils._encode(etcd3gw.utils._increment_last_byte(_PREFIX)),
            }
            resp = client.session.post(
                client.get_url("/watch"), json={"create_request": start}, stream=True, timeout=(2.0, None)
            )
            self._responses.append(resp)
            for line in resp.iter_lines(chunk_size=None):
                if self._watch_stop.is_set():
                    return
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    loop.call_soon_threadsafe(queue.put_nowait, None)
                for event in result.get("events", []):
                    key = etcd3gw.utils._decode(event["kv"]["key"]).decode()
                    loop.call_soon_threadsafe(queue.put_nowait, key[len(_PREFIX) :].split("/", 1)[0])
        except Exception as exc:  # connection lost: report it; the service re-watches
            end = StoreUnavailable(f"{self.url}: watch failed: {exc}")
        finally:
            if not self._watch_stop.is_set():
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(queue.put_nowait, end)

    async def changes(self) -> AsyncIterator[str | None]:
        queue: asyncio.Queue = asyncio.Queue()
        thread = threading.Thread(
            target=self._watch, args=(asyncio.get_running_loop(), queue), name="etcd-watch", daemon=True
        )
        thread.start()
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
