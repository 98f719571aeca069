"""Grouping a slot's rows by length, so that teachers compute few padding tokens.

A d_batch is sent padded to its longest row, and a teacher's time grows with the padded tokens it
computes. Sorting a slot's rows by length before cutting them into d_batches keeps rows of similar
length together: with lengths uniform in 8-64 and d_batches of 16 out of 256 rows, teachers compute
about 5 % more tokens than the real ones, against about 65 % more for d_batches in input order. Batches are still
yielded in input order: only the requests are regrouped.
"""

from __future__ import annotations

import numpy as np


def group_by_length(lengths: np.ndarray, d_batch_size: int) -> list[np.ndarray]:
    """The row indices of ``lengths`` cut into d_batches of rows of similar length (longest first,
    so the slowest requests start first); every row is in exactly one group."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + d_batch_size] for i in range(0, len(order), d_batch_size)]
