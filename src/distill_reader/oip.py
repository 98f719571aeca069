"""Open Inference Protocol (KServe v2) tensor helpers shared by the client and the server.

Tensors travel as ``raw_input_contents`` / ``raw_output_contents``: the little-endian bytes of a
C-contiguous array, one entry per tensor in the order of ``inputs`` / ``outputs``.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
The protocol is the contract (any OIP server is a teacher), not this module's names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# OIP datatype name <-> numpy dtype. BYTES (variable-length strings) is not supported: the reader's
# pool has a fixed layout.
_OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in _OIP_TO_NUMPY.items()}

#: dtype names accepted in configs (numpy spelling), e.g. ``float32``.
SUPPORTED_DTYPES: tuple[str, ...] = tuple(dt.name for dt in _OIP_TO_NUMPY.values())


def numpy_dtype(oip_datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype name such as ``FP32``."""
    try:
        return _OIP_TO_NUMPY[oip_datatype.upper()]
    except KeyError:
        raise ValueError(f"unsupported OIP datatype {oip_datatype!r}") from None


def oip_datatype(dtype: np.dtype | str | type) -> str:
    """The OIP datatype name of a numpy dtype (``float32`` -> ``FP32``)."""
    try:
        return _NUMPY_TO_OIP[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and per-sample shape of one tensor (the batch dimension is not included).

    A ``-1`` in ``shape`` is a variable dimension (any size in model metadata; in the reader's
    config, a per-row length bounded by ``[conf] max_length``).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def datatype(self) -> str:
        """The OIP datatype name."""
        return oip_datatype(self.dtype)

    def batch_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.shape)

    @cached_property
    def variable(self) -> bool:
        """Whether the shape has a variable (``-1``) dimension."""
        return -1 in self.shape

    def with_length(self, length: int) -> TensorSpec:
        """This spec with every variable dimension set to ``length``."""
        return TensorSpec(self.name, self.dtype, tuple(length if d == -1 else d for d in self.shape))

    @cached_property
    def sample_nbytes(self) -> int:  # cached: read for every response
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def shape_matches(declared: Sequence[int], actual: Sequence[int]) -> bool:
    """Whether ``actual`` fits ``declared``, where ``-1`` in ``declared`` matches any size."""
    return len(declared) == len(actual) and all(d in (-1, a) for d, a in zip(declared, actual))


def array_from_raw(raw: bytes | memoryview, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
    """A read-only array over ``raw`` (no copy); raises ValueError naming sizes when they disagree."""
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"raw contents hold {len(raw)} bytes, expected {expected} for {dtype.name}{list(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
