"""The knowledge store: teacher outputs captured once, reused across epochs and students.

``[store]`` in the reader's config (docs/store.md). :mod:`~distill_reader.knowledge.layout` is the
format on disk, :mod:`~distill_reader.knowledge.session` the pipeline process's side (lookups into
and records from the batch pool), :mod:`~distill_reader.knowledge.commands` ``distill store``.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
"""
