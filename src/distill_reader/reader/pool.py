"""The batch pool: ``capacity`` batch slots in one shared-memory buffer, laid out from the config.

Each slot holds ``batch_size`` rows of every feed var and every fetch var. The feeder writes the
user's samples into a slot (the only copy of them), the pipeline process sends the predict vars
from it and writes the teacher outputs into it, and the consumer gets numpy views of it.

The buffer is a file in ``/dev/shm`` that has no name (``O_TMPFILE``, or unlinked as soon as it is
created); the pipeline process maps it through the inherited descriptor, so nothing is left behind
however the processes end. A co-located teacher maps it by name (the OIP system shared-memory
extension): :meth:`SharedBuffer.temporary_name` gives it a name only for the moment of one
registration call, see docs/transports.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distill_reader.config import ReaderConfig
from distill_reader.errors import ConfigError
from distill_reader.oip import TensorSpec

_ALIGN = 64  # cache-line aligned arrays


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class PoolLayout:
    """Byte offsets of every var in every slot; a pure function of the config and sizes."""

    specs: tuple[TensorSpec, ...]  # feeds then fetches, the order of a yielded batch
    n_feeds: int
    batch_size: int
    capacity: int

    @property
    def var_offsets(self) -> tuple[int, ...]:
        offsets, offset = [], 0
        for spec in self.specs:
            offsets.append(offset)
            offset += _aligned(spec.sample_nbytes * self.batch_size)
        return tuple(offsets)

    @property
    def slot_nbytes(self) -> int:
        return sum(_aligned(s.sample_nbytes * self.batch_size) for s in self.specs)

    @property
    def nbytes(self) -> int:
        return max(self.slot_nbytes * self.capacity, 1)

    def slot_arrays(self, buffer: mmap.mmap | memoryview, slot: int) -> list[np.ndarray]:
        """Views ``[batch_size, *shape]`` of every var of ``slot``."""
        base = slot * self.slot_nbytes
        return [
            np.ndarray(spec.batch_shape(self.batch_size), dtype=spec.dtype, buffer=buffer, offset=base + offset)
            for spec, offset in zip(self.specs, self.var_offsets)
        ]


def check_fits(layout: PoolLayout) -> None:
    """Raise ConfigError, with the arithmetic, when the pool is larger than the shared memory free."""
    stats = os.statvfs(_shm_dir())
    free = stats.f_bavail * stats.f_frsize
    if layout.nbytes > free:
        per_row = sum(spec.sample_nbytes for spec in layout.specs)
        largest = max(layout.specs, key=lambda spec: spec.sample_nbytes)
        key = "feed_shapes" if largest in layout.specs[: layout.n_feeds] else "fetch_shapes"
        raise ConfigError(
            f"the batch pool needs {layout.nbytes / 2**20:,.1f} MiB (capacity {layout.capacity} x batch_size "
            f"{layout.batch_size} x {per_row:,} bytes per sample) but {_shm_dir()} has {free / 2**20:,.1f} MiB "
            f"free; the largest var is {largest.name!r} ({key}: {list(largest.shape)}, "
            f"{largest.sample_nbytes:,} bytes per sample): lower capacity or batch_size, or check its shape"
        )


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


#: Prefix of the names a pool has while a teacher registers it: ``distill-reader-shm-<pid>-<random>``.
NAME_PREFIX = "distill-reader-shm-"
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def _link(fd: int, path: str) -> None:
    """Give the unnamed file ``fd`` the name ``path`` (``linkat`` through ``/proc/self/fd``; only an
    ``O_TMPFILE`` file can be linked again). Python's ``os.link`` cannot: it resolves the magic link."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, path.encode(), _AT_SYMLINK_FOLLOW) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot name the batch pool {path}: {os.strerror(errno)}")


