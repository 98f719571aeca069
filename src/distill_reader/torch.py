"""PyTorch integration: DistillReader batches as ``torch.Tensor``s.

``DistillDataset(reader)`` is an ``IterableDataset`` whose every iteration runs one epoch of the
reader and yields a list of tensors (feed vars, then fetch vars). Tensors are made with
``torch.from_numpy``, so they share the reader's pool memory (no copy): like the arrays, they stay
valid until ``occupied_capacity`` further batches were taken. ``pin_memory=True`` copies each
batch into page-locked memory instead (one copy, for fast ``.to("cuda", non_blocking=True)``);
where torch has no accelerator to pin memory for (a CPU-only build or machine) the dataset warns and
makes plain copies, which are still independent of the pool.

Iterate it directly, or through ``DataLoader(dataset, batch_size=None, num_workers=0)``: the
reader already batches and already works in its own process, so DataLoader workers add nothing
(and would each start a reader of their own).

Distributed data parallel: every rank is its own student. Give each rank its own shard of the
data (its reader function yields only that rank's samples, e.g. ``samples[rank::world_size]``)
and its own DistillReader; in discover mode each rank registers separately and discovery spreads
the teachers over all ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

try:
    import torch
    from torch.utils.data import IterableDataset
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("distill_reader.torch needs PyTorch: pip install torch") from exc

from distill_reader.errors import ConfigError
from distill_reader.reader.distill_reader import DistillReader


def can_pin_memory() -> bool:
    """Whether ``Tensor.pin_memory()`` works here: it needs an accelerator (CUDA, ROCm, ...)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


class DistillDataset(IterableDataset):
    """An ``IterableDataset`` over a configured :class:`~distill_reader.DistillReader`.

    ``pin_memory=True``: every tensor is a copy, page-locked where :func:`can_pin_memory`.
    """

    def __init__(self, reader: DistillReader, pin_memory: bool = False) -> None:
        super().__init__()
        self.reader = reader
        self.pin_memory = pin_memory
        self._pin = pin_memory and can_pin_memory()
        if pin_memory and not self._pin:
            warnings.warn(
                "DistillDataset(pin_memory=True): torch has no accelerator to pin memory for; "
                "each batch is copied into ordinary memory instead",
                stacklevel=2,
            )
        self._epoch = reader.distill_reader()

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            raise ConfigError(
                "DistillDataset runs its own pipeline process: use DataLoader(..., num_workers=0) "
                "or iterate the dataset directly"
            )
        for batch in self._epoch():
            tensors = [torch.from_numpy(array) for array in batch]
            if self._pin:
                tensors = [t.pin_memory() for t in tensors]
            elif self.pin_memory:
                tensors = [t.clone() for t in tensors]
            yield tensors
