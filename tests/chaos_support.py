"""Helpers for the fault-injection, torture and fuzz tests (no tests here).

The scenarios are ``chaos_scenarios`` (``chaos_report.py`` runs them with long sizes); the wrong
teachers are ``fault_injectors``; teacher, discovery, Redis and etcd processes are started by
:mod:`distill_reader.bench.processes`.
"""

from __future__ import annotations

import os

import pytest
from chaos_scenarios import FaultResult
from conftest import live_parents

# Long versions: `DISTILL_SLOW_TESTS=1 pytest -m slow`; `python tests/chaos_report.py` runs the
# scenarios long too.
RUN_SLOW = bool(os.environ.get("DISTILL_SLOW_TESTS"))


def slow(test):
    """Mark ``test`` slow: skipped unless ``DISTILL_SLOW_TESTS=1``."""
    skip = pytest.mark.skipif(not RUN_SLOW, reason="slow: set DISTILL_SLOW_TESTS=1")
    return pytest.mark.slow(skip(test))


def assert_clean(result: FaultResult) -> None:
    """Every sample exactly once, with the right output, and no error."""
    print(f"\n{result.fault}: {result.to_json()}")
    assert result.error == "", result.error
    assert result.samples > 0
    assert (result.lost, result.duplicated, result.wrong) == (0, 0, 0), result
    assert result.delivered == result.samples


def fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    parents = live_parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found
