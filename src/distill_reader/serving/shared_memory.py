"""The teacher server's side of the OIP system shared-memory extension (Triton's semantics).

A client on the same host registers a region (``SystemSharedMemoryRegister``: a name of its
choice, the ``shm_open`` key of a file in ``/dev/shm``, an offset and a byte size); the server maps
it at once, so the client may unlink the key right after the call. Requests then name the region,
an offset and a byte size for an input (read from it) or a requested output (written into it).

Safety: keys are plain names in ``/dev/shm`` (no ``/`` or ``..``, no symlinks followed, regular
files only); every offset and size is checked against the registered range before any byte is
read or written (:class:`RegionError`: INVALID_ARGUMENT); a region unregistered while a request
still uses it stays mapped until that request is done (the mapping is released by the last view
of it), so unregistering never crashes a request in flight.

Clients that die without unregistering (a reader killed with SIGKILL) would leave their regions
mapped for good, and with enough of them fill the table for every later client. So a region no
request has used for :data:`REGION_IDLE_S` is forgotten at the next registration; a live client
whose region was forgotten this way gets "unknown shared memory region" and registers again (the
reader's shared-memory transport does, on its next request).
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2

from distill_reader.errors import RegionError, RegionExists, RegionsFull

SHM_DIR = "/dev/shm"
MAX_REGIONS = 256  # registrations a server keeps at once; more is RESOURCE_EXHAUSTED
REGION_IDLE_S = 300.0  # a region unused this long is forgotten at the next registration
_KEY_RE = re.compile(r"^/?[A-Za-z0-9_.\-]{1,200}$")

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    memory: np.ndarray  # uint8 view of the registered bytes


@dataclass(frozen=True)
class Placement:
    """Where a tensor lies: a registered region and a checked byte range in it."""

    region: Region
    offset: int
    byte_size: int

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``dtype[shape]`` over its bytes (a view into the region, no copy)."""
        return self.region.memory[self.offset : self.offset + self.byte_size].view(dtype).reshape(shape)


def _int_param(params: Mapping, key: str, default: int | None = None) -> int:
    if key not in params:
        if default is None:
            raise RegionError(f"parameter {key!r} missing")
        return default
    param = params[key]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise RegionError(f"parameter {key!r} must be an integer, got {kind}")
    return int(getattr(param, kind))


class SharedMemoryRegions:
    """The regions registered with one server, by name."""

    def __init__(self, shm_dir: str = SHM_DIR, idle_s: float | None = None) -> None:
        self._dir = shm_dir
        self._idle_s = REGION_IDLE_S if idle_s is None else idle_s
        self._regions: dict[str, Region] = {}
        self._used: dict[str, float] = {}  # name -> when it was registered or last used

    def _forget_idle(self) -> None:
        """Forget the regions no request used for ``idle_s`` (their clients are likely gone)."""
        horizon = time.monotonic() - self._idle_s
        for name in [name for name, used in self._used.items() if used < horizon]:
            self.unregister(name)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Map ``byte_size`` bytes at ``offset`` of the file ``key``; RegionError saying why not."""
        if not name:
            raise RegionError("a shared memory region needs a name")
        self._forget_idle()
        if name in self._regions:
            raise RegionExists(f"shared memory region {name!r} is already registered")
        if len(self._regions) >= MAX_REGIONS:
            raise RegionsFull(f"{MAX_REGIONS} shared memory regions are registered already; unregister some")
        if not _KEY_RE.match(key) or key.strip("/") in (".", ".."):
            raise RegionError(f"shared memory key {key!r} is not the name of a file in {self._dir}")
        if offset < 0 or byte_size <= 0:
            raise RegionError(
                f"shared memory region {name!r}: offset {offset} and byte_size {byte_size} must be >= 0 and > 0"
            )
        path = os.path.join(self._dir, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(f"cannot open shared memory key {key!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RegionError(f"shared memory key {key!r} is not a regular file")
            if offset + byte_size > info.st_size:
                raise RegionError(
                    f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is past the end of "
                    f"{key!r} ({info.st_size} bytes)"
                )
            mapped = mmap.mmap(fd, offset + byte_size)
        finally:
            os.close(fd)
        memory = np.frombuffer(mapped, dtype=np.uint8)[offset:]
        region = self._regions[name] = Region(name, key, offset, byte_size, memory)
        self._used[name] = time.monotonic()
        return region

    def unregister(self, name: str = "") -> None:
        """Forget ``name`` (every region when empty). Views in use keep the mapping alive."""
        if name:
            self._regions.pop(name, None)
            self._used.pop(name, None)
        else:
            self._regions.clear()
            self._used.clear()

    def status(self, name: str = "") -> service_pb2.SystemSharedMemoryStatusResponse:
        """Triton's status answer for ``name`` (every region when empty); KeyError if unknown."""
        regions = [self._regions[name]] if name else list(self._regions.values())
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for region in regions:
            status = response.regions[region.name]
            status.name, status.key, status.offset, status.byte_size = (
                region.name,
                region.key,
                region.offset,
                region.byte_size,
            )
        return response

    def placement(self, what: str, params: Mapping, nbytes: int | None) -> Placement | None:
        """The checked region range a tensor's parameters name (None without ``shared_memory_region``).

        ``nbytes``: the size the tensor has (an input; byte_size must equal it), or None (an output:
        its size is known after inference, see :meth:`check_fits`)."""
        if REGION not in params:
            return None
        if params[REGION].WhichOneof("parameter_choice") != "string_param":
            raise RegionError(f"{what}: parameter {REGION!r} must be a string")
        name = params[REGION].string_param
        region = self._regions.get(name)
        if region is None:
            raise RegionError(f"{what}: unknown shared memory region {name!r}; register it first")
        self._used[name] = time.monotonic()
        offset = _int_param(params, OFFSET, 0)
        byte_size = _int_param(params, BYTE_SIZE)
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise RegionError(
                f"{what}: offset {offset} and byte_size {byte_size} are outside shared memory region {name!r} "
                f"({region.byte_size} bytes)"
            )
        if nbytes is not None and byte_size != nbytes:
            raise RegionError(f"{what}: byte_size {byte_size} in region {name!r}, but the tensor has {nbytes} bytes")
        return Placement(region, offset, byte_size)

    def __len__(self) -> int:
        return len(self._regions)
