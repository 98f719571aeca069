"""PaddlePaddle integration: DistillReader batches as ``paddle.Tensor``s.

``DistillDataset(reader)`` is a ``paddle.io.IterableDataset`` whose every iteration runs one epoch
of the reader and yields a list of tensors (feed vars, then fetch vars). Tensors are made with
``paddle.from_dlpack`` on the reader's numpy arrays, so they share the reader's pool memory (no
copy): like the arrays, they stay valid until ``occupied_capacity`` further batches were taken.
(``paddle.to_tensor`` would copy every batch.) They are CPU tensors; ``.cuda()`` copies one to the
GPU. ``copy=True`` clones each tensor instead (one copy, owned by Paddle, valid forever).

Iterate it directly (zero copy), or through
``paddle.io.DataLoader(DistillDataset(reader, copy=True), batch_size=None, num_workers=0)``. The
DataLoader always prefetches in a thread (a queue of ``prefetch_factor`` batches, even with
``use_buffer_reader=False``) and keeps the tensors it took without copying them, so zero-copy
tensors would be overwritten while they wait in its queue: give it ``copy=True`` (each batch is
cloned as the thread takes it). DataLoader workers add nothing (the reader already batches, in its
own process) and would each start a reader of their own: ``num_workers=0``.

Distributed data parallel: every rank is its own student. Give each rank its own shard of the
data and its own DistillReader; in discover mode each rank registers separately and discovery
spreads the teachers over all ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

try:
    import paddle
    from paddle.io import IterableDataset
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "distill_reader.paddle needs PaddlePaddle: pip install 'distill-reader[paddle]' (or paddlepaddle-gpu)"
    ) from exc

from distill_reader.errors import ConfigError
from distill_reader.reader.distill_reader import DistillReader


class DistillDataset(IterableDataset):
    """A ``paddle.io.IterableDataset`` over a configured :class:`~distill_reader.DistillReader`.

    ``copy=False``: tensors share the reader's pool (valid for ``occupied_capacity`` further
    batches); ``copy=True``: cloned tensors (needed under ``paddle.io.DataLoader``).
    """

    def __init__(self, reader: DistillReader, copy: bool = False) -> None:
        super().__init__()
        self.reader = reader
        self.copy = copy
        self._epoch = reader.distill_reader()

    def __iter__(self) -> Iterator[list[paddle.Tensor]]:
        if paddle.io.get_worker_info() is not None:
            raise ConfigError(
                "DistillDataset runs its own pipeline process: use paddle.io.DataLoader(..., num_workers=0) "
                "or iterate the dataset directly"
            )
        for batch in self._epoch():
            tensors = [paddle.from_dlpack(array) for array in batch]
            if self.copy:
                tensors = [t.clone() for t in tensors]
            yield tensors
