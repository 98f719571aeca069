"""The batch pool: ``capacity`` batch slots in one shared-memory buffer, laid out from the config.

Each slot holds ``batch_size`` rows of every feed var and every fetch var. The feeder writes the
user's samples into a slot (the only copy of them), the pipeline process sends the predict vars
from it and writes the teacher outputs into it, and the consumer gets numpy views of it.

The buffer is a file in ``/dev/shm`` that is unlinked as soon as the pipeline process has mapped
it, so nothing is left behind however the processes end (only a crash between the two steps could
leave it, and its name starts with ``distill-reader-``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distill_reader.oip import TensorSpec

_ALIGN = 64  # cache-line aligned arrays


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class PoolLayout:
    """Byte offsets of every var in every slot; a pure function of the config and sizes."""

    specs: tuple[TensorSpec, ...]  # feeds then fetches, the order of a yielded batch
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


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class SharedBuffer:
    """A shared-memory file mapped into this process. Create in the parent, attach in the child."""

    def __init__(self, path: str, nbytes: int, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self.mmap = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, nbytes: int) -> SharedBuffer:
        path = os.path.join(_shm_dir(), f"distill-reader-{os.getpid()}-{secrets.token_hex(6)}")
        return cls(path, nbytes, create=True)

    def unlink(self) -> None:
        """Remove the file; the mapping stays valid in every process that has it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def batch_views(arrays: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """The first ``n`` rows of each var: the batch handed to the consumer (views, no copy)."""
    return [a[:n] for a in arrays]
