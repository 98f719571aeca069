"""Teachers that are wrong in one precise way, for the fault-injection tests: a TCP listener that
never answers (:class:`SilentListener`) and an OIP server whose answers are wrong
(:class:`WrongTeacher`). Teachers that hang or fail are models (``reader_models:hang``,
``reader_models:broken``) served by real ``distill teacher serve`` processes.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from typing import Any

import numpy as np
from reader_models import IMG_SHAPE, N_OUT, tag_rows

from distill_reader.rpc import LoopThread


class SilentListener:
    """A TCP listener that accepts connections and reads everything, but never says a word."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.endpoint = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self.bytes_read = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="silent-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in selector.select(0.1):
                if key.fileobj is self._sock:
                    with contextlib.suppress(OSError):
                        conn, _ = self._sock.accept()
                        conn.setblocking(False)
                        self._conns.append(conn)
                        self.connections += 1
                        selector.register(conn, selectors.EVENT_READ)
                else:
                    conn = key.fileobj
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        self.bytes_read += len(data)
                    else:
                        selector.unregister(conn)
                        conn.close()
        selector.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in [self._sock, *self._conns]:
            with contextlib.suppress(OSError):
                conn.close()


class WrongTeacher:
    """An OIP server (grpc.aio) whose metadata matches the config but whose answers are wrong.

    ``mode``: ``"shape"`` (prediction is ``[n, 9]``), ``"bytes"`` (right shape, half the bytes),
    ``"dtype"`` (FP64), ``"missing"`` (no output), ``"nan"`` (right shape and size, all NaN: caught
    by the reader's finite check). ``"undeclared"``: metadata that lists no tensors (MLServer's
    default for a custom runtime) and right answers; ``"undeclared-shape"``: no tensors declared and
    answers of the wrong shape.
    """

    def __init__(self, mode: str = "shape") -> None:
        self.mode = mode
        self.requests = 0
        self.endpoint = ""
        self._thread = LoopThread("wrong-teacher")
        self._server: Any = None

    def start(self) -> WrongTeacher:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        outer = self

        class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
            async def ServerLive(self, request, context):  # noqa: N802, ANN001, ANN201
                return service_pb2.ServerLiveResponse(live=True)

            async def ServerReady(self, request, context):  # noqa: N802, ANN001, ANN201
                return service_pb2.ServerReadyResponse(ready=True)

            async def ModelReady(self, request, context):  # noqa: N802, ANN001, ANN201
                return service_pb2.ModelReadyResponse(ready=True)

            async def ModelMetadata(self, request, context):  # noqa: N802, ANN001, ANN201
                tensor = service_pb2.ModelMetadataResponse.TensorMetadata
                response = service_pb2.ModelMetadataResponse(name=request.name, platform="chaos", versions=["1"])
                if not outer.mode.startswith("undeclared"):
                    response.inputs.append(tensor(name="img", datatype="FP32", shape=[-1, *IMG_SHAPE]))
                    response.outputs.append(tensor(name="prediction", datatype="FP32", shape=[-1, N_OUT]))
                return response

            async def ModelInfer(self, request, context):  # noqa: N802, ANN001, ANN201
                outer.requests += 1
                n = int(request.inputs[0].shape[0])
                out = service_pb2.ModelInferResponse.InferOutputTensor
                response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                if outer.mode == "missing":
                    return response
                shape, dtype, raw = [n, N_OUT], "FP32", np.zeros((n, N_OUT), np.float32).tobytes()
                if outer.mode == "undeclared":
                    img = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(n, *IMG_SHAPE)
                    raw = tag_rows(img).tobytes()
                elif outer.mode in ("shape", "undeclared-shape"):
                    shape, raw = [n, N_OUT - 1], np.zeros((n, N_OUT - 1), np.float32).tobytes()
                elif outer.mode == "bytes":
                    raw = raw[: len(raw) // 2]
                elif outer.mode == "dtype":
                    dtype, raw = "FP64", np.zeros((n, N_OUT), np.float64).tobytes()
                elif outer.mode == "nan":
                    raw = np.full((n, N_OUT), np.nan, np.float32).tobytes()
                response.outputs.append(out(name="prediction", datatype=dtype, shape=shape))
                response.raw_output_contents.append(raw)
                return response

        async def serve() -> str:
            self._server = grpc.aio.server()
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), self._server)
            port = self._server.add_insecure_port("127.0.0.1:0")
            await self._server.start()
            return f"127.0.0.1:{port}"

        self.endpoint = self._thread.start().run(serve(), 10)
        return self

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._thread.run(self._server.stop(0), 5)
        self._thread.stop(5)
