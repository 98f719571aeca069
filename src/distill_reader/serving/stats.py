"""Triton-style statistics of the served model, answered by the OIP ``ModelStatistics`` call.

Same meaning as Triton's (``inference.ModelStatistics``), so perf_analyzer, Model Analyzer and
dashboards read them as they read Triton's:

- ``inference_count``: rows inferred (summed batch sizes); ``execution_count``: model batches run;
- ``inference_stats``: per request, ``{count, ns}`` cumulated since start. ``success`` and ``fail``
  span receipt to answer; ``queue`` (waiting for a batch), ``compute_input`` (decoding the request
  and merging the batch), ``compute_infer`` (the model's run of the request's batch) and
  ``compute_output`` (splitting the batch and encoding the answer) are counted for successful
  requests only, so their counts equal ``success.count``;
- ``batch_stats``: per batch size, the batches run and their ``compute_*`` times;
- ``last_inference``: milliseconds since the epoch of the last successful request.

A request fails when it names this model but gets no answer: a bad request, a model error, a
server stopping or a client cancelling. A request for another model is nobody's statistics.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2

from distill_reader.serving.batcher import BatchTiming

_REQUEST_PARTS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def proto(self) -> service_pb2.StatisticDuration:
        return service_pb2.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _Batches:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


class ModelStats:
    """The counters behind ``ModelStatistics``; thread-safe (batches are recorded by the batcher's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = {part: _Duration() for part in _REQUEST_PARTS}
        self._batches: dict[int, _Batches] = {}
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0

    def record_batch(self, timing: BatchTiming) -> None:
        """One model batch ran successfully."""
        with self._lock:
            self._inference_count += timing.rows
            self._execution_count += 1
            batches = self._batches.setdefault(timing.rows, _Batches())
            batches.compute_input.add(timing.input_ns)
            batches.compute_infer.add(timing.infer_ns)
            batches.compute_output.add(timing.output_ns)

    def record_success(self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One request was answered; ``total_ns`` from receipt to answer, the others its parts."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            parts = self._requests
            parts["success"].add(total_ns)
            parts["queue"].add(queue_ns)
            parts["compute_input"].add(input_ns)
            parts["compute_infer"].add(infer_ns)
            parts["compute_output"].add(output_ns)
            self._last_inference_ms = max(self._last_inference_ms, now_ms)

    def record_failure(self, total_ns: int) -> None:
        """One request for this model got no answer after ``total_ns``."""
        with self._lock:
            self._requests["fail"].add(total_ns)

    def proto(self, name: str, version: str) -> service_pb2.ModelStatistics:
        """A consistent snapshot as Triton's ``ModelStatistics`` message."""
        with self._lock:
            return service_pb2.ModelStatistics(
                name=name,
                version=version,
                last_inference=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                inference_stats=service_pb2.InferStatistics(
                    **{part: d.proto() for part, d in self._requests.items()},
                    cache_hit=service_pb2.StatisticDuration(),
                    cache_miss=service_pb2.StatisticDuration(),
                ),
                batch_stats=[
                    service_pb2.InferBatchStatistics(
                        batch_size=size,
                        compute_input=b.compute_input.proto(),
                        compute_infer=b.compute_infer.proto(),
                        compute_output=b.compute_output.proto(),
                    )
                    for size, b in sorted(self._batches.items())
                ],
            )
