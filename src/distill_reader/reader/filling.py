"""Writes the user's samples into batch slots (the feeder's hot path).

Three reader kinds feed it: single samples, lists of samples (row-wise: a sample is a tuple of
per-field arrays) and batches (column-wise: one array per field with a leading batch dimension).
Every value is copied into the slot as soon as the user's reader yields it (a reader may reuse its
buffers). A list of samples is written with one ``np.stack`` per field; only when that fails are
its samples checked one by one, to name the culprit. Each d_batch is reported as soon as its rows
are written, so requests start while the rest of the slot is still being filled.

Variable-length vars (a ``-1`` in their shape) are stored at ``max_length`` in the slot: each row
is written at the start of its space and the rest is zeroed, and its length goes into the var's
length array (the slot's arrays after the feed vars, one per variable var). In a column-wise batch
such a var is either a sequence of per-row arrays, or a padded array whose row lengths follow the
feed vars as extra arrays (the layout of the batches the reader yields).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from distill_reader.errors import SampleError
from distill_reader.oip import TensorSpec


def describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype.name} array of shape {value.shape}"
    return f"{type(value).__name__} {value!r:.60}"


class SlotSource(Protocol):
    """Where a :class:`SlotFiller`'s slots come from (the ledger's free slots)."""

    def acquire(self) -> tuple[int, Sequence[np.ndarray]] | None:
        """A free slot's number and its arrays: the feed vars (``[batch_size, *shape]``, variable
        dimensions at ``max_length``), then the length arrays of the variable vars; None when the
        epoch is being stopped."""


class SlotSink(Protocol):
    """Where a :class:`SlotFiller`'s written rows and slots go (towards the pipeline process)."""

    def written(self, slot: int, start: int, count: int) -> None:
        """Rows ``[start, start + count)`` of ``slot`` are written (one d_batch)."""

    def sealed(self, slot: int, rows: int) -> None:
        """``slot`` is complete (full, or the epoch ended), after its last :meth:`written`. Once
        this returns the sink owns the slot; if it raises, the filler still does (``slot``)."""