def sweep_stale_names() -> list[str]:
    """Unlink the pool names left by readers killed during a registration call (the name lives
    for milliseconds; a SIGKILL in that window is the one way to leave one). Returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(_shm_dir()):
            if not entry.startswith(NAME_PREFIX):
                continue
            pid = entry[len(NAME_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(_shm_dir(), entry))
                    removed.append(entry)
    return removed


class SharedBuffer:
    """Shared memory that has no name: an ``O_TMPFILE`` file in ``/dev/shm`` (or, where the system
    has none, a file unlinked the moment it is created).

    The parent keeps the open descriptor and hands it to the pipeline process (``pass_fds``), which
    maps it with :meth:`from_fd`. With no name there is nothing to leak, however either process ends.
    """

    def __init__(self, fd: int, nbytes: int) -> None:
        self.fd = fd
        self.nbytes = nbytes
        self.mmap = mmap.mmap(fd, nbytes)
        #: the address of the mapping's first byte (to find a view's offset in the pool)
        self.address = np.frombuffer(self.mmap, dtype=np.uint8).ctypes.data
        self._expected = 0  # registrations expected while the pool has a name (see key())
        self._name: str | None = None
        self._named_once = False

    @classmethod
    def create(cls, nbytes: int) -> SharedBuffer:
        try:  # O_TMPFILE: a file that can be given a name later (see temporary_name)
            fd = os.open(_shm_dir(), os.O_TMPFILE | os.O_RDWR, 0o600)
        except (AttributeError, OSError):  # not Linux, or a file system without it
            path = os.path.join(_shm_dir(), f"distill-reader-{os.getpid()}-{secrets.token_hex(6)}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(path)
        return cls._sized(fd, nbytes)

    @classmethod
    def _sized(cls, fd: int, nbytes: int) -> SharedBuffer:
        try:
            os.ftruncate(fd, nbytes)
            return cls(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, nbytes: int) -> SharedBuffer:
        return cls(fd, nbytes)

    def close_fd(self) -> None:
        """Close the descriptor once the other process has mapped it (the mapping stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where ``array``'s bytes start in the buffer, if it is a C-contiguous view inside it."""
        offset = array.ctypes.data - self.address
        if not array.flags.c_contiguous or offset < 0 or offset + array.nbytes > self.nbytes:
            return None
        return offset

    # -- a name for the teachers that map the pool (see docs/transports.md) -----------------------
    #
    # Linux lets an O_TMPFILE file be linked once: once that name is unlinked the file can never get
    # a name again. So the pool is named for one window: from the first registration until every
    # teacher expected meanwhile (expect_registration) has made its first attempt
    # (registration_done). A teacher that registers later maps a fresh mirror of the pool instead
    # (teacher/shm.py), named for its own registration call only.

    def expect_registration(self) -> None:
        """A teacher will register: keep the name (once given) until its :meth:`registration_done`."""
        self._expected += 1

    def registration_done(self) -> None:
        """One expected registration was attempted; the last one unlinks the name."""
        self._expected -= 1
        name = self._name
        if self._expected <= 0 and name is not None:
            self._name = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(_shm_dir(), name))

    @property
    def nameable(self) -> bool:
        """Whether :meth:`key` can give a name now (it has one, or never had one)."""
        return self.fd >= 0 and (self._name is not None or not self._named_once)

    def key(self) -> str:
        """The ``shm_open`` key of the pool's name, naming it now if needed (call between
        :meth:`expect_registration` and :meth:`registration_done`); OSError when it cannot be named
        (no descriptor, not an ``O_TMPFILE`` file, or its one naming window is over)."""
        name = self._name
        if name is None:
            if self.fd < 0:
                raise OSError("the batch pool's descriptor is closed")
            if self._named_once:
                raise OSError("the batch pool's name was unlinked after the first teachers registered")
            sweep_stale_names()
            name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
            _link(self.fd, os.path.join(_shm_dir(), name))
            self._name, self._named_once = name, True
        return "/" + name


@dataclass(frozen=True)
class VariableCut:
    """How to cut a variable var of a slot to its batch's longest row: the var's index in the slot,
    the axes of its variable dimensions (batch axis 0) and the index of the slot's array that holds
    the row lengths."""

    var: int
    axes: tuple[int, ...]
    lengths: int


def variable_cuts(config: ReaderConfig) -> tuple[VariableCut, ...]:
    """The cuts of every variable var of a slot laid out as :attr:`ReaderConfig.pool_specs`."""
    specs = (*config.feeds, *config.fetches)
    first_length = len(specs)  # the length arrays follow the feeds and fetches
    length_of = {feed: first_length + k for k, feed in enumerate(config.variable_feeds)}
    cuts = []
    for index, spec in enumerate(specs):
        if spec.variable:
            source = index if index < len(config.feeds) else config.fetch_length_source(index - len(config.feeds))
            assert source is not None  # checked by the config: a variable fetch has a variable feed
            axes = tuple(1 + a for a, d in enumerate(spec.shape) if d == -1)
            cuts.append(VariableCut(index, axes, length_of[source]))
    return tuple(cuts)


def batch_views(arrays: Sequence[np.ndarray], n: int, cuts: Sequence[VariableCut] = ()) -> list[np.ndarray]:
    """The first ``n`` rows of each var: the batch handed to the consumer (views, no copy). Each
    variable var is cut to the batch's longest row (what lies past a row's length is 0)."""
    views = [a[:n] for a in arrays]
    for cut in cuts:
        longest = int(views[cut.lengths].max(initial=0))
        view = views[cut.var]
        views[cut.var] = view[tuple(slice(0, longest) if a in cut.axes else slice(None) for a in range(view.ndim))]
    return views
