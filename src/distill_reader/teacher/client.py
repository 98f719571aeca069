"""The gRPC OIP transport: one teacher, an OIP gRPC channel, its metadata check, infer.

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

from collections.abc import Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from distill_reader.config import ReaderConfig
from distill_reader.errors import (
    TeacherAuthError,
    TeacherError,
    TeacherMismatchError,
    TeacherOutputError,
    TransientTeacherError,
)
from distill_reader.oip import TensorSpec, numpy_dtype, oip_datatype, shape_matches
from distill_reader.rpc import MAX_MESSAGE_BYTES
from distill_reader.security import ClientSecurity, explain_unavailable
from distill_reader.teacher.transport import DBatch, Transport

__all__ = ["TeacherClient", "TransientTeacherError", "encode_infer_request"]


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


def _describe(exc: grpc.aio.AioRpcError, security: ClientSecurity | None = None) -> str:
    return f"{exc.code().name}: {explain_unavailable(exc, security)}"


def _not_http2(details: str) -> bool:
    """gRPC's words for a peer that answered, but not in HTTP/2 (an HTTP/1 server, Redis, …)."""
    return "Failed parsing HTTP/2" in details or "http1.x server" in details


class TeacherClient(Transport):
    """The gRPC OIP transport: an asyncio client for one teacher endpoint, bound to the reader's config."""

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
        self.check_finite = check_finite
        self._config = config
        self._security = security or ClientSecurity(config.token, config.tls)
        self._metadata = self._security.metadata
        self._channel = self._security.channel(endpoint, CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._inputs = [(config.served_name(spec.name), spec) for spec in config.predict_feeds]
        self._outputs = [(config.served_name(spec.name), spec) for spec in config.fetches]
        self._requested = [service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n, _ in self._outputs]
        #: positions in ``_inputs`` of the variable vars; the first one's lengths are the outputs'
        self._variable_inputs = [k for k, (_, spec) in enumerate(self._inputs) if spec.variable]
        #: ``<var>_length`` inputs the teacher declares: (its name, index into the variable inputs)
        self._length_inputs: list[tuple[str, int]] = []
        self._headers: dict[tuple, bytes] = {}  # the inputs' shapes -> the request without its tensors
        # ModelInfer with requests we encode ourselves (see encode_infer_request).
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
            meta = await self._stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=self.model_name),
                timeout=self.request_timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "cannot read the metadata of") from None
        where = f"teacher {self.endpoint} model {self.model_name!r}"
        if not meta.inputs and not meta.outputs:
            return False
        _check_tensors(where, "input", "[feed]", meta.inputs, self._inputs)
        _check_tensors(where, "output", "[fetch]", meta.outputs, self._outputs)
        # A teacher that declares `<var>_length` (INT64, one per row) gets each row's length too.
        declared = {t.name: t.datatype for t in meta.inputs}
        self._length_inputs = [
            (f"{self._inputs[k][0]}_length", j)
            for j, k in enumerate(self._variable_inputs)
            if declared.get(f"{self._inputs[k][0]}_length") == "INT64"
        ]
        self._headers.clear()
        return True

    def _error(self, exc: grpc.aio.AioRpcError, doing: str) -> Exception:
        """The exception for a failed call, by what the scheduler should do about it."""
        code = exc.code()
        details = exc.details() or ""
        if code in _TRANSIENT_CODES and not _not_http2(details):
            return TransientTeacherError(f"teacher {self.endpoint}: {_describe(exc, self._security)}")
        if code in _AUTH_CODES:
            hint = "check [conf] token_file" if self._metadata else "set [conf] token_file to the teacher's token"
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

    async def infer(self, batch: DBatch) -> list[np.ndarray]:
        """Run the model on one d_batch (see :class:`DBatch`). Returns the outputs in fetch order; a
        variable output is cut to the first variable var's padded length and zero past each row's
        length."""
        return await self.infer_arrays(batch.inputs, batch.lengths)

    async def infer_arrays(self, inputs: Sequence[np.ndarray], lengths: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        """:meth:`infer` of the arrays of a d_batch, tensors in the messages."""
        count = len(inputs[0])
        shapes = tuple(a.shape for a in inputs)
        header = self._headers.get(shapes)
        if header is None:
            tensors = [
                service_pb2.ModelInferRequest.InferInputTensor(
                    name=name, datatype=oip_datatype(spec.dtype), shape=shape
                )
                for (name, spec), shape in zip(self._inputs, shapes)
            ]
            tensors += [
                service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="INT64", shape=[count])
                for name, _ in self._length_inputs
            ]
            header = self._headers[shapes] = service_pb2.ModelInferRequest(
                model_name=self.model_name, inputs=tensors, outputs=self._requested
            ).SerializeToString()
        arrays = [*inputs, *(np.asarray(lengths[j], dtype=np.int64) for _, j in self._length_inputs)]
        request = encode_infer_request(header, arrays)
        try:
            response = await self._model_infer(request, timeout=self.request_timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "a request to") from None
        if not self._variable_inputs:
            return self._decode(response, inputs)
        first = self._variable_inputs[0]
        padded = shapes[first][1 + self._inputs[first][1].shape.index(-1)]
        return self._decode(response, inputs, padded, lengths[0])

    def _decode(
        self,
        response: service_pb2.ModelInferResponse,
        inputs: Sequence[np.ndarray],
        padded: int = 0,
        row_lengths: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        count = len(inputs[0])
        if len(response.raw_output_contents) != len(response.outputs):
            raise TeacherMismatchError(
                f"teacher {self.endpoint} answered without raw_output_contents for every output; "
                "only raw tensor contents are supported"
            )
        by_name = {out.name: i for i, out in enumerate(response.outputs)}
        arrays = []
        for name, spec in self._outputs:
            index = by_name.get(name)
            if index is None:
                raise TeacherMismatchError(
                    f"teacher {self.endpoint} answered without output {name!r} ([fetch] {spec.name}); "
                    f"its outputs are {sorted(by_name)}"
                )
            meta = response.outputs[index]
            shape = spec.with_length(padded) if spec.variable else spec
            expected = shape.batch_shape(count)
            self._check_output_meta(meta, spec, expected)
            raw = response.raw_output_contents[index]
            if len(raw) != shape.sample_nbytes * count:
                raise TeacherMismatchError(
                    f"teacher {self.endpoint} returned {len(raw)} bytes for fetch var {spec.name!r}, "
                    f"expected {shape.sample_nbytes * count}"
                )
            array = np.frombuffer(raw, dtype=spec.dtype).reshape(expected)
            if spec.variable:  # what the teacher computed on padding is not its answer: zero it
                assert row_lengths is not None
                array = zero_padding(array, spec.shape, row_lengths)
            self._check_finite(array, spec.name, inputs)
            arrays.append(array)
        return arrays

    def _check_output_meta(
        self, meta: service_pb2.ModelInferResponse.InferOutputTensor, spec: TensorSpec, expected: Sequence[int]
    ) -> None:
        """TeacherMismatchError unless the answer's tensor has the config's datatype and ``expected`` shape."""
        if meta.datatype != oip_datatype(spec.dtype) or tuple(meta.shape) != tuple(expected):
            raise TeacherMismatchError(
                f"teacher {self.endpoint} returned {meta.datatype}{list(meta.shape)} for fetch var "
                f"{spec.name!r}, expected {oip_datatype(spec.dtype)}{list(expected)}"
            )

    def _check_finite(self, array: np.ndarray, name: str, inputs: Sequence[np.ndarray]) -> None:
        """TeacherOutputError for NaN or inf in an answer to rows whose inputs are finite."""
        if not self.check_finite or array.dtype.kind not in "fc" or all_finite(array):
            return
        count = len(array)
        bad_rows = ~np.isfinite(array.reshape(count, -1)).all(axis=1)
        # NaN in, NaN out is the model applied to the data: only rows with finite inputs count.
        bad_rows &= ~_non_finite_rows(inputs)
        if bad_rows.any():
            raise TeacherOutputError(
                f"teacher {self.endpoint} answered NaN or inf in fetch var {name!r} for "
                f"{int(bad_rows.sum())} of {count} rows whose inputs are finite; disable the check "
                "with check_finite=False if your teacher means them"
            )


def zero_padding(array: np.ndarray, shape: Sequence[int], lengths: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """``array`` (``[rows, *shape]`` with the variable dimensions padded), a copy unless ``copy`` is
    False, with every position at or past its row's length set to 0 along each variable dimension."""
    if copy:
        array = np.array(array)
    for axis, dim in enumerate(shape):
        if dim == -1:
            padding = np.arange(array.shape[1 + axis])[None, :] >= np.asarray(lengths)[:, None]
            np.moveaxis(array, 1 + axis, 1)[padding] = 0
    return array


def _non_finite_rows(inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Which rows have a NaN or inf in a floating-point input (run only when an answer has one)."""
    rows = np.zeros(len(inputs[0]), dtype=bool)
    for array in inputs:
        if array.dtype.kind in "fc":
            rows |= ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return rows


def all_finite(array: np.ndarray) -> bool:
    """No NaN or inf in a floating-point array. float16 is checked on its bits (an exponent of all
    ones is inf or NaN): numpy has no vectorized float16 isfinite, and this is 6-12x faster."""
    if array.dtype == np.float16:
        return array.size == 0 or int((array.view(np.uint16) & 0x7C00).max()) != 0x7C00
    return bool(np.isfinite(array).all())


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
