"""Dynamic batching: concurrent requests merged into model batches, like a GPU server does.

Lifecycle: ``start()`` starts one thread per model instance; ``infer()`` (on the event loop)
queues a request and awaits its future; each instance thread takes queued requests in arrival
order, runs one batch at a time and hands the outputs back to the loop with one callback per
batch, which resolves each request's future with its slice. ``stop()`` wakes the threads, fails
what is still queued and waits a bounded time for the threads to end.

Why threads and not asyncio tasks: forming batches and running the model off the loop means the
loop only queues requests and resolves futures, so it keeps accepting under load, and the next
batch starts without waiting for the loop's attention (one hop per batch instead of several).

Batch forming: an instance waits for the first request, then for more until ``max_batch`` rows
are queued or ``max_delay_ms`` has passed since the oldest queued request arrived. While every
instance is busy, requests pile up and the next batch is formed from them at once. A request
larger than ``max_batch`` runs alone; requests are never split.

Variable-length requests: for a sequence model (see :func:`paddable`), requests that differ only
in ``-1`` dims are merged too (``pad_variable``, the default): each input is padded with zeros to
the batch's longest along each ``-1`` dim, and each request gets its outputs cut back: an output
dim that is ``-1`` in the model's spec takes the request's own size of the first variable dim of
the first input that has one (per-token outputs, the reader's rule). The model must give padded
positions no influence on real ones (causal, or masked by a ``<var>_length`` input the client
sends, which is fixed-shape and merged like any input). A model whose variable outputs turn out
not to follow the padded length (outputs with lengths of their own) is detected at its first
padded batch: that batch's requests run again one by one and padding is turned off for good.
Requests of other models are merged only when their shapes are equal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from distill_reader.errors import BatcherStopped
from distill_reader.serving.backends.base import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchTiming:
    """How one successful model batch went; times in ns of ``time.monotonic_ns``."""

    #: Rows in the batch (its batch size).
    rows: int
    #: Merging the requests' inputs into one batch.
    input_ns: int
    #: The backend's run, with the check of its output shapes.
    infer_ns: int
    #: Splitting the outputs back into one slice per request.
    output_ns: int
    #: Positions added by padding (rows x positions along the length dim; 0 when nothing was padded).
    padding: int = 0

    @property
    def seconds(self) -> float:
        """The whole batch, merge to split."""
        return (self.input_ns + self.infer_ns + self.output_ns) / 1e9


@dataclass(frozen=True)
class Served:
    """One request's outputs, how long it waited in the queue and the batch it ran in."""

    outputs: dict[str, np.ndarray]
    queue_ns: int
    batch: BatchTiming


@dataclass(eq=False)
class _Request:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    arrival_ns: int
    sample_shapes: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.sample_shapes = tuple(a.shape[1:] for a in self.inputs.values())


class _OwnLengths(ValueError):
    """A padded batch's variable output does not have the padded length.

    Private, not in errors.py: ``_split`` raises it and ``_run`` catches it (to stop merging and
    run the batch's requests alone); it never leaves this module."""


def _length_dim(backend: Backend) -> tuple[str, int] | None:
    """The first ``-1`` dim of the first input with one, as ``(name, batch axis)``."""
    for spec in backend.inputs:
        if -1 in spec.shape:
            return spec.name, spec.shape.index(-1) + 1
    return None


def paddable(backend: Backend) -> bool:
    """Whether requests of different lengths may be merged by padding: every input with a ``-1`` dim
    has one only (rows of tokens, frames: sequences), and the model says padding is its business,
    with a ``-1`` output dim (per-token outputs, cut back per request) or an INT64 ``<var>_length``
    input. Not, say, an image model with a ``-1`` height and width and a fixed output, which padding
    would change silently."""
    variable = [s for s in backend.inputs if -1 in s.shape]
    if not variable or any(s.shape.count(-1) > 1 for s in variable):
        return False
    lengths = {f"{s.name}_length" for s in variable}
    return any(-1 in s.shape for s in backend.outputs) or any(
        s.name in lengths and s.datatype == "INT64" for s in backend.inputs
    )


