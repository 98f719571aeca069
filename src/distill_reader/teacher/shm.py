"""The shared-memory transport: OIP over gRPC with the system shared-memory extension.

A teacher on this host that announces ``system_shared_memory`` in its server metadata maps the
reader's whole batch pool once (``SystemSharedMemoryRegister``), and an *output ring* of the
transport's own; each request then carries only ``shared_memory_region``/``_offset``/``_byte_size``
parameters on its inputs and requested outputs: the teacher reads the rows from the pool and writes
its answer into one entry of the ring, which the reader checks and copies into the rows' slot (one
memcpy) if the slot still holds that batch. No tensor is serialized on either side.

Why not write into the slot itself: a request that timed out or was cancelled may still be computed
by its teacher (Triton does not stop), which would write its answer whenever it is done, possibly
into a slot reused for another batch since. So no teacher is ever told an offset in the pool to
write to: an entry whose request did not end with an answer is *retired*, never lent again; when a
ring has no free entry left, a fresh ring is registered and the old one is unregistered (and
unmapped here) once no request that can still succeed uses it.

The pool has no name (see :mod:`distill_reader.reader.pool`); it gets one when the first teacher
registers, unlinked as soon as every teacher known by then has made its registration call (one
round trip each): a name never outlives the registration calls in ``/dev/shm``, whatever kills the
reader afterwards. Linux can name such a file only once, so a teacher that registers later
(discovery adds it, or it restarted) maps a fresh *mirror* of the pool instead, with the same
layout, named for its own registration call only: the reader copies each request's rows into the
mirror (one more memcpy, no serialization). An output ring is named the same way. See
docs/transports.md.

A request the extension cannot express goes over plain gRPC (counted in :attr:`fallbacks`): rows
that are not contiguous in the pool (grouped by length) and variable vars cut shorter than
``max_length`` (the request is padded to its longest row, the pool to ``max_length``). The transport
holds the gRPC one (:class:`~distill_reader.teacher.client.TeacherClient`) for that, and its calls
share its channel; both encode through :class:`~distill_reader.teacher.codec.OipCodec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from distill_reader.errors import TeacherAuthError, TeacherMismatchError, TransientTeacherError
from distill_reader.reader.pool import SharedBuffer
from distill_reader.teacher.client import TeacherClient
from distill_reader.teacher.transport import DBatch, Transport

log = logging.getLogger(__name__)

EXTENSION = "system_shared_memory"

Request = service_pb2.ModelInferRequest


def _split_host(endpoint: str) -> str:
    host = endpoint.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _is_local_address(address: str) -> bool:
    """Loopback, or an address of one of this host's interfaces (it can be bound to)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


async def is_local_endpoint(endpoint: str, timeout: float) -> bool:
    """Whether ``host:port`` names this host (every address it resolves to is local)."""
    host = _split_host(endpoint)
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout
        )
    except (OSError, asyncio.TimeoutError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(_is_local_address(a) for a in addresses)


def _region_parameters(request_tensor, region: str, offset: int, nbytes: int) -> None:
    params = request_tensor.parameters
    params["shared_memory_region"].string_param = region
    params["shared_memory_offset"].int64_param = offset
    params["shared_memory_byte_size"].int64_param = nbytes


def _register_request(name: str, key: str, nbytes: int) -> service_pb2.SystemSharedMemoryRegisterRequest:
    return service_pb2.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=0, byte_size=nbytes)


def _region_name() -> str:
    return f"distill-reader-{os.getpid()}-{secrets.token_hex(6)}"


class _OutputRing:
    """A registered output region: ``entries`` entries of ``entry_nbytes``, each the outputs of one
    request of up to ``rows`` rows (every fetch var at ``max_length``, 64-byte aligned)."""

    def __init__(self, name: str, buffer: SharedBuffer, entry_nbytes: int, entries: int) -> None:
        self.name = name
        self.buffer = buffer  # our mapping; dropped (unmapped) with the ring
        self.memory = np.frombuffer(buffer.mmap, dtype=np.uint8)
        self.entry_nbytes = entry_nbytes
        self.free = list(range(entries - 1, -1, -1))
        self.live = 0  # entries lent to requests in flight
        self.retired = 0  # entries a teacher may still write into: never lent again