class SlotFiller:
    """Fills the slots it takes from ``source`` and passes every written d_batch and every complete
    slot on to ``sink``: the way is one direction. ``position`` counts samples in the epoch."""

    def __init__(
        self,
        feeds: Sequence[TensorSpec],
        batch_size: int,
        d_batch_size: int,
        source: SlotSource,
        sink: SlotSink,
        max_length: int | None = None,
    ) -> None:
        self._feeds = tuple(feeds)
        self._max_length = max_length
        #: field -> index of its length array, for the variable vars
        self._length_of = {f: k for k, f in enumerate(i for i, spec in enumerate(feeds) if spec.variable)}
        self._lengths: Sequence[np.ndarray] = ()
        self._batch_size = batch_size
        self._d_batch_size = d_batch_size
        self._source = source
        self._sink = sink
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
            if field in self._length_of:
                self._write_variable(field, row, value, self.position)
            elif isinstance(value, np.ndarray) and value.dtype == spec.dtype and value.shape == spec.shape:
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
        """Add a column-wise batch: one array per feed var, leading batch dimension (for a variable
        var: a sequence of rows, or a padded array with the row lengths after the feed vars)."""
        lengths: list[np.ndarray | None] = [None] * len(self._length_of)
        if self._length_of and isinstance(fields, (list, tuple)) and len(fields) == len(self._feeds) + len(lengths):
            lengths = [
                self._check_lengths(field, value) for field, value in zip(self._length_of, fields[-len(lengths) :])
            ]
            fields = fields[: len(self._feeds)]
        self._check_arity(fields, None)
        columns = [
            self._variable_column(field, value, lengths[self._length_of[field]])
            if field in self._length_of
            else self._check_column(spec, value)
            for field, (spec, value) in enumerate(zip(self._feeds, fields))
        ]
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
            for field, (dst, column) in enumerate(zip(self._arrays, columns)):
                if field in self._length_of:
                    for row in range(take):
                        self._write_variable(field, self._filled + row, column[done + row], self.position + row)
                else:
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
        acquired = self._source.acquire()
        if acquired is None:
            return False
        self.slot, arrays = acquired
        self._arrays, self._lengths = arrays[: len(self._feeds)], arrays[len(self._feeds) :]
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
        self._sink.written(self.slot, self._dispatched, count)
        self._dispatched += count

    def _seal(self) -> None:
        assert self.slot is not None
        if self._filled > self._dispatched:  # the slot's last, short d_batch
            self._dispatch(self._filled - self._dispatched)
        # The slot stays this filler's until the sink took it: if sealing fails, the feeder still
        # knows it has the slot and hands it back (else it would stay "filling" for good).
        self._sink.sealed(self.slot, self._filled)
        self.slot, self._arrays, self._lengths = None, (), ()

    def _write_rows(self, samples: Sequence[Sequence[Any]]) -> None:
        start, end = self._filled, self._filled + len(samples)
        for field, (spec, dst) in enumerate(zip(self._feeds, self._arrays)):
            if field in self._length_of:
                for row, sample in enumerate(samples):
                    self._write_variable(field, start + row, sample[field], self.position + row)
                continue
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
        array = SlotFiller._convert(spec, field, value, f"sample {index}")
        if array.shape != spec.shape:
            raise SampleError(
                f"sample {index}, field {field} ({spec.name!r}): shape {array.shape}, expected {spec.shape}"
            )
        return array

    def _write_variable(self, field: int, row: int, value: Any, index: int) -> None:
        """Write one row of a variable var at the start of its space, zero the rest, record its length."""
        spec = self._feeds[field]
        array = value if isinstance(value, np.ndarray) and value.dtype == spec.dtype else None
        if array is None:
            array = self._convert(spec, field, value, f"sample {index}")
        where = f"sample {index}, field {field} ({spec.name!r})"
        if array.ndim != len(spec.shape) or any(d not in (-1, a) for d, a in zip(spec.shape, array.shape)):
            raise SampleError(f"{where}: shape {array.shape}, expected {spec.shape} (-1: any length)")
        lengths = {a for d, a in zip(spec.shape, array.shape) if d == -1}
        if len(lengths) > 1:
            raise SampleError(f"{where}: shape {array.shape}: its variable dimensions {spec.shape} disagree")
        length = lengths.pop()
        assert self._max_length is not None
        if length > self._max_length:
            raise SampleError(f"{where}: length {length} is longer than [conf] max_length = {self._max_length}")
        dst = self._arrays[field][row]
        axes = [axis for axis, d in enumerate(spec.shape) if d == -1]
        head = tuple(slice(0, length) if d == -1 else slice(None) for d in spec.shape)
        if len(axes) == 1:
            tail = tuple(slice(length, None) if d == -1 else slice(None) for d in spec.shape)
            dst[tail] = 0
        else:
            dst.fill(0)
        dst[head] = array
        self._lengths[self._length_of[field]][row] = length

    def _variable_column(self, field: int, value: Any, lengths: np.ndarray | None) -> Sequence[Any]:
        """The rows of a variable var in a column-wise batch: a sequence of rows, or a padded array
        cut to the lengths given after the feed vars."""
        spec = self._feeds[field]
        if lengths is None:
            if isinstance(value, np.ndarray) and value.dtype != object:
                raise SampleError(
                    f"batch at sample {self.position}, field {spec.name!r}: a padded array of a variable var "
                    f"needs its row lengths: yield them after the feed vars ({spec.name}_length), or yield "
                    "a list of rows"
                )
            if not isinstance(value, (list, tuple, np.ndarray)):
                raise SampleError(
                    f"batch at sample {self.position}, field {spec.name!r}: expected a list of rows, "
                    f"got {describe(value)}"
                )
            return value
        padded = self._convert(spec, field, value, f"batch at sample {self.position}")
        if padded.ndim != len(spec.shape) + 1 or len(padded) != len(lengths):
            raise SampleError(
                f"batch at sample {self.position}, field {spec.name!r}: shape {padded.shape} for "
                f"{len(lengths)} lengths, expected (n, {', '.join(map(str, spec.shape))})"
            )
        axes = [axis for axis, d in enumerate(spec.shape) if d == -1]
        if lengths.size and lengths.max() > min(padded.shape[1 + a] for a in axes):
            raise SampleError(
                f"batch at sample {self.position}, field {spec.name!r}: a length {int(lengths.max())} is longer "
                f"than the padded array {padded.shape}"
            )
        return [
            row[tuple(slice(0, int(n)) if d == -1 else slice(None) for d in spec.shape)]
            for row, n in zip(padded, lengths)
        ]

    def _check_lengths(self, field: int, value: Any) -> np.ndarray:
        lengths = np.asarray(value)
        name = f"{self._feeds[field].name}_length"
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths < 0).any():
            raise SampleError(
                f"batch at sample {self.position}, field {name!r}: expected one non-negative integer length "
                f"per row, got {describe(value)}"
            )
        return lengths

    @staticmethod
    def _convert(spec: TensorSpec, field: int, value: Any, where: str) -> np.ndarray:
        if isinstance(value, np.ndarray):
            if value.dtype != spec.dtype:
                raise SampleError(
                    f"{where}, field {field} ({spec.name!r}): dtype {value.dtype.name}, expected {spec.dtype.name}"
                )
            return value
        try:
            return np.asarray(value, dtype=spec.dtype)
        except (ValueError, TypeError) as exc:
            raise SampleError(
                f"{where}, field {field} ({spec.name!r}): cannot convert {describe(value)} to {spec.dtype.name}: {exc}"
            ) from None

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
