"""Serve a sequence teacher with top-k outputs from NVIDIA Triton through PyTriton.

The model, ``seq`` by default, takes rows of tokens of any length and each row's real length, and
answers for every position the top-k of its distribution over a vocabulary of 50::

    inputs:  tokens INT64 [-1, -1], tokens_length INT64 [-1]
    outputs: logits_topk_values FP32 (or FP16) [-1, -1, K], logits_topk_indices INT32 [-1, -1, K]

Positions past a row's length are 0 in both outputs. The per-token logits are the exact function of
the tests (``tests/serving_models.seq_logits``), so a test can check every real position.

The top-k is ``distill_reader.serving.topk.topk``, the function behind ``distill teacher serve
--topk`` (it needs only numpy), so run it with the project's ``src`` on ``PYTHONPATH`` and the
PyTriton environment's python (see docs/teachers.md; ``LD_LIBRARY_PATH`` as in serve_digits.py)::

    LD_LIBRARY_PATH=$(build/teachers/pytriton-venv/bin/python -c \\
        'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))') \\
    PYTHONPATH=src build/teachers/pytriton-venv/bin/python examples/triton_teacher/serve_sequences.py \\
        --topk 8 --grpc-port 8001

Why ``max_batch_size`` 0 (Triton's batcher off): a batching model's per-row scalar needs
``dims: [1]`` with ``reshape: {shape: []}``, which PyTriton cannot write; without batching the dims
include the batch dimension, so the metadata reads ``tokens [-1, -1]`` and ``tokens_length [-1]``,
as a student's reader sends them. Each request is a batch already (a reader's d_batch, padded to
its longest row), and Triton's batcher would only merge requests of equal lengths anyway.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from distill_reader.serving.topk import VALUE_DTYPES, VALUE_KINDS, topk

VOCAB = 50


def seq_logits(tokens: np.ndarray) -> np.ndarray:
    """Per-token logits [n, L, VOCAB], causal (a copy of tests/serving_models.seq_logits)."""
    prefix = np.cumsum(tokens, axis=1)
    t = np.arange(tokens.shape[1])
    codes = (prefix[:, :, None] * 31 + t[None, :, None] * 7 + np.arange(VOCAB) * 13) % 97
    return ((codes - 48) / 8).astype(np.float32)


def make_infer(k: int, values: str, temperature: float, dtype: str):
    """The PyTriton infer function: one answer per request, each request a whole padded batch."""

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        answers = []
        for request in requests:
            tokens, lengths = request["tokens"], request["tokens_length"]
            if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
                raise ValueError(f"tokens {list(tokens.shape)} and tokens_length {list(lengths.shape)} disagree")
            top, idx = topk(seq_logits(tokens), k, values=values, temperature=temperature, dtype=dtype)
            past = np.arange(tokens.shape[1]) >= lengths[:, None]
            top[past] = 0
            idx[past] = 0
            answers.append({"logits_topk_values": top, "logits_topk_indices": idx})
        return answers

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", default="seq", help="name of the model in Triton")
    parser.add_argument("--topk", type=int, default=8, metavar="K", help="entries kept per position (< 50)")
    parser.add_argument("--topk-values", choices=VALUE_KINDS, default="logprobs")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the log-probs")
    parser.add_argument("--topk-dtype", choices=VALUE_DTYPES, default="float32")
    parser.add_argument("--host", default="127.0.0.1", help="address Triton listens on")
    parser.add_argument("--grpc-port", type=int, default=8001, help="OIP gRPC port (the reader's `servers`)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args()
    if not 1 <= args.topk < VOCAB:
        parser.error(f"--topk must be in 1..{VOCAB - 1}")
    infer = make_infer(args.topk, args.topk_values, args.temperature, args.topk_dtype)
    infer([{"tokens": np.zeros((1, 1), np.int64), "tokens_length": np.ones(1, np.int64)}])  # bad options fail here
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
    topk_shape = (-1, -1, args.topk)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            # Full shapes, batch dimension first: the model does not batch (see the module doc).
            inputs=[
                Tensor(name="tokens", dtype=np.int64, shape=(-1, -1)),
                Tensor(name="tokens_length", dtype=np.int64, shape=(-1,)),
            ],
            outputs=[
                Tensor(name="logits_topk_values", dtype=np.dtype(args.topk_dtype).type, shape=topk_shape),
                Tensor(name="logits_topk_indices", dtype=np.int32, shape=topk_shape),
            ],
            config=ModelConfig(batching=False),
            strict=True,
        )
        triton.serve()  # until SIGINT/SIGTERM


if __name__ == "__main__":
    main()