class SharedMemoryTransport(Transport):
    """Sends offsets into the registered pool instead of tensors when the teacher is on this host and
    announces the extension (``required``: it must, or the teacher is quarantined naming ``[conf]
    shared_memory``); otherwise, and for a request the extension cannot express, the gRPC transport
    ``grpc`` it holds (its channel carries this transport's calls too; closed with it)."""

    def __init__(
        self, grpc: TeacherClient, pool: SharedBuffer, *, rows: int, in_flight: int = 4, required: bool = False
    ) -> None:
        """``rows``: rows of a request at most (a larger one goes over gRPC); ``in_flight``: requests
        in flight at most; the output ring has ``2 × in_flight`` entries of ``rows`` rows each."""
        self._grpc = grpc
        self._codec = grpc.codec
        self.endpoint = grpc.endpoint
        self.request_timeout = grpc.request_timeout
        self._stub = grpc.stub
        self._metadata = grpc.call_metadata
        self._pool = pool
        self._entry_rows = max(1, rows)
        self._entries = 2 * max(1, in_flight)
        #: per fetch var, its offset in an entry (the vars of a d_batch, each at max_length)
        self._entry_offsets, offset = [], 0
        for spec in self._codec.pooled_outputs:
            self._entry_offsets.append(offset)
            offset += -(-spec.sample_nbytes * self._entry_rows // 64) * 64
        self._entry_nbytes = max(offset, 64)
        #: the ring new requests take entries from; replaced ones live on until their last request ends
        self._ring: _OutputRing | None = None
        self._rings: dict[str, _OutputRing] = {}  # every ring registered with the teacher
        self.rings_replaced = 0  # rings given up because timed-out requests retired their entries
        self._tasks: set[asyncio.Task] = set()
        self._required = required
        #: the name the teacher knows the pool by; None: requests go over plain gRPC
        self.region: str | None = None
        self.why_not = "not checked yet"
        self.in_place = 0  # requests answered through the pool
        self.fallbacks = 0  # requests on a registered region sent over plain gRPC (see the module docstring)
        #: the bytes of the mirror the teacher maps instead of the pool (None: the pool itself)
        self._mirror: np.ndarray | None = None
        self._lock = asyncio.Lock()
        self._lost = False  # the teacher answered that it does not know our region
        self._expected = True  # the factory counted this transport's first registration
        pool.expect_registration()

    async def check_metadata(self) -> bool:
        try:
            declares = await self._grpc.check_metadata()
        except BaseException:
            self._registration_done()  # no registration this time: keep no name for it
            raise
        async with self._lock:
            await self._register()  # checked again (e.g. the teacher restarted): register afresh
        return declares

    def _registration_done(self) -> None:
        if self._expected:
            self._expected = False
            self._pool.registration_done()

    async def _register(self) -> None:
        """Register the pool (or a mirror) anew, the previous registration unregistered first
        (callers hold ``_lock``)."""
        self._lost = False
        await self._unregister()
        if not self._expected:  # a later registration: the name is kept for it if it still exists
            self._pool.expect_registration()
            self._expected = True
        try:
            await self._try_register()
        finally:
            self._registration_done()

    async def _try_register(self) -> None:
        reason = await self._unusable()
        if reason is None:
            try:
                await self._register_memory()
                return
            except OSError as exc:
                reason = f"the batch pool cannot be given a name ({exc})"
            except grpc.aio.AioRpcError as exc:  # e.g. PyTriton restricts the extension by default
                reason = f"it cannot map the batch pool ({exc.code().name}: {exc.details()})"
        if self._required:
            raise TeacherMismatchError(f"teacher {self.endpoint}: [conf] shared_memory is 'on' but {reason}")
        if reason != self.why_not:
            log.info("teacher %s: tensors over gRPC, not shared memory: %s", self.endpoint, reason)
        self.why_not = reason

    async def _register_memory(self) -> None:
        """Register the pool itself while it can be named; after its naming window, a fresh mirror
        of it (same layout and offsets; rows copied in and answers copied out), named for this one
        registration call."""
        pool = self._pool
        memory = pool if pool.nameable else SharedBuffer.create(pool.nbytes)
        if memory is not pool:
            memory.expect_registration()
        name = _region_name()
        try:
            await self._stub.SystemSharedMemoryRegister(
                _register_request(name, memory.key(), pool.nbytes),
                timeout=self.request_timeout,
                metadata=self._metadata,
            )
        finally:
            if memory is not pool:
                memory.registration_done()
                memory.close_fd()  # mapped by both sides: the descriptor is not needed
        try:
            self._ring = await self._new_ring()
        except BaseException:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._unregister_name(name)
            raise
        self.region = name
        self._mirror = None if memory is pool else np.frombuffer(memory.mmap, dtype=np.uint8)
        self.why_not = ""
        what = "the batch pool" if memory is pool else "a mirror of the batch pool (registered after its naming window)"
        log.info("teacher %s: shared memory region %s registered: %s, %d bytes", self.endpoint, name, what, pool.nbytes)

    async def _new_ring(self) -> _OutputRing:
        """A fresh output ring registered with the teacher (named for that one call, like a mirror)."""
        buffer = SharedBuffer.create(self._entry_nbytes * self._entries)
        buffer.expect_registration()
        name = _region_name()
        try:
            await self._stub.SystemSharedMemoryRegister(
                _register_request(name, buffer.key(), buffer.nbytes),
                timeout=self.request_timeout,
                metadata=self._metadata,
            )
        finally:
            buffer.registration_done()
            buffer.close_fd()
        ring = self._rings[name] = _OutputRing(name, buffer, self._entry_nbytes, self._entries)
        return ring

    async def _replace_ring(self, old: _OutputRing) -> None:
        """Register a fresh ring in place of ``old``, whose free entries ran out (callers hold ``_lock``)."""
        self._ring = await self._new_ring()
        self.rings_replaced += 1
        log.info(
            "teacher %s: output region %s replaced by %s (%d entries retired by requests that timed out or "
            "were cancelled)",
            self.endpoint,
            old.name,
            self._ring.name,
            old.retired,
        )
        if old.live == 0:
            await self._drop_ring(old)

    async def _drop_ring(self, ring: _OutputRing) -> None:
        """Unregister a ring no request that can still succeed uses; our mapping goes with the object."""
        if self._rings.pop(ring.name, None) is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._unregister_name(ring.name)

    def _take_entry(self) -> tuple[_OutputRing, int] | None:
        ring = self._ring
        if ring is None or not ring.free:
            return None
        ring.live += 1
        return ring, ring.free.pop()

    def _give_back(self, ring: _OutputRing, entry: int, answered: bool) -> None:
        """An entry's request ended: free again if the teacher answered, retired if it may still
        write into it (timed out, cancelled, or any failure whose end we did not see)."""
        ring.live -= 1
        if answered:
            ring.free.append(entry)
        else:
            ring.retired += 1
        if ring is not self._ring and ring.live == 0 and ring.name in self._rings:
            task = asyncio.get_running_loop().create_task(self._drop_ring(ring))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unusable(self) -> str | None:
        """Why the teacher cannot use the pool (None: it can, as far as one can tell before registering)."""
        if not await is_local_endpoint(self.endpoint, self.request_timeout):
            return "it is not on this host"
        try:
            meta = await self._stub.ServerMetadata(
                service_pb2.ServerMetadataRequest(), timeout=self.request_timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            error = self._grpc.error(exc, "cannot read the server metadata of")
            if isinstance(error, (TransientTeacherError, TeacherAuthError)):
                raise error from None
            # e.g. UNIMPLEMENTED: a minimal OIP server serves models without the server calls
            return f"its server metadata cannot be read ({exc.code().name})"
        if EXTENSION not in meta.extensions:
            return f"its server metadata does not announce the {EXTENSION} extension"
        return None

    async def _unregister(self) -> None:
        """Unregister the pool (or mirror) and every ring (a request in flight on one fails, or
        writes into memory the teacher keeps mapped until it is done: never into the pool)."""
        region, self.region = self.region, None
        self._ring = None
        names = ([region] if region is not None else []) + list(self._rings)
        self._rings.clear()
        for name in names:
            with contextlib.suppress(grpc.aio.AioRpcError):  # a teacher that is gone has nothing registered
                await self._unregister_name(name)

    async def _unregister_name(self, name: str) -> None:
        await self._stub.SystemSharedMemoryUnregister(
            service_pb2.SystemSharedMemoryUnregisterRequest(name=name),
            timeout=min(self.request_timeout, 5.0),
            metadata=self._metadata,
        )

    async def close(self) -> None:
        if self.in_place or self.fallbacks:
            log.info(
                "teacher %s: %d requests through shared memory, %d over gRPC (rows a region cannot express)",
                self.endpoint,
                self.in_place,
                self.fallbacks,
            )
        self._registration_done()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(Exception):
            await self._unregister()
        await self._grpc.close()

    async def infer(self, batch: DBatch) -> list[np.ndarray] | None:
        if self._lost:  # the teacher restarted since it registered: register again, once
            async with self._lock:
                if self._lost:
                    self._lost = False
                    await self._register()
        ring = self._ring
        if ring is not None and not ring.free and ring.retired:  # timed-out requests used it up
            async with self._lock:
                try:
                    if self._ring is ring:
                        await self._replace_ring(ring)
                except (grpc.aio.AioRpcError, OSError) as exc:  # this request goes over gRPC; the next tries again
                    log.warning("teacher %s: cannot register a fresh output region: %s", self.endpoint, exc)
        region, mirror = self.region, self._mirror
        placed = self._request(batch, region) if region is not None else None
        taken = self._take_entry() if placed is not None else None
        if taken is None:
            if region is not None:
                self.fallbacks += 1
            return await self._grpc.infer(batch)
        request, inputs = placed
        ring, entry = taken
        views = self._place_outputs(request, batch, ring, entry)
        if mirror is not None:
            for offset, array in inputs:
                mirror[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        answered = False
        try:
            response = await self._grpc.send(request.SerializeToString())
            answered = True
            self._codec.check_in_place(response, views, batch.inputs, batch.lengths)
            if batch.live():  # the slot still holds this batch (no await since): one memcpy per var
                for dst, view in zip(batch.outputs, views):
                    dst[...] = view
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if region in details or ring.name in details:
                # The teacher does not know the region: it restarted (the next request registers
                # again), or this request raced a new registration. Not the request's fault.
                if self.region == region:
                    self.region = None
                    self._lost = True
                raise TransientTeacherError(f"teacher {self.endpoint} lost the shared memory region {region}") from None
            raise self._grpc.error(exc, "a request to") from None
        finally:
            self._give_back(ring, entry, answered)
        self.in_place += 1
        return None

    def _request(self, batch: DBatch, region: str) -> tuple[Request, list[tuple[int, np.ndarray]]] | None:
        """The request with every input by region, and the (offset, array) of its inputs; None when
        the extension cannot express it (outputs: :meth:`_place_outputs`)."""
        codec = self._codec
        if len(batch.outputs) != len(codec.outputs) or batch.count > self._entry_rows:
            return None
        # The answer is copied into the slot as is: it must have the slot rows' shape.
        if any(dst.shape != shape for dst, shape in zip(batch.outputs, codec.output_shapes(batch.inputs))):
            return None
        request = Request(model_name=codec.model_name)
        inputs = []
        for name, datatype, array in codec.input_tensors(batch.inputs, batch.lengths):
            offset = self._pool.offset_of(array)
            if offset is None:
                return None
            tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            _region_parameters(tensor, region, offset, array.nbytes)
            inputs.append((offset, array))
        return request, inputs

    def _place_outputs(self, request: Request, batch: DBatch, ring: _OutputRing, entry: int) -> list[np.ndarray]:
        """Ask for every output in ``entry`` of ``ring``; the views of the entry they will be in."""
        views = []
        base = entry * ring.entry_nbytes
        for (name, _), dst, offset in zip(self._codec.outputs, batch.outputs, self._entry_offsets):
            start = base + offset
            views.append(ring.memory[start : start + dst.nbytes].view(dst.dtype).reshape(dst.shape))
            _region_parameters(request.outputs.add(name=name), ring.name, start, dst.nbytes)
        return views
