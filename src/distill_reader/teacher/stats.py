"""Statistics of the teachers as the reader's pipeline process sees them (plain, picklable data)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TeacherStats:
    """One teacher: requests in flight now, totals, and latency percentiles of recent requests."""

    endpoint: str
    healthy: bool
    in_flight: int
    requests: int
    failures: int
    latency_ms_p50: float | None
    latency_ms_p90: float | None
    latency_ms_p99: float | None
    #: why the teacher is quarantined (its metadata or answers do not fit the config), else None
    quarantined: str | None = None
    #: rows it answered (and were used) since the reader took it
    rows: int = 0
    #: its teacher group (``[teacher NAME]``); None in a config without groups
    group: str | None = None

    @property
    def name(self) -> str:
        """``group/endpoint`` with groups, else the endpoint."""
        return self.endpoint if self.group is None else f"{self.group}/{self.endpoint}"


class LatencyWindow:
    """The last ``size`` request latencies (seconds) of one teacher."""

    def __init__(self, size: int = 1024) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def percentiles_ms(self) -> tuple[float | None, float | None, float | None]:
        if not self._values:
            return None, None, None
        p50, p90, p99 = np.percentile(np.fromiter(self._values, float), [50, 90, 99]) * 1000
        return float(p50), float(p90), float(p99)
