"""Serve the digits teacher (an ONNX file) with NVIDIA Triton through PyTriton.

Run it with the PyTriton environment's python (see docs/teachers.md), not the project's: PyTriton
needs numpy < 2. Triton's Python stub links libpython, so with a pyenv or other non-system
interpreter start it with ``LD_LIBRARY_PATH`` set to that interpreter's LIBDIR::

    LD_LIBRARY_PATH=$(build/teachers/pytriton-venv/bin/python -c \
        'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))') \
    build/teachers/pytriton-venv/bin/python examples/triton_teacher/serve_digits.py \
        --onnx build/digits.onnx --model-name digits --grpc-port 8001

The model batches (``max_batch_size > 0``, Triton's dynamic batcher on), so its OIP metadata
shapes start with ``-1`` as the reader requires. ``--tag-model NAME`` also serves ``tag``, an exact
model (the tests' ``reader_models.tag``) used to check bit for bit that every row gets its own output.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

TAG_SHAPE = (1, 4, 4)


def tag_rows(img: np.ndarray) -> np.ndarray:
    """Per row, 10 partial sums of the flattened image (a copy of tests/reader_models.tag_rows)."""
    x = img.reshape(len(img), -1).astype(np.float64)
    out = np.stack([x[:, i::10].sum(axis=1) for i in range(10)], axis=1)
    return out.astype(np.float32)


def onnx_model(path: str, threads: int):
    """The ONNX file's first input and output names and shapes, and a batched infer callable."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    feature_shape = tuple(int(d) for d in inp.shape[1:])  # the first dim is the (symbolic) batch
    class_shape = tuple(int(d) for d in out.shape[1:])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (result,) = session.run([out.name], {inp.name: inputs[inp.name]})
        return {out.name: result.astype(np.float32, copy=False)}

    return (inp.name, feature_shape), (out.name, class_shape), infer


@batch
def infer_tag(img: np.ndarray) -> dict[str, np.ndarray]:
    return {"prediction": tag_rows(img)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", help="ONNX model to serve (pixels [-1, 64] -> logits [-1, 10] for digits)")
    parser.add_argument("--model-name", default="digits", help="name of the ONNX model in Triton")
    parser.add_argument("--tag-model", metavar="NAME", help="also serve the exact `tag` model under NAME")
    parser.add_argument("--host", default="127.0.0.1", help="address Triton listens on")
    parser.add_argument("--grpc-port", type=int, default=8001, help="OIP gRPC port (the reader's `servers`)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=256, help="> 0: Triton batches requests")
    parser.add_argument("--max-queue-delay-us", type=int, default=500, help="dynamic batcher's wait for more")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="let readers on this host share their batch pool (Triton's system shared memory, which PyTriton "
        "restricts to its own token by default)",
    )
    args = parser.parse_args()
    if args.onnx is None and args.tag_model is None:
        parser.error("nothing to serve: give --onnx and/or --tag-model")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    config = TritonConfig(
        grpc_address=args.host,
        grpc_port=args.grpc_port,
        http_address=args.host,
        http_port=args.http_port,
        metrics_address=args.host,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
    )
    model_config = ModelConfig(
        batching=True,
        max_batch_size=args.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
    )
    restricted = [e for e in DEFAULT_PROTECTED_ENDPOINTS if not (args.shared_memory and e == "shared-memory")]
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=restricted)) as triton:
        if args.onnx is not None:
            (in_name, in_shape), (out_name, out_shape), infer = onnx_model(args.onnx, args.threads)
            triton.bind(
                model_name=args.model_name,
                infer_func=infer,
                # Per-sample shapes: Triton adds the batch dimension (-1) to the OIP metadata.
                inputs=[Tensor(name=in_name, dtype=np.float32, shape=in_shape)],
                outputs=[Tensor(name=out_name, dtype=np.float32, shape=out_shape)],
                config=model_config,
                strict=True,
            )
        if args.tag_model is not None:
            triton.bind(
                model_name=args.tag_model,
                infer_func=infer_tag,
                inputs=[Tensor(name="img", dtype=np.float32, shape=TAG_SHAPE)],
                outputs=[Tensor(name="prediction", dtype=np.float32, shape=(10,))],
                config=model_config,
                strict=True,
            )
        triton.serve()  # until SIGINT/SIGTERM


if __name__ == "__main__":
    main()
