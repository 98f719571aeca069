"""The OIP codec: how a reader config's d_batches are asked of an Open Inference Protocol model and
how its answers are read, whatever carries them.

Shared by the gRPC transport (:mod:`distill_reader.teacher.client`: tensors in the messages) and the
shared-memory one (:mod:`distill_reader.teacher.shm`: offsets into mapped regions): the served names
of the vars, the check of the model's metadata against the config, the request's tensors (the
``<var>_length`` inputs a model declares included), and the checks of an answer (datatype and shape,
zero past each row's length, no NaN or inf). No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tritonclient.grpc import service_pb2

from distill_reader.config import ReaderConfig
from distill_reader.errors import TeacherMismatchError, TeacherOutputError
from distill_reader.oip import TensorSpec, numpy_dtype, oip_datatype, shape_matches

__all__ = ["OipCodec", "all_finite", "encode_infer_request", "zero_padding"]

Request = service_pb2.ModelInferRequest
Response = service_pb2.ModelInferResponse

_RAW_INPUT_TAG = bytes([(Request.RAW_INPUT_CONTENTS_FIELD_NUMBER << 3) | 2])


class OipCodec:
    """The OIP encoding of one teacher's d_batches, bound to the reader's config (``endpoint`` and
    ``model_name`` name the teacher in errors and requests)."""

    def __init__(self, config: ReaderConfig, endpoint: str, model_name: str, *, check_finite: bool = True) -> None:
        self.endpoint = endpoint
        self.model_name = model_name
        self.check_finite = check_finite
        #: (served name, spec) of each predict var, in ``predict_feed_ids`` order, and of each fetch var
        self.inputs = [(config.served_name(spec.name), spec) for spec in config.predict_feeds]
        self.outputs = [(config.served_name(spec.name), spec) for spec in config.fetches]
        #: each fetch var as the reader's pool holds it (variable dimensions at ``[conf] max_length``)
        self.pooled_outputs = config.pool_specs[len(config.feeds) : len(config.feeds) + len(config.fetches)]
        #: positions in ``inputs`` of the variable vars; the first one's lengths are the outputs'
        self.variable_inputs = [k for k, (_, spec) in enumerate(self.inputs) if spec.variable]
        #: ``<var>_length`` inputs the teacher declares: (its name, index into the variable inputs)
        self.length_inputs: list[tuple[str, int]] = []
        self._requested = [Request.InferRequestedOutputTensor(name=n) for n, _ in self.outputs]
        self._headers: dict[tuple, bytes] = {}  # the inputs' shapes -> the request without its tensors

    # -- metadata ----------------------------------------------------------------------------
    def check_metadata(self, meta: service_pb2.ModelMetadataResponse) -> bool:
        """Compare the model's metadata with the config (TeacherMismatchError naming the var); learn
        which ``<var>_length`` inputs it declares. False when it declares no tensors at all
        (MLServer's default for a custom runtime): then only its answers can be checked."""
        where = f"teacher {self.endpoint} model {self.model_name!r}"
        if not meta.inputs and not meta.outputs:
            return False
        _check_tensors(where, "input", "[feed]", meta.inputs, self.inputs)
        _check_tensors(where, "output", "[fetch]", meta.outputs, self.outputs)
        # A teacher that declares `<var>_length` (INT64, one per row) gets each row's length too.
        declared = {t.name: t.datatype for t in meta.inputs}
        self.length_inputs = [
            (f"{self.inputs[k][0]}_length", j)
            for j, k in enumerate(self.variable_inputs)
            if declared.get(f"{self.inputs[k][0]}_length") == "INT64"
        ]
        self._headers.clear()
        return True

    # -- requests ----------------------------------------------------------------------------
    def input_tensors(
        self, inputs: Sequence[np.ndarray], lengths: Sequence[np.ndarray] = ()
    ) -> list[tuple[str, str, np.ndarray]]:
        """(name, OIP datatype, array) of every tensor of the request: the predict vars, then the
        ``<var>_length`` inputs the model declares (the arrays themselves, not copies)."""
        tensors = [(name, oip_datatype(spec.dtype), array) for (name, spec), array in zip(self.inputs, inputs)]
        tensors += [(name, "INT64", np.asarray(lengths[j], dtype=np.int64)) for name, j in self.length_inputs]
        return tensors

    def encode_request(self, inputs: Sequence[np.ndarray], lengths: Sequence[np.ndarray] = ()) -> bytes:
        """The serialized ``ModelInferRequest`` of a d_batch, tensors in ``raw_input_contents``."""
        tensors = self.input_tensors(inputs, lengths)
        shapes = tuple(a.shape for a in inputs)
        header = self._headers.get(shapes)
        if header is None:
            described = [
                Request.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
                for name, datatype, array in tensors
            ]
            header = self._headers[shapes] = Request(
                model_name=self.model_name, inputs=described, outputs=self._requested
            ).SerializeToString()
        return encode_infer_request(header, [array for _, _, array in tensors])

    def padded_length(self, inputs: Sequence[np.ndarray]) -> int:
        """The first variable input's padded length (what a variable output is cut to); 0 if none."""
        if not self.variable_inputs:
            return 0
        first = self.variable_inputs[0]
        return inputs[first].shape[1 + self.inputs[first][1].shape.index(-1)]

    def output_shapes(self, inputs: Sequence[np.ndarray]) -> list[tuple[int, ...]]:
        """The shape of each fetch var's answer to ``inputs``."""
        count, padded = len(inputs[0]), self.padded_length(inputs)
        return [(spec.with_length(padded) if spec.variable else spec).batch_shape(count) for _, spec in self.outputs]

    # -- answers -----------------------------------------------------------------------------
    def decode(
        self, response: Response, inputs: Sequence[np.ndarray], lengths: Sequence[np.ndarray] = ()
    ) -> list[np.ndarray]:
        """The outputs of an answer with its tensors in ``raw_output_contents``, in fetch order,
        checked (:meth:`check_output`) and zero past each row's length."""
        if len(response.raw_output_contents) != len(response.outputs):
            raise TeacherMismatchError(
                f"teacher {self.endpoint} answered without raw_output_contents for every output; "
                "only raw tensor contents are supported"
            )
        index = {out.name: i for i, out in enumerate(response.outputs)}
        arrays = []
        for (name, spec), expected in zip(self.outputs, self.output_shapes(inputs)):
            meta = self._answered(response, index, name, spec)
            self._check_output_meta(meta, spec, expected)
            raw = response.raw_output_contents[index[name]]
            nbytes = int(np.prod(expected)) * spec.dtype.itemsize
            if len(raw) != nbytes:
                raise TeacherMismatchError(
                    f"teacher {self.endpoint} returned {len(raw)} bytes for fetch var {spec.name!r}, expected {nbytes}"
                )
            array = np.frombuffer(raw, dtype=spec.dtype).reshape(expected)
            if spec.variable:  # what the teacher computed on padding is not its answer: zero it
                array = zero_padding(array, spec.shape, lengths[0])
            self._check_finite(array, spec.name, inputs)
            arrays.append(array)
        return arrays

    def check_in_place(
        self,
        response: Response,
        views: Sequence[np.ndarray],
        inputs: Sequence[np.ndarray],
        lengths: Sequence[np.ndarray] = (),
    ) -> None:
        """Check an answer the teacher wrote into ``views`` (one per fetch var, the answer's shape):
        its tensors are what the config says; zero past each row's length, in place."""
        index = {out.name: i for i, out in enumerate(response.outputs)}
        for (name, spec), view in zip(self.outputs, views):
            self._check_output_meta(self._answered(response, index, name, spec), spec, view.shape)
            if spec.variable:  # what the teacher computed on padding is not its answer: zero it
                zero_padding(view, spec.shape, lengths[0], copy=False)
            self._check_finite(view, spec.name, inputs)

    def _answered(self, response: Response, index: dict[str, int], name: str, spec: TensorSpec):
        position = index.get(name)
        if position is None:
            raise TeacherMismatchError(
                f"teacher {self.endpoint} answered without output {name!r} ([fetch] {spec.name}); "
                f"its outputs are {sorted(index)}"
            )
        return response.outputs[position]

    def _check_output_meta(self, meta: Response.InferOutputTensor, spec: TensorSpec, expected: Sequence[int]) -> None:
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
