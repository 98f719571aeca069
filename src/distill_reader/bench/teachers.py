"""Simulated teachers for the benchmarks, served by the built-in teacher server as separate processes.

* :func:`simulated_gpu`: a "GPU" teacher that takes ``a + b·n`` ms for a batch of ``n`` rows, by
  sleeping (it costs no CPU, so the limit is known exactly). ``a`` and ``b`` come from the
  environment variables ``DISTILL_BENCH_A_MS`` and ``DISTILL_BENCH_B_MS``::

      DISTILL_BENCH_A_MS=50 DISTILL_BENCH_B_MS=0.5 python -m distill_reader teacher serve \\
          --model distill_reader.bench.teachers:simulated_gpu --max-batch 64 --instances 1

  With ``--instances 1`` the server runs one batch at a time, so one teacher's capacity at its
  max batch ``m`` is exactly ``m / (a + b·m)`` rows per millisecond.
* :func:`zero_cost`: answers at once (zeros): the transport ceiling.

Network latency (the ``latency`` scenario) must delay each request without occupying the "GPU".
The built-in server runs the model in the batcher's instance thread, one batch at a time, so a
sleep inside the model would be GPU time. Instead ``python -m distill_reader.bench.teachers
--latency-ms MS -- distill teacher serve …`` serves what that command would, with the same
:class:`InferenceServer`, but its ``ModelInfer`` handler first awaits ``asyncio.sleep(latency)`` on
the server's event loop: each request reaches the batcher ``--latency-ms`` later, and any number of
requests wait at once, as they would on a slow network link.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import numpy as np

from distill_reader.rpc import stop_on_signals
from distill_reader.serving.backends.python import teacher_model

IMG_SHAPE = (1, 28, 28)
N_CLASSES = 10
A_ENV = "DISTILL_BENCH_A_MS"
B_ENV = "DISTILL_BENCH_B_MS"

_A_S = float(os.environ.get(A_ENV, "0")) / 1000.0
_B_S = float(os.environ.get(B_ENV, "0")) / 1000.0


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (N_CLASSES,))])
def simulated_gpu(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sleeps ``a + b·n`` ms (``DISTILL_BENCH_A_MS``, ``DISTILL_BENCH_B_MS``) for ``n`` rows."""
    n = len(batch["img"])
    deadline = time.perf_counter() + _A_S + _B_S * n
    out = np.zeros((n, N_CLASSES), dtype=np.float32)
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
    return {"prediction": out}


SEQ_K = 16  # top-k entries per token of the simulated sequence teacher


@teacher_model(
    inputs=[("tokens", "int64", (-1,))],
    outputs=[("logits_topk_values", "float16", (-1, SEQ_K)), ("logits_topk_indices", "int32", (-1, SEQ_K))],
)
def simulated_sequence_gpu(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A sequence "GPU": sleeps ``a + b·t`` ms for a request of ``t`` padded tokens (rows × the
    longest row), as a transformer's time grows with the padded tokens it computes."""
    tokens = batch["tokens"]
    deadline = time.perf_counter() + _A_S + _B_S * tokens.size
    n, length = tokens.shape
    values = np.zeros((n, length, SEQ_K), dtype=np.float16)
    indices = np.zeros((n, length, SEQ_K), dtype=np.int32)
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
    return {"logits_topk_values": values, "logits_topk_indices": indices}


@teacher_model(inputs=[("img", "float32", IMG_SHAPE)], outputs=[("prediction", "float32", (N_CLASSES,))])
def zero_cost(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Answers at once with zeros."""
    return {"prediction": np.zeros((len(batch["img"]), N_CLASSES), dtype=np.float32)}


def capacity(a_ms: float, b_ms: float, max_batch: int) -> float:
    """Rows per second one simulated teacher serves when every batch is full."""
    return max_batch / ((a_ms + b_ms * max_batch) / 1000.0)


async def _serve_with_latency(spec: str, listen: str, latency_ms: float, max_batch: int, max_delay_ms: float) -> None:
    from distill_reader.serving.backends import load_backend
    from distill_reader.serving.server import InferenceServer

    backend = load_backend(spec)
    server = InferenceServer(backend, listen, max_batch=max_batch, max_delay_ms=max_delay_ms, instances=1)
    servicer = server.servicer
    handler = servicer.ModelInfer
    delay = latency_ms / 1000.0

    async def delayed(request, context):  # noqa: ANN001 - gRPC handler signature
        await asyncio.sleep(delay)  # on the event loop: overlaps with other requests and the model
        return await handler(request, context)

    servicer.ModelInfer = delayed  # registered by start(), which looks the handler up on the instance
    stop = asyncio.Event()
    stop_on_signals(stop)
    address = await server.start()
    print(f"teacher serving on {address} with {latency_ms:g} ms latency per request", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
        backend.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m distill_reader.bench.teachers --latency-ms MS -- COMMAND``: serve what the
    ``distill teacher serve`` command line ``COMMAND`` would (its ``--model``, ``--listen``,
    ``--max-batch``, ``--max-delay-ms``; one instance), each request delayed by MS. It is a prefix of
    that command line, as ``ip netns exec NS`` is, so bench teachers start one way
    (:class:`~distill_reader.bench.processes.TeacherProcesses`)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m distill_reader.bench.teachers",
        description="Serve a model with added per-request latency: prefix a `distill teacher serve` command line.",
    )
    parser.add_argument("--latency-ms", type=float, default=20.0)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if "serve" not in command:
        parser.error("after --: a `distill teacher serve` command line (distill teacher serve --model M --listen H:P)")
    serve = argparse.ArgumentParser(prog="distill teacher serve (under bench.teachers)")
    serve.add_argument("--model", required=True)
    serve.add_argument("--listen", required=True)
    serve.add_argument("--max-batch", type=int, default=64)
    serve.add_argument("--max-delay-ms", type=float, default=2.0)
    serve.add_argument("--instances", type=int, choices=[1], default=1)  # the bench's teachers run one batch at a time
    options = serve.parse_args(command[command.index("serve") + 1 :])
    asyncio.run(
        _serve_with_latency(options.model, options.listen, args.latency_ms, options.max_batch, options.max_delay_ms)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
