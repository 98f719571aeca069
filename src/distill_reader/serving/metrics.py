"""Prometheus metrics of a teacher server (``distill teacher serve --metrics HOST:PORT``).

Every server keeps its metrics in its own registry (cheap: a few counter increments per request);
``--metrics`` only decides whether ``/metrics`` is served over HTTP.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from distill_reader.rpc import require_hostport

#: ``outcome`` label values of ``distill_teacher_requests_total``.
OUTCOMES = ("ok", "invalid", "error", "unavailable", "not_found", "unauthenticated", "cancelled")

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TeacherMetrics:
    """The teacher server's metrics in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distill_teacher_requests",
            "Inference requests (ModelInfer, ModelStreamInfer) by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.rows = Counter("distill_teacher_rows", "Rows of successful inference requests", registry=r)
        self.batch_rows = Histogram(
            "distill_teacher_batch_rows",
            "Rows per model batch (after dynamic batching)",
            registry=r,
            buckets=_ROW_BUCKETS,
        )
        self.padded_positions = Counter(
            "distill_teacher_padded_positions",
            "Positions added by padding requests of different variable (-1) sizes into one batch "
            "(rows x positions along the first variable dim)",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "distill_teacher_batch_seconds", "Time the model took per batch", registry=r, buckets=_TIME_BUCKETS
        )
        self.latency = Histogram(
            "distill_teacher_request_seconds",
            "Inference request latency, receipt to answer",
            registry=r,
            buckets=_TIME_BUCKETS,
        )
        self.queue_requests = Gauge(
            "distill_teacher_queue_requests", "Requests queued for the model, not yet in a batch", registry=r
        )
        self.queue_rows = Gauge("distill_teacher_queue_rows", "Rows queued for the model", registry=r)
        self.in_flight = Gauge("distill_teacher_in_flight", "Inference requests being handled", registry=r)

    def watch_queue(self, requests: Callable[[], float], rows: Callable[[], float]) -> None:
        """Read the queue depth from these functions at scrape time."""
        self.queue_requests.set_function(requests)
        self.queue_rows.set_function(rows)

    def observe_batch(self, rows: int, seconds: float, padding: int = 0) -> None:
        """One model batch ran (called from the batcher's instance threads; thread-safe)."""
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)
        if padding:
            self.padded_positions.inc(padding)


class MetricsHttpServer:
    """``/metrics`` of ``registry`` over HTTP on ``listen`` (``HOST:PORT``; port 0 picks one)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, port = require_hostport(listen, "--metrics", allow_port_zero=True)
        try:
            self._httpd, self._thread = start_http_server(port, host.strip("[]"), registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
        self.address = f"{host}:{self._httpd.server_port}"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        with contextlib.suppress(Exception):
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
