"""The transport factory: which :class:`~distill_reader.teacher.transport.Transport` reaches a teacher.

Built by the pipeline process and handed to the scheduler, which knows only ``TeacherRef ->
Transport``: the protocols, the shared-memory pool and the sizing of its output rings stay here.
"""

from __future__ import annotations

from distill_reader.config import ReaderConfig
from distill_reader.reader.pool import SharedBuffer
from distill_reader.teacher.client import TeacherClient
from distill_reader.teacher.shm import SharedMemoryTransport
from distill_reader.teacher.transport import TeacherRef, Transport, TransportFactory


def transport_factory(
    config: ReaderConfig,
    request_timeout: float,
    check_finite: bool,
    pool: SharedBuffer | None = None,
    *,
    rows: int = 1,
    in_flight: int = 4,
) -> TransportFactory:
    """The transport for a teacher (:class:`TeacherRef`): an OpenAI-compatible one where its protocol
    (or else ``[conf] protocol``) is ``openai``; shared memory where ``[conf] shared_memory`` allows it
    and there is a pool to share; plain gRPC otherwise (``rows``, ``in_flight``: the most rows of a
    request and requests in flight, which size a shared-memory transport's output ring)."""

    def make(ref: TeacherRef) -> Transport:
        endpoint, model_name = ref.endpoint, ref.model_name
        if (ref.protocol or config.protocol) == "openai":
            from distill_reader.teacher.openai import OpenAITransport  # httpx only when used

            return OpenAITransport(endpoint, config, model_name, request_timeout, check_finite=check_finite)
        grpc = TeacherClient(endpoint, config, model_name, request_timeout, check_finite=check_finite)
        if config.shared_memory == "off" or pool is None:
            return grpc
        return SharedMemoryTransport(grpc, pool, rows=rows, in_flight=in_flight, required=config.shared_memory == "on")

    return make