class DynamicBatcher:
    """Queues requests for ``backend`` and runs them in merged batches, ``instances`` at a time."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int = 64,
        max_delay_ms: float = 2.0,
        instances: int = 1,
        pad_variable: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.instances = instances
        #: Where a request's length is read: the first ``-1`` dim of the first input with one
        #: (``(name, axis)`` with the batch dim counted), or None for a model of fixed shapes.
        self.length_dim = _length_dim(backend)
        #: Whether requests of different variable sizes are merged by padding.
        self.pad_variable = pad_variable and paddable(backend)
        # The batch axes of each output's -1 dims: cut back to each request's length.
        self._variable_axes = {s.name: tuple(i + 1 for i, d in enumerate(s.shape) if d == -1) for s in backend.outputs}
        # Shared between the loop (appends) and the instance threads (take); guarded by _cond.
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_rows = 0
        self._cond = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        #: Counters for stats and tests: batches run and rows in them; of those, batches merged from
        #: requests of different variable sizes and the positions padding added to them.
        self.batches = 0
        self.rows = 0
        self.padded_batches = 0
        self.padding = 0
        #: Called from the instance threads after each successful batch.
        self.on_batch: Callable[[BatchTiming], None] | None = None

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch."""
        return self._pending_rows

    async def start(self) -> None:
        """Start the instance threads; results are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._threads = [
            threading.Thread(target=self._instance, name=f"teacher-instance-{i}", daemon=True)
            for i in range(self.instances)
        ]
        for t in self._threads:
            t.start()

    async def stop(self, timeout: float = 1.0) -> None:
        """Fail queued requests, stop the threads; waits up to ``timeout`` s for a running batch."""
        with self._cond:
            self._running = False
            pending, self._pending = self._pending, collections.deque()
            self._pending_rows = 0
            self._cond.notify_all()
        for r in pending:
            if not r.future.done():
                r.future.set_exception(BatcherStopped("the teacher server is stopping"))
        threads, self._threads = self._threads, []

        def join() -> None:
            deadline = time.monotonic() + timeout
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))

        if threads:
            await asyncio.get_running_loop().run_in_executor(None, join)

    async def infer(self, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """The model's outputs for one request of ``rows`` rows (arrays with a leading batch dim)."""
        return (await self.infer_timed(inputs, rows)).outputs

    async def infer_timed(self, inputs: dict[str, np.ndarray], rows: int) -> Served:
        """Like :meth:`infer`, with the request's queue time and its batch's timing."""
        if not self._running:
            raise BatcherStopped("the teacher server is not running")
        req = _Request(inputs, rows, self._loop.create_future(), time.monotonic_ns())  # type: ignore[union-attr]
        with self._cond:
            self._pending.append(req)
            self._pending_rows += rows
            self._cond.notify()
        return await req.future

    # --- instance threads ---------------------------------------------------------------------

    def _instance(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._running and not self._pending:
                    cond.wait()
                if not self._running:
                    return
                while self._pending and self._pending_rows < self.max_batch and self._running:
                    # Measured from the oldest queued request, which another instance may have taken.
                    timeout = (self._pending[0].arrival_ns - time.monotonic_ns()) / 1e9 + self.max_delay
                    if timeout <= 0:
                        break
                    cond.wait(timeout)
                batch = self._take()
                if self._pending:
                    cond.notify()  # an idle instance can start on the rest
            if batch:
                self._run(batch)

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        rows = 0
        while self._pending:
            r = self._pending[0]
            # done() here means cancelled by the client while queued (a racy read is harmless:
            # _deliver checks again on the loop).
            if r.future.done():
                self._pending.popleft()
                self._pending_rows -= r.rows
                continue
            if batch and (
                rows + r.rows > self.max_batch or (r.sample_shapes != batch[0].sample_shapes and not self.pad_variable)
            ):
                break
            self._pending.popleft()
            self._pending_rows -= r.rows
            batch.append(r)
            rows += r.rows
            if rows >= self.max_batch:
                break
        return batch

    def _run(self, batch: list[_Request]) -> None:
        rows = sum(r.rows for r in batch)
        started = time.monotonic_ns()
        try:
            inputs, lengths = self._merge(batch)
            merged = time.monotonic_ns()
            outputs = self.backend.infer(inputs)
            for name, arr in outputs.items():
                if arr.ndim == 0 or arr.shape[0] != rows:
                    raise ValueError(f"model output {name!r} has shape {list(arr.shape)}; expected {rows} rows")
            inferred = time.monotonic_ns()
            slices = self._split(batch, outputs, lengths)
            padding = sum(r.rows * (max(lengths) - n) for r, n in zip(batch, lengths, strict=True)) if lengths else 0
            timing = BatchTiming(rows, merged - started, inferred - merged, time.monotonic_ns() - inferred, padding)
            results: list[object] = [
                Served(s, started - r.arrival_ns, timing) for r, s in zip(batch, slices, strict=True)
            ]
        except _OwnLengths as e:
            log.warning("%s; requests of different sizes are no longer merged", e)
            self.pad_variable = False
            for r in batch:
                self._run([r])
            return
        except Exception as e:  # a model error fails this batch only
            log.warning("batch of %d rows failed: %s", rows, e)
            results = [e] * len(batch)
        else:
            self.batches += 1
            self.rows += rows
            if lengths:
                self.padded_batches += 1
                self.padding += padding
            if self.on_batch is not None:
                self.on_batch(timing)
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver, batch, results)  # type: ignore[union-attr]

    def _merge(self, batch: list[_Request]) -> tuple[dict[str, np.ndarray], list[int] | None]:
        """The batch's inputs, and each request's length when they had to be padded (else None)."""
        if len(batch) == 1:
            return batch[0].inputs, None
        if all(r.sample_shapes == batch[0].sample_shapes for r in batch):
            return {k: np.concatenate([r.inputs[k] for r in batch]) for k in batch[0].inputs}, None
        inputs = {}
        for k in batch[0].inputs:
            parts = [r.inputs[k] for r in batch]
            shape = tuple(max(sizes) for sizes in zip(*(p.shape[1:] for p in parts), strict=True))
            if all(p.shape[1:] == shape for p in parts):
                inputs[k] = np.concatenate(parts)
                continue
            padded = np.zeros((sum(len(p) for p in parts), *shape), dtype=parts[0].dtype)
            start = 0
            for p in parts:
                padded[(slice(start, start + len(p)), *(slice(0, d) for d in p.shape[1:]))] = p
                start += len(p)
            inputs[k] = padded
        name, axis = self.length_dim  # type: ignore[misc]  # shapes differ only where a -1 dim is
        return inputs, [r.inputs[name].shape[axis] for r in batch]

    def _split(
        self, batch: list[_Request], outputs: dict[str, np.ndarray], lengths: list[int] | None
    ) -> list[dict[str, np.ndarray]]:
        """Each request's rows of ``outputs``; after padding, its variable dims cut to its length."""
        if len(batch) == 1:
            return [outputs]
        if lengths is not None:
            longest = max(lengths)
            for name, arr in outputs.items():
                for axis in self._variable_axes.get(name, ()):
                    if arr.shape[axis] != longest:
                        raise _OwnLengths(
                            f"model output {name!r} has {arr.shape[axis]} positions along dim {axis} of a batch "
                            f"padded to {longest}"
                        )
        slices, start = [], 0
        for i, r in enumerate(batch):
            part = {}
            for name, arr in outputs.items():
                cut = [slice(start, start + r.rows)] + [slice(None)] * (arr.ndim - 1)
                if lengths is not None:
                    for axis in self._variable_axes.get(name, ()):
                        cut[axis] = slice(0, lengths[i])
                part[name] = arr[tuple(cut)]
            slices.append(part)
            start += r.rows
        return slices

    @staticmethod
    def _deliver(batch: list[_Request], results: list[object]) -> None:
        for r, result in zip(batch, results, strict=True):
            if r.future.done():
                continue
            if isinstance(result, Exception):
                r.future.set_exception(result)
            else:
                r.future.set_result(result)
