"""Writes the user's samples into batch slots (the feeder's hot path).

Three reader kinds feed it: single samples, lists of samples (row-wise: a sample is a tuple of
per-field arrays) and batches (column-wise: one array per field with a leading batch dimension).
Every value is copied into the slot as soon as the user's reader yields it (a reader may reuse its
buffers). A list of samples is written with one ``np.stack`` per field; only when that fails are
its samples checked one by one, to name the culprit. Each d_batch is reported as soon as its rows
are written, so requests start while the rest of the slot is still being filled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distill_reader.errors import SampleError
from distill_reader.oip import TensorSpec


def describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype.name} array of shape {value.shape}"
    return f"{type(value).__name__} {value!r:.60}"


class SlotFiller:
    """Fills slots from ``acquire()`` and reports every written d_batch and every complete slot.

    ``acquire()`` returns a slot number and its feed arrays (``[batch_size, *shape]`` each), or
    None when the epoch is being stopped. ``on_d_batch(slot, start, count)`` is called when rows
    ``[start, start + count)`` are written; ``on_sealed(slot, rows)`` when the slot is complete (full,
    or the epoch ended), after its last d_batch. ``position`` counts samples in the epoch.
    """

    def __init__(
        self,
        feeds: Sequence[TensorSpec],
        batch_size: int,
        d_batch_size: int,
        acquire: Callable[[], tuple[int, Sequence[np.ndarray]] | None],
        on_d_batch: Callable[[int, int, int], None],
        on_sealed: Callable[[int, int], None],
    ) -> None:
        self._feeds = tuple(feeds)
        self._batch_size = batch_size
        self._d_batch_size = d_batch_size
        self._acquire = acquire
        self._on_d_batch = on_d_batch
        self._on_sealed = on_sealed
        self.slot: int | None = None  # the slot being filled, owned by this filler until sealed
        self._arrays: Sequence[np.ndarray] = ()
        self._filled = 0  # rows written into the slot
        self._dispatched = 0  # rows reported as d_batches
        self.position = 0

    # -- input kinds -------------------------------------------------------------------------
    def adder(self, kind: str) -> Callable[[Any], bool]:
        """The method that takes what a reader of ``kind`` (sample, sample_list, batch) yields."""
        return {"sample": self.add_sample, "sample_list": self.add_samples, "batch": self.add_batch}[kind]

    def add_sample(self, sample: Sequence[Any]) -> bool:
        """Add one sample; False when the epoch is being stopped."""
        self._check_arity(sample, self.position)
        if self.slot is None and not self._next_slot():
            return False
        row = self._filled
        for field, (spec, dst, value) in enumerate(zip(self._feeds, self._arrays, sample)):
            if isinstance(value, np.ndarray) and value.dtype == spec.dtype and value.shape == spec.shape:
                dst[row] = value
            else:
                dst[row] = self._check_value(spec, field, value, self.position)
        self._advance(1)
        return True

    def add_samples(self, samples: Sequence[Sequence[Any]]) -> bool:
        """Add a list of samples."""
        if not isinstance(samples, (list, tuple)):
            raise SampleError(
                f"the sample list generator yielded a {type(samples).__name__}; expected a list of samples"
            )
        for index, sample in enumerate(samples):
            self._check_arity(sample, self.position + index)
        done = 0
        while done < len(samples):
            if self.slot is None and not self._next_slot():
                return False
            chunk = samples[done : done + self._batch_size - self._filled]
            self._write_rows(chunk)
            done += len(chunk)
            self._advance(len(chunk))
        return True

    def add_batch(self, fields: Sequence[Any]) -> bool:
        """Add a column-wise batch: one array per feed var, leading batch dimension."""
        self._check_arity(fields, None)
        columns = [self._check_column(spec, value) for spec, value in zip(self._feeds, fields)]
        sizes = {len(c) for c in columns}
        if len(sizes) != 1:
            raise SampleError(
                f"batch at sample {self.position}: fields have different batch sizes "
                f"{[len(c) for c in columns]} ({', '.join(s.name for s in self._feeds)})"
            )
        n, done = sizes.pop(), 0
        while done < n:
            if self.slot is None and not self._next_slot():
                return False
            take = min(self._batch_size - self._filled, n - done)
            for dst, column in zip(self._arrays, columns):
                dst[self._filled : self._filled + take] = column[done : done + take]
            done += take
            self._advance(take)
        return True

    def finish(self) -> None:
        """The epoch's input ended: hand over the last, short slot."""
        if self.slot is not None:
            self._seal()

    # -- mechanics ---------------------------------------------------------------------------
    def _next_slot(self) -> bool:
        acquired = self._acquire()
        if acquired is None:
            return False
        self.slot, self._arrays = acquired
        self._filled = self._dispatched = 0
        return True

    def _advance(self, rows: int) -> None:
        self._filled += rows
        self.position += rows
        while self._filled - self._dispatched >= self._d_batch_size:
            self._dispatch(self._d_batch_size)
        if self._filled == self._batch_size:
            self._seal()

    def _dispatch(self, count: int) -> None:
        assert self.slot is not None
        self._on_d_batch(self.slot, self._dispatched, count)
        self._dispatched += count

    def _seal(self) -> None:
        assert self.slot is not None
        if self._filled > self._dispatched:  # the slot's last, short d_batch
            self._dispatch(self._filled - self._dispatched)
        slot, rows = self.slot, self._filled
        self.slot, self._arrays = None, ()
        self._on_sealed(slot, rows)

    def _write_rows(self, samples: Sequence[Sequence[Any]]) -> None:
        start, end = self._filled, self._filled + len(samples)
        for field, (spec, dst) in enumerate(zip(self._feeds, self._arrays)):
            try:
                np.stack([sample[field] for sample in samples], out=dst[start:end], casting="no")
            except (ValueError, TypeError):
                # Slow path: convert plain Python values, and name the first sample that is wrong.
                for row, sample in enumerate(samples):
                    dst[start + row] = self._check_value(spec, field, sample[field], self.position + row)

    def _check_arity(self, sample: Any, index: int | None) -> None:
        if not isinstance(sample, (list, tuple)) or len(sample) != len(self._feeds):
            what = f"sample {index}" if index is not None else f"batch at sample {self.position}"
            got = f"{len(sample)} fields" if isinstance(sample, (list, tuple)) else f"a {type(sample).__name__}"
            raise SampleError(
                f"{what} has {got}; expected {len(self._feeds)} "
                f"({', '.join(s.name for s in self._feeds)}, as in [feed] feed_vars)"
            )

    @staticmethod
    def _check_value(spec: TensorSpec, field: int, value: Any, index: int) -> np.ndarray:
        if isinstance(value, np.ndarray):
            if value.dtype != spec.dtype:
                raise SampleError(
                    f"sample {index}, field {field} ({spec.name!r}): dtype {value.dtype.name}, "
                    f"expected {spec.dtype.name}"
                )
            array = value
        else:
            try:
                array = np.asarray(value, dtype=spec.dtype)
            except (ValueError, TypeError) as exc:
                raise SampleError(
                    f"sample {index}, field {field} ({spec.name!r}): cannot convert {describe(value)} "
                    f"to {spec.dtype.name}: {exc}"
                ) from None
        if array.shape != spec.shape:
            raise SampleError(
                f"sample {index}, field {field} ({spec.name!r}): shape {array.shape}, expected {spec.shape}"
            )
        return array

    def _check_column(self, spec: TensorSpec, value: Any) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            value = np.asarray(value, dtype=spec.dtype)
        if value.dtype != spec.dtype:
            raise SampleError(
                f"batch at sample {self.position}, field {spec.name!r}: dtype {value.dtype.name}, "
                f"expected {spec.dtype.name}"
            )
        if value.ndim != len(spec.shape) + 1 or value.shape[1:] != spec.shape:
            raise SampleError(
                f"batch at sample {self.position}, field {spec.name!r}: shape {value.shape}, "
                f"expected (n, {', '.join(map(str, spec.shape))})"
            )
        return value
