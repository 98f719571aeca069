"""The transport seam: how the scheduler reaches one teacher.

The scheduler knows only :class:`Transport` (like httpx's ``AsyncBaseTransport``): check the
teacher's metadata, infer one d_batch, close; and a :data:`TransportFactory` handed to it, which
makes the transport of a :class:`TeacherRef`. Implementations, siblings:

* :class:`~distill_reader.teacher.client.TeacherClient`: OIP over gRPC, tensors in the messages;
* :class:`~distill_reader.teacher.shm.SharedMemoryTransport`: OIP over gRPC with the system
  shared-memory extension: the teacher reads the inputs from the reader's pool and writes the
  outputs into the transport's own output region (copied into the pool on success); only offsets
  travel (a co-located teacher that announces the extension). It holds a ``TeacherClient`` for
  what the extension cannot express; both encode through
  :class:`~distill_reader.teacher.codec.OipCodec`;
* :class:`~distill_reader.teacher.openai.OpenAITransport`: an OpenAI-compatible server's completions
  API with prompt log-probs (vLLM), JSON over HTTP (``[conf] protocol = openai``);
* :class:`InProcessTransport`: calls a Python function (tests; like httpx's ``MockTransport``).

:func:`~distill_reader.teacher.factory.transport_factory` chooses one per teacher (by its protocol,
``[conf] shared_memory`` and whether there is a pool to share).

Errors follow :mod:`distill_reader.teacher.client`: :class:`TransientTeacherError` to try
elsewhere, ``TeacherMismatchError``/``TeacherAuthError``/``TeacherOutputError`` to quarantine the
teacher, ``TeacherError`` for a failed attempt.
"""

from __future__ import annotations

import asyncio
import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from distill_reader.errors import TransientTeacherError


@dataclass(frozen=True)
class DBatch:
    """One request's rows, as views of the reader's pool.

    ``inputs``: the predict vars in ``predict_feed_ids`` order, each variable var cut to the
    d_batch's longest row; ``lengths``: the rows' lengths of each variable predict var;
    ``outputs``: the pool's rows of every fetch var (variable dimensions at ``max_length``), where
    a transport that writes in place puts the answer."""

    inputs: Sequence[np.ndarray]
    lengths: Sequence[np.ndarray] = ()
    outputs: Sequence[np.ndarray] = ()
    #: whether the rows' slot still holds this request's batch (False once its epoch is cancelled):
    #: a transport that copies an answer into ``outputs`` itself asks right before, with no await between
    live: Callable[[], bool] = field(default=lambda: True, compare=False)

    @property
    def count(self) -> int:
        return len(self.inputs[0])


@dataclass(frozen=True)
class TeacherRef:
    """A teacher to use: its endpoint, the model name to ask for (None: the config's), its
    registration with discovery (changes when it registers again; empty in fixed mode) and the
    protocol it speaks (None: the config's ``[conf] protocol``). Only the transport factory acts on
    ``protocol``; the scheduler compares whole refs (a teacher whose model or protocol changed is
    replaced) and does not know what its transports speak."""

    endpoint: str
    model_name: str | None = None
    registration: str = ""
    protocol: str | None = None


class Transport(ABC):
    """One teacher endpoint, bound to the reader's config."""

    endpoint: str

    @abstractmethod
    async def check_metadata(self) -> bool:
        """Check the model's metadata against the config (raise TeacherMismatchError naming the var).
        Returns False when the model declares no tensors (only its answers can be checked)."""

    @abstractmethod
    async def infer(self, batch: DBatch) -> list[np.ndarray] | None:
        """Run the model on ``batch``: the outputs in fetch order (a variable output cut to the first
        variable input's padded length, zero past each row's length), or None when the answer was
        written into ``batch.outputs`` already (only while ``batch.live()``). No write into
        ``batch.outputs`` may happen once this returns or raises: the slot may be reused at once."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection (and anything registered with the teacher)."""


#: makes the transport of a teacher: all the scheduler knows of protocols and transports
TransportFactory = Callable[[TeacherRef], Transport]

Handler = Callable[
    [Sequence[np.ndarray], Sequence[np.ndarray]], "Sequence[np.ndarray] | Awaitable[Sequence[np.ndarray]]"
]


class InProcessTransport(Transport):
    """A teacher that is a Python function ``handler(inputs, lengths) -> outputs`` (sync or async),
    for tests: what it raises reaches the scheduler as a transport error would. An async handler
    that takes longer than ``request_timeout`` seconds is cancelled and the request fails as
    transient, as a real transport's deadline does."""

    def __init__(
        self,
        endpoint: str,
        handler: Handler,
        *,
        declares_tensors: bool = True,
        request_timeout: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.declares_tensors = declares_tensors
        self.request_timeout = request_timeout
        self.requests = 0
        self.closed = False

    async def check_metadata(self) -> bool:
        return self.declares_tensors

    async def infer(self, batch: DBatch) -> list[np.ndarray]:
        self.requests += 1
        result = self.handler(batch.inputs, batch.lengths)
        if inspect.isawaitable(result):
            try:
                result = await asyncio.wait_for(result, self.request_timeout)
            except asyncio.TimeoutError:
                raise TransientTeacherError(
                    f"teacher {self.endpoint}: no answer in {self.request_timeout:g} s (request_timeout)"
                ) from None
        return [np.asarray(a) for a in result]

    async def close(self) -> None:
        self.closed = True
