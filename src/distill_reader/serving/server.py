"""The teacher server: one model over the Open Inference Protocol (KServe v2 / Triton) gRPC API.

Three ways to run it:

- ``await serve(backend, listen, ...)`` inside an event loop, until ``stop_event`` is set;
- ``run_server(backend, listen, ...)`` from a command line: blocks, stops on SIGINT/SIGTERM;
- ``with running_server(backend) as address:`` in tests or other code: a server in a background
  thread, bound to a free port by default, stopped on leaving the block.

Besides the calls a student needs (readiness, ``ModelMetadata``, ``ModelInfer``), it answers the
Triton calls that tools pointed at an OIP server use (perf_analyzer, Model Analyzer, dashboards):
``ModelConfig``, ``RepositoryIndex``, ``ModelStatistics`` (see :mod:`~distill_reader.serving.stats`)
and ``ModelStreamInfer``, with Triton's semantics. It implements the system shared-memory extension
(``SystemSharedMemoryRegister``/``Status``/``Unregister``, inputs and outputs by region; see
:mod:`~distill_reader.serving.shared_memory`) and announces it in its server metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from distill_reader import __version__
from distill_reader.errors import BatcherStopped, RegionError, RegionExists, RegionsFull, RequestError
from distill_reader.oip import TensorSpec, array_from_raw, shape_matches
from distill_reader.rpc import MAX_MESSAGE_BYTES, BackgroundServer, require_hostport, run_until_signal, strict_handler
from distill_reader.security import Secret, TlsFiles, TokenInterceptor, add_port, warn_if_exposed
from distill_reader.serving.backends.base import Backend
from distill_reader.serving.batcher import BatchTiming, DynamicBatcher
from distill_reader.serving.metrics import MetricsHttpServer, TeacherMetrics
from distill_reader.serving.shared_memory import Placement, SharedMemoryRegions
from distill_reader.serving.stats import ModelStats

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8001"
SERVER_NAME = "distill-reader"
MODEL_VERSION = "1"

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]

#: The methods a token protects: the ones that use, describe or list the model. Liveness,
#: readiness and server metadata stay open, like health checks elsewhere (they reveal nothing
#: about the model).
PROTECTED_METHODS = tuple(
    f"/{SERVICE.full_name}/{name}"
    for name in (
        "ModelInfer",
        "ModelStreamInfer",
        "ModelMetadata",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryUnregister",
    )
)
#: The OIP extensions announced in the server metadata.
EXTENSIONS = ("system_shared_memory",)
_SHARED_MEMORY_OFF = "shared memory is off on this teacher (distill teacher serve --no-shared-memory)"
#: Inference calls: a refused one counts as an ``unauthenticated`` request in the metrics.
_INFER_METHODS = tuple(m for m in PROTECTED_METHODS if m.endswith("Infer"))

#: Most requests of one ModelStreamInfer call being answered at once: enough to fill batches from
#: a pipelining client, bounded so a fast sender waits (gRPC flow control) instead of filling memory.
STREAM_WINDOW = 64

InputTensor = service_pb2.ModelInferRequest.InferInputTensor
OnStarted = Callable[[str], Awaitable[None]]

# Which typed ``InferTensorContents`` field carries each OIP datatype (FP16 travels raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _config_tensor(spec: TensorSpec, kind: type) -> Any:
    """``spec`` as a Triton ``ModelInput``/``ModelOutput``: dims without the batch dimension (the
    model batches); a per-sample scalar is dims ``[1]`` reshaped to ``[]``, as Triton writes it."""
    data_type = model_config_pb2.DataType.Value("TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}")
    tensor = kind(name=spec.name, data_type=data_type, dims=list(spec.shape) or [1])
    if not spec.shape:
        tensor.reshape.SetInParent()
    return tensor


def _decode_input(
    spec: TensorSpec, tensor: InputTensor, raw: bytes | None, regions: SharedMemoryRegions | None = None
) -> np.ndarray:
    name = spec.name
    if tensor.datatype != spec.datatype:
        raise RequestError(f"input {name!r} has datatype {tensor.datatype}, expected {spec.datatype}")
    shape = tuple(tensor.shape)
    if len(shape) != len(spec.shape) + 1 or any(d < 0 for d in shape) or not shape_matches(spec.shape, shape[1:]):
        raise RequestError(f"input {name!r} has shape {list(shape)}, expected {[-1, *spec.shape]}")
    if regions is not None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
        try:
            placement = regions.placement(f"input {name!r}", tensor.parameters, nbytes)
            if placement is not None:  # a copy: the client may shrink its file at any time
                return placement.read(f"input {name!r}", spec.dtype, shape)
        except RegionError as e:
            raise RequestError(str(e)) from None
    if raw is not None:
        try:
            return array_from_raw(raw, spec.dtype, shape)
        except ValueError as e:
            raise RequestError(f"input {name!r}: {e}") from None
    field = _TYPED_FIELD.get(spec.datatype)
    if field is None:
        raise RequestError(f"input {name!r}: datatype {spec.datatype} must be sent as raw contents")
    values = getattr(tensor.contents, field)
    count = int(np.prod(shape, dtype=np.int64))
    if len(values) != count:
        raise RequestError(f"input {name!r}: contents hold {len(values)} values, shape {list(shape)} needs {count}")
    return np.array(values, dtype=spec.dtype).reshape(shape)


class TeacherServer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The OIP servicer for one model. Needs a started :class:`DynamicBatcher` to infer."""

    def __init__(
        self,
        backend: Backend,
        batcher: DynamicBatcher,
        *,
        model_name: str = "teacher",
        metrics: TeacherMetrics | None = None,
        shared_memory: bool = True,
    ) -> None:
        self.backend = backend
        self.batcher = batcher
        self.model_name = model_name
        self.metrics = metrics or TeacherMetrics()
        #: regions registered through the system shared-memory extension (None: the extension is off)
        self.regions = SharedMemoryRegions() if shared_memory else None
        #: Triton-style statistics; batches are recorded by whoever wires the batcher's ``on_batch``.
        self.stats = ModelStats()
        self.ready = False
        self._inputs = {s.name: s for s in backend.inputs}
        self._outputs = {s.name: s for s in backend.outputs}
        self._all_outputs = [s.name for s in backend.outputs]
        self._metadata = service_pb2.ModelMetadataResponse(
            name=model_name,
            versions=[MODEL_VERSION],
            platform=backend.platform,
            inputs=[self._tensor_metadata(s) for s in backend.inputs],
            outputs=[self._tensor_metadata(s) for s in backend.outputs],
        )
        self._config = model_config_pb2.ModelConfig(
            name=model_name,
            # The same platform as ModelMetadata reports; backend: Triton's for this kind of model.
            platform=backend.platform,
            backend=backend.triton_backend,
            version_policy=model_config_pb2.ModelVersionPolicy(
                latest=model_config_pb2.ModelVersionPolicy.Latest(num_versions=1)
            ),
            max_batch_size=batcher.max_batch,
            input=[_config_tensor(s, model_config_pb2.ModelInput) for s in backend.inputs],
            output=[_config_tensor(s, model_config_pb2.ModelOutput) for s in backend.outputs],
            dynamic_batching=model_config_pb2.ModelDynamicBatching(
                max_queue_delay_microseconds=round(batcher.max_delay * 1e6)
            ),
            # Every backend runs on the CPU (ONNX Runtime's CPU provider, Paddle with the GPU off).
            instance_group=[
                model_config_pb2.ModelInstanceGroup(
                    name=model_name, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=batcher.instances
                )
            ],
        )

    @staticmethod
    def _tensor_metadata(spec: TensorSpec) -> service_pb2.ModelMetadataResponse.TensorMetadata:
        return service_pb2.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatype, shape=[-1, *spec.shape]
        )

    def _serves(self, name: str, version: str) -> bool:
        return name == self.model_name and version in ("", MODEL_VERSION)

    async def ServerLive(self, request, context):  # noqa: N802 - names fixed by the protocol
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request, context):  # noqa: N802
        # Like Triton: an unknown model is "not ready", not an error.
        return service_pb2.ModelReadyResponse(ready=self.ready and self._serves(request.name, request.version))

    async def ServerMetadata(self, request, context):  # noqa: N802
        extensions = EXTENSIONS if self.regions is not None else ()
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=extensions)

    async def _shared_memory_off(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, _SHARED_MEMORY_OFF)

    async def SystemSharedMemoryRegister(self, request, context):  # noqa: N802
        if self.regions is None:
            await self._shared_memory_off(context)
        try:
            self.regions.register(request.name, request.key, request.offset, request.byte_size)
        except RegionExists as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except RegionsFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except RegionError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return service_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):  # noqa: N802
        if self.regions is None:
            await self._shared_memory_off(context)
        try:
            return self.regions.status(request.name)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no shared memory region {request.name!r} is registered")

    async def SystemSharedMemoryUnregister(self, request, context):  # noqa: N802
        if self.regions is None:
            await self._shared_memory_off(context)
        self.regions.unregister(request.name)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    async def ModelMetadata(self, request, context):  # noqa: N802
        if not self._serves(request.name, request.version):
            await self._not_found(request.name, request.version, context)
        return self._metadata

    async def ModelConfig(self, request, context):  # noqa: N802
        if not self._serves(request.name, request.version):
            await self._not_found(request.name, request.version, context)
        return service_pb2.ModelConfigResponse(config=self._config)

    async def RepositoryIndex(self, request, context):  # noqa: N802
        # One repository with one model; ``repository_name`` has nothing to select.
        if request.ready and not self.ready:
            return service_pb2.RepositoryIndexResponse()
        index = service_pb2.RepositoryIndexResponse.ModelIndex(name=self.model_name, version=MODEL_VERSION)
        if self.ready:
            index.state = "READY"
        else:
            index.state, index.reason = "UNAVAILABLE", "the server is starting or stopping"
        return service_pb2.RepositoryIndexResponse(models=[index])

    async def ModelStatistics(self, request, context):  # noqa: N802
        # Like Triton: no name means every model (here, the one).
        if request.name and not self._serves(request.name, request.version):
            await self._not_found(request.name, request.version, context)
        return service_pb2.ModelStatisticsResponse(model_stats=[self.stats.proto(self.model_name, MODEL_VERSION)])

    def _not_found_message(self, name: str, version: str) -> str:
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        return f"{what} not found; this server serves {self.model_name!r}"

    async def _not_found(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, self._not_found_message(name, version))

    def decode(self, request: service_pb2.ModelInferRequest) -> tuple[dict[str, np.ndarray], int, list[str]]:
        """The input arrays, the batch size and the output names of a request; RequestError if bad.

        ``raw_input_contents``, when given, hold the inputs not read from a shared memory region, in order."""
        raw = request.raw_input_contents
        tensors = request.inputs
        by_region = [t for t in tensors if "shared_memory_region" in t.parameters]
        if raw and len(raw) != len(tensors) - len(by_region):
            raise RequestError(f"{len(raw)} raw_input_contents for {len(tensors) - len(by_region)} inputs")
        regions = self.regions if by_region else None
        if by_region and regions is None:
            raise RequestError(_SHARED_MEMORY_OFF)
        raw_contents = iter(raw)
        arrays: dict[str, np.ndarray] = {}
        rows = -1
        for tensor in tensors:
            spec = self._inputs.get(tensor.name)
            if spec is None:
                raise RequestError(f"unknown input {tensor.name!r}; the model takes {list(self._inputs)}")
            if tensor.name in arrays:
                raise RequestError(f"input {tensor.name!r} given twice")
            in_region = "shared_memory_region" in tensor.parameters
            if (raw or in_region) and tensor.HasField("contents"):
                raise RequestError(f"input {tensor.name!r} has both raw (or shared memory) and typed contents")
            arr = _decode_input(spec, tensor, next(raw_contents) if raw and not in_region else None, regions)
            if rows < 0:
                rows = arr.shape[0]
            elif arr.shape[0] != rows:
                raise RequestError(f"input {tensor.name!r} has batch size {arr.shape[0]}, other inputs have {rows}")
            arrays[tensor.name] = arr
        for name in self._inputs:
            if name not in arrays:
                raise RequestError(f"missing input {name!r}")
        if rows == 0:
            raise RequestError(f"input {tensors[0].name!r} has an empty batch")
        if request.outputs:
            names = [o.name for o in request.outputs]
            for name in names:
                if name not in self._outputs:
                    raise RequestError(f"unknown output {name!r}; the model has {self._all_outputs}")
        else:
            names = self._all_outputs
        return arrays, rows, names

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            return await self._answer(request)
        except _Refused as e:
            await context.abort(e.code, e.message)

    async def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        """Triton's streaming inference: one response per request, in request order; a request that
        fails is answered with ``error_message`` and the stream goes on.

        Requests are answered concurrently (up to :data:`STREAM_WINDOW`), so a client that sends
        without waiting gets them batched together; answers still go out in order. Takes requests
        as bytes (parsed here, so a malformed one fails alone) or as ``ModelInferRequest``.
        """
        window = asyncio.Semaphore(STREAM_WINDOW)
        answers: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()  # bounded by `window`

        async def read() -> None:
            try:
                async for message in request_iterator:
                    await window.acquire()
                    answers.put_nowait(asyncio.ensure_future(self._stream_answer(message)))
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                try:
                    response = await answer
                finally:
                    window.release()
                yield response
            await reader  # a broken request stream ends the call with its error
        finally:  # the client went away or the server is stopping: drop what is still running
            reader.cancel()
            while not answers.empty():
                if (answer := answers.get_nowait()) is not None:
                    answer.cancel()

    async def _stream_answer(self, message: bytes | service_pb2.ModelInferRequest) -> Any:
        if isinstance(message, bytes):
            try:
                message = service_pb2.ModelInferRequest.FromString(message)
            except DecodeError as e:
                return service_pb2.ModelStreamInferResponse(
                    error_message=f"malformed request: not a valid inference.ModelInferRequest ({e})"
                )
        try:
            return service_pb2.ModelStreamInferResponse(infer_response=await self._answer(message))
        except _Refused as e:
            error = e.message
        except Exception as e:  # a bug of ours must not end the other requests' stream
            log.exception("streamed request %r failed", message.id)
            error = f"internal error: {e}"
        # The request's identity beside the error, so a client reading the raw stream can match them up.
        echo = service_pb2.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version, id=message.id
        )
        return service_pb2.ModelStreamInferResponse(error_message=error, infer_response=echo)

    async def _answer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        """Answer one inference request (of ModelInfer or ModelStreamInfer), counted in the metrics and
        statistics; raises ``_Refused`` with the status code and message when it cannot."""
        metrics = self.metrics
        received = time.monotonic_ns()
        outcome = "error"
        metrics.in_flight.inc()
        try:
            response, rows = await self._infer(request, received)
            outcome = "ok"
            metrics.rows.inc(rows)
            return response
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except _Refused as e:
            outcome = e.outcome
            raise
        finally:
            elapsed = time.monotonic_ns() - received
            metrics.in_flight.dec()
            metrics.requests.labels(outcome).inc()
            metrics.latency.observe(elapsed / 1e9)
            if outcome not in ("ok", "not_found"):  # successes are recorded with their parts
                self.stats.record_failure(elapsed)

    def output_placements(self, request: service_pb2.ModelInferRequest) -> dict[str, Placement]:
        """The requested outputs to write into a shared memory region, checked; RequestError if bad."""
        placements: dict[str, Placement] = {}
        for output in request.outputs:
            if self.regions is None:
                if "shared_memory_region" in output.parameters:
                    raise RequestError(_SHARED_MEMORY_OFF)
                continue
            try:
                placement = self.regions.placement(f"output {output.name!r}", output.parameters, None)
            except RegionError as e:
                raise RequestError(str(e)) from None
            if placement is not None:
                placements[output.name] = placement
        return placements

    async def _infer(self, request, received: int) -> tuple[service_pb2.ModelInferResponse, int]:
        if not self._serves(request.model_name, request.model_version):
            message = self._not_found_message(request.model_name, request.model_version)
            raise _Refused("not_found", grpc.StatusCode.NOT_FOUND, message)
        try:
            arrays, rows, names = self.decode(request)
            placements = self.output_placements(request)
        except RequestError as e:
            raise _Refused("invalid", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        decoded = time.monotonic_ns()
        try:
            served = await self.batcher.infer_timed(arrays, rows)
        except BatcherStopped as e:  # the client may retry on another teacher
            raise _Refused("unavailable", grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except Exception as e:
            raise _Refused("error", grpc.StatusCode.INTERNAL, f"model {self.model_name!r} failed: {e}") from None
        encoding = time.monotonic_ns()
        response = service_pb2.ModelInferResponse(
            model_name=self.model_name, model_version=MODEL_VERSION, id=request.id
        )
        for name in names:
            arr = served.outputs[name]
            response.outputs.add(name=name, datatype=self._outputs[name].datatype, shape=arr.shape)
            placement = placements.get(name)
            if placement is None:
                # tobytes() copies a slice of the batch output once, in C order, as OIP wants.
                response.raw_output_contents.append(arr.tobytes())
                continue
            if arr.nbytes > placement.byte_size:
                raise _Refused(
                    "invalid",
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output {name!r} has {arr.nbytes} bytes ({arr.dtype}{list(arr.shape)}), more than the "
                    f"byte_size {placement.byte_size} given in shared memory region {placement.region.name!r}",
                )
            # The model's output straight into the client's region: one copy, no serialization.
            try:
                placement.write(f"output {name!r}", arr)
            except RegionError as e:
                raise _Refused("invalid", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            if len(placements) < len(names):  # raw contents stay aligned with the outputs
                response.raw_output_contents.append(b"")
        done = time.monotonic_ns()
        batch = served.batch
        self.stats.record_success(
            total_ns=done - received,
            queue_ns=served.queue_ns,
            input_ns=decoded - received + batch.input_ns,
            infer_ns=batch.infer_ns,
            output_ns=batch.output_ns + done - encoding,
        )
        return response, rows


class _Refused(Exception):
    """An inference request answered with an error status; ``outcome`` labels it in the metrics.

    Private, not in errors.py: ``TeacherServer._answer`` raises it and the servicer's methods beside
    it turn it into the call's status; it never leaves this module."""

    def __init__(self, outcome: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.outcome, self.code, self.message = outcome, code, message


@dataclass(frozen=True)
class ServerOptions:
    """How a teacher server serves its model: the keyword options of :class:`InferenceServer`,
    :func:`serve`, :func:`run_server` and :func:`running_server`, named and defaulted here only.

    ``token`` protects the :data:`PROTECTED_METHODS`, ``tls`` adds TLS (mTLS with a CA),
    ``metrics_listen`` serves Prometheus ``/metrics`` on that ``HOST:PORT``. ``pad_variable=False``
    never merges requests that differ in a ``-1`` dim (see :mod:`~distill_reader.serving.batcher`).
    ``shared_memory=False`` turns the system shared-memory extension off (not announced, refused).
    """

    model_name: str = "teacher"
    max_batch: int = 64
    max_delay_ms: float = 2.0
    instances: int = 1
    pad_variable: bool = True
    max_message_bytes: int = MAX_MESSAGE_BYTES
    token: Secret | None = None
    tls: TlsFiles | None = None
    metrics_listen: str | None = None
    shared_memory: bool = True


class InferenceServer:
    """A started-and-stopped OIP gRPC server for one backend (the async building block); ``options``
    are :class:`ServerOptions`' fields (an unknown one is a TypeError)."""

    def __init__(self, backend: Backend, listen: str = DEFAULT_LISTEN, **options: Any) -> None:
        self.options = ServerOptions(**options)
        self._host, _ = require_hostport(listen, "--listen", allow_port_zero=True)
        self.listen = listen
        self.batcher = DynamicBatcher(
            backend,
            max_batch=self.options.max_batch,
            max_delay_ms=self.options.max_delay_ms,
            instances=self.options.instances,
            pad_variable=self.options.pad_variable,
        )
        self.metrics = TeacherMetrics()
        self.metrics.watch_queue(lambda: self.batcher.queued_requests, lambda: self.batcher.queued_rows)
        self.servicer = TeacherServer(
            backend,
            self.batcher,
            model_name=self.options.model_name,
            metrics=self.metrics,
            shared_memory=self.options.shared_memory,
        )
        self.batcher.on_batch = self._on_batch
        self.address: str | None = None
        #: ``host:port`` of ``/metrics`` once started with ``metrics_listen``.
        self.metrics_address: str | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None

    def _on_batch(self, timing: BatchTiming) -> None:
        self.metrics.observe_batch(timing.rows, timing.seconds, timing.padding)
        self.servicer.stats.record_batch(timing)

    async def start(self) -> str:
        """Bind, start serving and return the bound ``host:port`` (port 0 picks a free one)."""
        options = self.options
        grpc_options = [
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.max_receive_message_length", options.max_message_bytes),
            # Two servers on one port would split the traffic silently.
            ("grpc.so_reuseport", 0),
        ]
        interceptors = []
        if options.token is not None:
            refused = self.metrics.requests.labels("unauthenticated")

            def on_refused(method: str) -> None:
                if method in _INFER_METHODS:
                    refused.inc()

            interceptors.append(TokenInterceptor(options.token, "this teacher", PROTECTED_METHODS, on_refused))
        server = grpc.aio.server(options=grpc_options, interceptors=interceptors)
        # strict_handler serves the unary calls; the one bidirectional stream takes raw bytes and
        # parses each request itself, so a malformed one fails alone (see ModelStreamInfer).
        stream = grpc.stream_stream_rpc_method_handler(
            self.servicer.ModelStreamInfer,
            response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                strict_handler(self.servicer, SERVICE),
                grpc.method_handlers_generic_handler(SERVICE.full_name, {"ModelStreamInfer": stream}),
            )
        )
        try:
            port = add_port(server, self.listen, options.tls)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {self.listen}: {e}") from None
        if port == 0:  # older grpcio report a failed bind this way
            raise OSError(f"cannot listen on {self.listen}")
        if options.metrics_listen:
            self._metrics_http = MetricsHttpServer(self.metrics.registry, options.metrics_listen)
            self.metrics_address = self._metrics_http.address
        warn_if_exposed(self.listen, options.token, "the teacher server", log)
        await self.batcher.start()
        await server.start()
        self._server = server
        self.address = f"{self._host}:{port}"
        self.servicer.ready = True
        log.info(
            "serving model %r on %s (%s, token %s, metrics %s)",
            options.model_name,
            self.address,
            "TLS" if options.tls else "plaintext",
            "required" if options.token else "not required",
            self.metrics_address,
        )
        return self.address

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace`` seconds, then stop."""
        self.servicer.ready = False
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.batcher.stop()
        if self._metrics_http is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._metrics_http.close)
            self._metrics_http = None


async def serve(
    backend: Backend,
    listen: str = DEFAULT_LISTEN,
    *,
    on_started: OnStarted | None = None,
    stop_event: asyncio.Event | None = None,
    grace: float = 1.0,
    **options: Any,
) -> None:
    """Serve ``backend`` until ``stop_event`` is set (or the task is cancelled), then stop cleanly.

    ``options``: :class:`ServerOptions`. ``on_started(address)`` is awaited once the server accepts
    requests (e.g. to register the teacher with discovery); if it raises, the server stops and the
    error propagates.
    """
    server = InferenceServer(backend, listen, **options)
    stop_event = stop_event or asyncio.Event()
    try:
        address = await server.start()
        if on_started is not None:
            await on_started(address)
        await stop_event.wait()
    finally:
        await server.stop(grace)


def run_server(backend: Backend, listen: str = DEFAULT_LISTEN, **kwargs: Any) -> None:
    """Serve ``backend`` in this (main) thread until SIGINT or SIGTERM; takes :func:`serve`'s arguments."""
    address, received = [listen], []
    on_started = kwargs.pop("on_started", None)

    async def started(bound: str) -> None:
        address[0] = bound
        if on_started is not None:
            await on_started(bound)

    def on_signal(sig: signal.Signals) -> None:
        if not received:
            received.append(sig)
            log.info("teacher server on %s stopping (%s)", address[0], sig.name)

    run_until_signal(lambda stop: serve(backend, listen, stop_event=stop, on_started=started, **kwargs), on_signal)
    if received:
        log.info("teacher server on %s stopped", address[0])


_START_TIMEOUT_S = 60.0  # running_server: binding the ports and starting the model's instances


@contextlib.contextmanager
def running_server(backend: Backend, listen: str = "127.0.0.1:0", **options: Any) -> Iterator[str]:
    """Run a server in a background thread for the ``with`` block; yields its ``host:port``.

    ``options``: :class:`ServerOptions`. Errors at start-up (e.g. the port is taken) are raised here.
    """
    background = BackgroundServer("teacher server", lambda: InferenceServer(backend, listen, **options))
    server = background.start(_START_TIMEOUT_S).server
    try:
        assert server is not None and server.address is not None
        yield server.address
    finally:
        background.stop()
