"""The gRPC OIP transport: one teacher, an OIP gRPC channel, its metadata check, infer; the
requests and answers are encoded by :mod:`distill_reader.teacher.codec`.

Errors are sorted by what the scheduler does with them:

* :class:`TransientTeacherError`: the teacher is unreachable, overloaded or too slow. The request
  goes to another teacher and does not count as an attempt; the teacher backs off.
* :class:`~distill_reader.errors.TeacherMismatchError` (metadata or answers that do not match the
  config, an endpoint that is not an OIP server), :class:`~distill_reader.errors.TeacherAuthError`
  (the token is refused) and :class:`~distill_reader.errors.TeacherOutputError` (NaN or inf in an
  answer): this teacher cannot serve the config. The scheduler quarantines it.
* :class:`~distill_reader.errors.TeacherError`: the teacher answered this request with an error;
  it counts as a failed attempt of the request.

Security comes from the config unless given: ``[conf] token_file``'s token is sent as
``authorization: Bearer …`` metadata, ``[conf] tls_*`` make the channel TLS.
"""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader.config import ReaderConfig
from distill_reader.errors import TeacherAuthError, TeacherError, TeacherMismatchError, TransientTeacherError
from distill_reader.rpc import MAX_MESSAGE_BYTES
from distill_reader.security import ClientSecurity, explain_unavailable
from distill_reader.teacher.codec import OipCodec
from distill_reader.teacher.transport import DBatch, Transport

__all__ = ["TeacherClient", "TransientTeacherError"]


_AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# The teacher could not be reached or did not answer in time: try elsewhere, it is no one's fault.
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC's default reconnect backoff grows to 120 s; a teacher that comes back should be used
    # again within a couple of seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]


def _describe(exc: grpc.aio.AioRpcError, security: ClientSecurity | None = None) -> str:
    return f"{exc.code().name}: {explain_unavailable(exc, security)}"


def _not_http2(details: str) -> bool:
    """gRPC's words for a peer that answered, but not in HTTP/2 (an HTTP/1 server, Redis, …)."""
    return "Failed parsing HTTP/2" in details or "http1.x server" in details


class TeacherClient(Transport):
    """The gRPC OIP transport: an asyncio client for one teacher endpoint, bound to the reader's
    config, tensors in the messages. Its channel (:attr:`stub`, :meth:`send`, :meth:`error`) also
    carries the shared-memory transport's calls, which holds one of these for its fallback."""

    def __init__(
        self,
        endpoint: str,
        config: ReaderConfig,
        model_name: str | None = None,
        request_timeout: float = 30.0,
        *,
        check_finite: bool = True,
        security: ClientSecurity | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.model_name = model_name or config.model_name
        self.request_timeout = request_timeout
        self.codec = OipCodec(config, endpoint, self.model_name, check_finite=check_finite)
        self._security = security or ClientSecurity(config.token, config.tls)
        #: the call metadata of every request (the token, if any)
        self.call_metadata = self._security.metadata
        self._channel = self._security.channel(endpoint, CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # ModelInfer with requests encoded already (see codec.encode_infer_request).
        self._model_infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def check_metadata(self) -> bool:
        """Compare the model's metadata with the config; raise TeacherMismatchError naming the var
        (TeacherAuthError for a refused token, TransientTeacherError if unreachable).

        Returns False when the model declares no tensors at all (MLServer's default for a custom
        runtime): then only its answers can be checked, which :meth:`infer` does on every answer.
        """
        try:
            meta = await self.stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=self.model_name),
                timeout=self.request_timeout,
                metadata=self.call_metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc, "cannot read the metadata of") from None
        return self.codec.check_metadata(meta)

    def error(self, exc: grpc.aio.AioRpcError, doing: str) -> Exception:
        """The exception for a failed call, by what the scheduler should do about it."""
        code = exc.code()
        details = exc.details() or ""
        if code in _TRANSIENT_CODES and not _not_http2(details):
            return TransientTeacherError(f"teacher {self.endpoint}: {_describe(exc, self._security)}")
        if code in _AUTH_CODES:
            hint = "check [conf] token_file" if self.call_metadata else "set [conf] token_file to the teacher's token"
            return TeacherAuthError(f"teacher {self.endpoint} refused the reader ({_describe(exc)}); {hint}")
        if _not_http2(details):
            return TeacherMismatchError(
                f"teacher {self.endpoint} is not a gRPC server (it does not speak HTTP/2: {details}); "
                "is this the server's gRPC port? (Triton: 8001, not its HTTP port 8000)"
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return TeacherMismatchError(
                f"teacher {self.endpoint} is not an Open Inference Protocol server: it does not implement "
                f"inference.GRPCInferenceService ({_describe(exc)})"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return TeacherMismatchError(
                f"teacher {self.endpoint} has no model {self.model_name!r} ({_describe(exc)}); check [conf] model_name"
            )
        return TeacherError(f"teacher {self.endpoint}: {doing} model {self.model_name!r} failed: {_describe(exc)}")

    async def send(self, request: bytes) -> service_pb2.ModelInferResponse:
        """One ``ModelInfer`` call of a serialized request (a failure raises grpc's ``AioRpcError``:
        see :meth:`error`)."""
        return await self._model_infer(request, timeout=self.request_timeout, metadata=self.call_metadata)

    async def infer(self, batch: DBatch) -> list[np.ndarray]:
        """Run the model on one d_batch (see :class:`DBatch`). Returns the outputs in fetch order; a
        variable output is cut to the first variable var's padded length and zero past each row's
        length."""
        try:
            response = await self.send(self.codec.encode_request(batch.inputs, batch.lengths))
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc, "a request to") from None
        return self.codec.decode(response, batch.inputs, batch.lengths)
