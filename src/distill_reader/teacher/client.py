"""One teacher, as the reader's pipeline sees it: an OIP gRPC channel, its metadata check, infer.

Errors are sorted into two kinds because they are handled differently:
:class:`TransientTeacherError` (the teacher is unreachable, overloaded or too slow: the request goes
to another teacher and does not count as an attempt) and :class:`~distill_reader.errors.TeacherError`
(the teacher answered, wrongly: counts as a failed attempt of the request). A teacher that refuses
the reader's token (``UNAUTHENTICATED``) fails the metadata check, which stops the epoch at once.

Security comes from the config unless given: ``[conf] token_file``'s token is sent as
``authorization: Bearer …`` metadata, ``[conf] tls_*`` make the channel TLS.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader.config import ReaderConfig
from distill_reader.errors import TeacherError, TeacherMismatchError
from distill_reader.oip import numpy_dtype, oip_datatype, shape_matches
from distill_reader.security import ClientSecurity, explain_unavailable

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# The teacher could not be reached or did not answer in time: try elsewhere, it is no one's fault.
_AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
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


_RAW_INPUT_TAG = bytes([(service_pb2.ModelInferRequest.RAW_INPUT_CONTENTS_FIELD_NUMBER << 3) | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_infer_request(header: bytes, arrays: Sequence[np.ndarray]) -> bytes:
    """A serialized ``ModelInferRequest``: ``header`` (the request without its tensors, serialized)
    followed by one ``raw_input_contents`` field per array.

    Protobuf messages may be concatenated field by field, so the tensors go straight from the pool
    into the one buffer gRPC sends: one copy instead of three (``tobytes``, the message, its
    serialization).
    """
    parts = [header]
    for array in arrays:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # flat bytes, no copy
        parts += (_RAW_INPUT_TAG, _varint(data.nbytes), data)
    return b"".join(parts)


class TransientTeacherError(Exception):
    """The teacher is unreachable or timed out; the request should go to another teacher."""


def _describe(exc: grpc.aio.AioRpcError, security: ClientSecurity | None = None) -> str:
    return f"{exc.code().name}: {explain_unavailable(exc, security)}"


class TeacherClient:
    """An asyncio OIP client for one teacher endpoint, bound to the reader's config."""

    def __init__(
        self,
        endpoint: str,
        config: ReaderConfig,
        model_name: str | None = None,
        request_timeout: float = 30.0,
        *,
        security: ClientSecurity | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.model_name = model_name or config.model_name
        self.request_timeout = request_timeout
        self._config = config
        self._security = security or ClientSecurity(config.token, config.tls)
        self._metadata = self._security.metadata
        self._channel = self._security.channel(endpoint, CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._inputs = [(config.served_name(spec.name), spec) for spec in config.predict_feeds]
        self._outputs = [(config.served_name(spec.name), spec) for spec in config.fetches]
        self._requested = [service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n, _ in self._outputs]
        self._headers: dict[int, bytes] = {}  # d_batch rows -> the request without its tensors
        # ModelInfer with requests we encode ourselves (see encode_infer_request).
        self._model_infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def check_metadata(self) -> None:
        """Compare the model's metadata with the config; raise TeacherMismatchError naming the var."""
        try:
            meta = await self._stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=self.model_name),
                timeout=self.request_timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSIENT_CODES:
                raise TransientTeacherError(f"teacher {self.endpoint}: {_describe(exc, self._security)}") from None
            if exc.code() in _AUTH_CODES:
                hint = "check [conf] token_file" if self._metadata else "set [conf] token_file to the teacher's token"
                raise TeacherMismatchError(
                    f"teacher {self.endpoint} refused the reader ({_describe(exc)}); {hint}"
                ) from None
            raise TeacherMismatchError(
                f"teacher {self.endpoint}: cannot read metadata of model {self.model_name!r} "
                f"({_describe(exc)}); check [conf] model_name"
            ) from None
        where = f"teacher {self.endpoint} model {self.model_name!r}"
        _check_tensors(where, "input", "[feed]", meta.inputs, self._inputs)
        _check_tensors(where, "output", "[fetch]", meta.outputs, self._outputs)

    async def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the model on one d_batch (arrays in predict_feed_ids order); outputs in fetch order."""
        count = len(inputs[0])
        header = self._headers.get(count)
        if header is None:
            header = self._headers[count] = service_pb2.ModelInferRequest(
                model_name=self.model_name,
                inputs=[
                    service_pb2.ModelInferRequest.InferInputTensor(
                        name=name, datatype=oip_datatype(spec.dtype), shape=spec.batch_shape(count)
                    )
                    for name, spec in self._inputs
                ],
                outputs=self._requested,
            ).SerializeToString()
        request = encode_infer_request(header, inputs)
        try:
            response = await self._model_infer(request, timeout=self.request_timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSIENT_CODES:
                raise TransientTeacherError(f"teacher {self.endpoint}: {_describe(exc, self._security)}") from None
            raise TeacherError(f"teacher {self.endpoint} failed a request: {_describe(exc)}") from None
        return self._decode(response, count)

    def _decode(self, response: service_pb2.ModelInferResponse, count: int) -> list[np.ndarray]:
        if len(response.raw_output_contents) != len(response.outputs):
            raise TeacherError(
                f"teacher {self.endpoint} answered without raw_output_contents for every output; "
                "only raw tensor contents are supported"
            )
        by_name = {out.name: i for i, out in enumerate(response.outputs)}
        arrays = []
        for name, spec in self._outputs:
            index = by_name.get(name)
            if index is None:
                raise TeacherError(f"teacher {self.endpoint} answered without output {name!r} ([fetch] {spec.name})")
            meta = response.outputs[index]
            expected = spec.batch_shape(count)
            if meta.datatype != oip_datatype(spec.dtype) or tuple(meta.shape) != expected:
                raise TeacherError(
                    f"teacher {self.endpoint} returned {meta.datatype}{list(meta.shape)} for fetch var "
                    f"{spec.name!r}, expected {oip_datatype(spec.dtype)}{list(expected)}"
                )
            raw = response.raw_output_contents[index]
            if len(raw) != spec.sample_nbytes * count:
                raise TeacherError(
                    f"teacher {self.endpoint} returned {len(raw)} bytes for fetch var {spec.name!r}, "
                    f"expected {spec.sample_nbytes * count}"
                )
            arrays.append(np.frombuffer(raw, dtype=spec.dtype).reshape(expected))
        return arrays


def _check_tensors(where: str, kind: str, section: str, declared, wanted) -> None:
    by_name = {t.name: t for t in declared}
    for served_name, spec in wanted:
        alias = f" (served as {served_name!r})" if served_name != spec.name else ""
        tensor = by_name.get(served_name)
        if tensor is None:
            raise TeacherMismatchError(
                f"{section} var {spec.name!r}{alias}: {where} has no {kind} of that name; "
                f"its {kind}s are {sorted(by_name)}"
            )
        try:
            dtype = numpy_dtype(tensor.datatype)
        except ValueError:
            dtype = None
        if dtype != spec.dtype:
            raise TeacherMismatchError(
                f"{section} var {spec.name!r}{alias}: dtype {spec.dtype.name} in the config, "
                f"{tensor.datatype} on {where}"
            )
        shape = list(tensor.shape)
        # OIP metadata shapes include the batch dimension (-1 when the model batches).
        if not shape or shape[0] not in (-1, 0) or not shape_matches(shape[1:], spec.shape):
            raise TeacherMismatchError(
                f"{section} var {spec.name!r}{alias}: shape {list(spec.shape)} per sample in the config, "
                f"{shape} on {where} (expected [-1, {', '.join(map(str, spec.shape))}])"
            )
