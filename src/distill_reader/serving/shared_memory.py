"""The teacher server's side of the OIP system shared-memory extension (Triton's semantics).

A client on the same host registers a region (``SystemSharedMemoryRegister``: a name of its
choice, the ``shm_open`` key of a file in ``/dev/shm``, an offset and a byte size); the server opens
the file at once and keeps it open, so the client may unlink the key right after the call (the
region is the file that was registered, not its name: a file created later under the same name is
never read or written). Requests then name the region, an offset and a byte size for an input (read
from it) or a requested output (written into it).

No client can make the server fault. The server never maps a region: a client may truncate its
file at any moment, and a mapping touched past the file's new end kills the process with SIGBUS
(every student of the teacher would lose it). It copies with system calls on the descriptor instead:
``preadv`` for an input (past the end of the file it returns short: "region shrank",
:class:`RegionError`) and ``pwrite`` for an output (refused when the file no longer reaches the
output's end; a truncation that races the write can only make the write extend the file again up
to the registered end, never fault). That is one copy of each input, where a mapped view had none;
outputs were copied before too (docs/transports.md measures it). Zero-copy would need a file that
cannot shrink: Linux seals only ``memfd_create`` files against it (``F_SEAL_SHRINK``), every file in
``/dev/shm`` carries ``F_SEAL_SEAL`` (no seal can be added) and a memfd cannot be linked there
(``EXDEV``), so no key can name one.

Other safety: keys are plain names in ``/dev/shm`` (no ``/`` or ``..``, no symlinks followed,
regular files only); every offset and size is checked against the registered range before any byte
is read or written (:class:`RegionError`: INVALID_ARGUMENT); a region unregistered while a request
still uses it keeps its descriptor open until that request is done (closed with the last reference
to it), so unregistering never makes a request read or write through a descriptor number reused by
another file.

Clients that die without unregistering (a reader killed with SIGKILL) would leave their regions
open for good, and with enough of them fill the table for every later client. So a region no
request has used for :data:`REGION_IDLE_S` is forgotten at the next registration; a live client
whose region was forgotten this way gets "unknown shared memory region" and registers again (the
reader's shared-memory transport does, on its next request).
"""

from __future__ import annotations

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


class _File:
    """A registered file's descriptor, closed when the last reference goes (the region's, and
    those of the requests that use it): never while a request may still read or write through it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int  # of the region in its file
    byte_size: int
    file: _File  # the file registered, open for reading and writing


@dataclass(frozen=True)
class Placement:
    """Where a tensor lies: a registered region and a checked byte range in it."""

    region: Region
    offset: int
    byte_size: int

    def _shrank(self, what: str, nbytes: int) -> RegionError:
        region = self.region
        try:
            size = f"{os.fstat(region.file.fd).st_size} bytes"
        except OSError as exc:  # pragma: no cover - an open descriptor can be stat'ed
            size = exc.strerror
        start = region.offset + self.offset
        return RegionError(
            f"{what}: shared memory region {region.name!r} shrank: its file {region.key!r} has {size} now, the "
            f"tensor's bytes are {start}..{start + nbytes} of it"
        )

    def read(self, what: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the tensor ``dtype[shape]`` in its bytes (``preadv``: never a fault, whatever
        the client did to its file); RegionError when the file no longer holds them all."""
        array = np.empty(shape, dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        position, done, fd = self.region.offset + self.offset, 0, self.region.file.fd
        while done < len(buffer):
            try:
                got = os.preadv(fd, [buffer[done:]], position + done)
            except OSError as exc:
                raise RegionError(
                    f"{what}: cannot read shared memory region {self.region.name!r}: {exc.strerror}"
                ) from None
            if got == 0:
                raise self._shrank(what, len(buffer))
            done += got
        return array

    def write(self, what: str, array: np.ndarray) -> None:
        """Write ``array``'s bytes (C order) at the start of the range (``pwrite``: never a fault);
        RegionError when the file no longer reaches their end (it is not grown back)."""
        buffer = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        position, done, fd = self.region.offset + self.offset, 0, self.region.file.fd
        try:
            if os.fstat(fd).st_size < position + len(buffer):
                raise self._shrank(what, len(buffer))
            while done < len(buffer):
                done += os.pwrite(fd, buffer[done:], position + done)
        except OSError as exc:
            raise RegionError(
                f"{what}: cannot write shared memory region {self.region.name!r}: {exc.strerror}"
            ) from None


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
        """Open the file ``key`` for ``byte_size`` bytes at ``offset``; RegionError saying why not."""
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
            # O_NONBLOCK: a FIFO put there must not block the server (refused below, not regular)
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise RegionError(f"cannot open shared memory key {key!r}: {exc.strerror}") from None
        file = _File(fd)  # closes it when dropped, here on an error
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RegionError(f"shared memory key {key!r} is not a regular file")
        if offset + byte_size > info.st_size:
            raise RegionError(
                f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is past the end of "
                f"{key!r} ({info.st_size} bytes)"
            )
        region = self._regions[name] = Region(name, key, offset, byte_size, file)
        self._used[name] = time.monotonic()
        return region

    def unregister(self, name: str = "") -> None:
        """Forget ``name`` (every region when empty). Requests in flight keep its file open."""
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
