"""The fleet as its students see it: their last reports, as status figures, Prometheus series and
a few minutes of history for the dashboard.

Each discovery server keeps, in memory, the last report of every student that reports *to it*
(students report to the first of their discovery servers that answers, about once a second, see
``StudentReporter`` in :mod:`distill_reader.discovery.client`). Reports do not go through the
store: with several discovery servers, each one's page and ``/metrics`` show the students reporting
to it (Prometheus scraping every server and summing sees the whole fleet). A report older than
``STALE_S`` is dropped (the student stopped, or reports elsewhere now).

Totals (``distill_student_rows_total``, ``distill_teacher_rows_total``) are the students' own
counts since they started; a student that restarts (a new instance id, or a count that went down)
continues from where its last one ended, so the series stay monotone.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.stores.base import ServiceState

#: the service of fixed-mode readers (they hold no lease; not a valid service name, so never one)
FIXED_SERVICE = "(fixed)"
#: how often students are asked to report (seconds)
REPORT_SECONDS = 1.0
#: a report older than this is dropped
STALE_S = 10.0
#: the dashboard's charts: one point per HISTORY_STEP_S over the last HISTORY_S
HISTORY_S = 300.0
HISTORY_STEP_S = 2.0
_MAX_REASON = 300


@dataclass
class _Student:
    service: str
    student: str
    instance: str
    report: pb.StudentReport
    at: float  # monotonic time of the last report
    # Restart handling: what earlier instances counted before this one (added to its counts).
    rows_base: int = 0
    tokens_base: int = 0
    hits_base: int = 0
    teacher_base: dict[str, int] = field(default_factory=dict)
    teacher_last: dict[str, int] = field(default_factory=dict)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


class Fleet:
    """The last report of each student reporting to this server; a Prometheus collector."""

    def __init__(self, registry: CollectorRegistry | None = None, *, clock=time.monotonic) -> None:
        self._students: dict[tuple[str, str], _Student] = {}
        self._clock = clock
        self._history: dict[str, dict[str, collections.deque]] = {"students": {}, "teachers": {}}
        self._last_sample = -math.inf
        self._pruned = -math.inf
        if registry is not None:
            registry.register(self)

    # --- reports -------------------------------------------------------------------------------

    def report(self, r: pb.StudentReport) -> None:
        """Keep ``r`` as its student's last report."""
        service = r.service_name if r.service_name and not r.fixed else FIXED_SERVICE
        key = (service, r.student_id)
        now = self._clock()
        if now - self._pruned >= STALE_S:  # without --http no one reads the reports: forget here too
            self._prune(now)
        old = self._students.get(key)
        s = _Student(service, r.student_id, r.instance_id, r, now)
        if old is not None:
            prev = old.report
            restarted = old.instance != r.instance_id or r.rows < prev.rows
            s.rows_base = old.rows_base + (prev.rows if restarted else 0)
            s.tokens_base = old.tokens_base + (prev.tokens if restarted or r.tokens < prev.tokens else 0)
            s.hits_base = old.hits_base + (prev.store_hits if restarted or r.store_hits < prev.store_hits else 0)
            s.teacher_base = dict(old.teacher_base)
            s.teacher_last = dict(old.teacher_last)
            if restarted:  # the new instance counts from 0 for every teacher
                for ep, n in s.teacher_last.items():
                    s.teacher_base[ep] = s.teacher_base.get(ep, 0) + n
                s.teacher_last = {}
        for t in r.teachers:
            last = s.teacher_last.get(t.endpoint, 0)
            if t.rows < last:  # the student dropped the teacher and took it again: counts from 0
                s.teacher_base[t.endpoint] = s.teacher_base.get(t.endpoint, 0) + last
            s.teacher_last[t.endpoint] = t.rows
        self._students[key] = s

    def _prune(self, now: float) -> None:
        """Forget the students whose last report is stale."""
        self._pruned = now
        for key in [k for k, s in self._students.items() if now - s.at > STALE_S]:
            del self._students[key]

    def _live(self) -> list[_Student]:
        self._prune(self._clock())
        return sorted(self._students.values(), key=lambda s: (s.service, s.student))

    def students(self, states: dict[str, ServiceState] | None = None) -> list[_Student]:
        """The live reports; with ``states`` (service -> its state in the store), a discover-mode
        student's report only while the store lists the student (it left otherwise)."""
        out = []
        for s in self._live():
            if states is not None and s.service != FIXED_SERVICE:
                state = states.get(s.service)
                if state is None or s.student not in state.students:
                    continue
            out.append(s)
        return out

    # --- status --------------------------------------------------------------------------------

    def add_figures(self, status: dict, states: dict[str, ServiceState]) -> dict:
        """Adds the reported figures to a ``status_dict``: per student ``rows_per_s``,
        ``wait_fraction`` and more; per teacher ``rows_per_s``, latencies, ``quarantined``."""
        services = status["services"]
        by_service: dict[str, list[_Student]] = collections.defaultdict(list)
        for s in self.students(states):
            by_service[s.service].append(s)
        for name in by_service:
            services.setdefault(name, {"teachers": [], "students": []})
        for name, svc in services.items():
            reports = {s.student: s for s in by_service.get(name, [])}
            # The teachers' figures, summed over their students.
            seen: dict[str, list[tuple[str, pb.TeacherFigures]]] = collections.defaultdict(list)
            for s in reports.values():
                for t in s.report.teachers:
                    seen[t.endpoint].append((s.student, t))
            listed = {t["endpoint"] for t in svc["teachers"]}
            for ep in sorted(set(seen) - listed):  # fixed mode, or a teacher discovery dropped
                svc["teachers"].append({"endpoint": ep, "registered": False, "students": [st for st, _ in seen[ep]]})
            for t in svc["teachers"]:
                t.setdefault("registered", True)
                t.update(_teacher_figures(seen.get(t["endpoint"], [])))
            listed_students = {s["id"] for s in svc["students"]}
            for sid in sorted(set(reports) - listed_students):
                svc["students"].append({"id": sid, "teachers": [t.endpoint for t in reports[sid].report.teachers]})
            for st in svc["students"]:
                st.update(_student_figures(reports.get(st["id"]), self._clock()))
        status["reports"] = (
            "Students report to the first of their discovery servers that answers: this server shows "
            "those reporting to it."
        )
        return status

    def history(self) -> dict:
        """Points ``[unix time, rows/s, wait fraction]`` per student and ``[unix time, rows/s,
        p99 ms]`` per teacher (keys ``service/id``), every HISTORY_STEP_S over the last HISTORY_S."""
        return {kind: {k: list(v) for k, v in series.items()} for kind, series in self._history.items()}

    def sample(self, states: dict[str, ServiceState] | None = None) -> None:
        """Add a history point now (at most one per HISTORY_STEP_S)."""
        now = self._clock()
        if now - self._last_sample < HISTORY_STEP_S * 0.9:
            return
        self._last_sample = now
        wall = round(time.time(), 1)
        n = int(HISTORY_S / HISTORY_STEP_S)
        hist = self._history
        teachers: dict[str, list[tuple[str, pb.TeacherFigures]]] = collections.defaultdict(list)
        fresh = set()
        for s in self.students(states):
            key = f"{s.service}/{s.student}"
            fresh.add(key)
            r = s.report
            hist["students"].setdefault(key, collections.deque(maxlen=n)).append(
                [wall, round(_finite(r.rows_per_s), 2), round(min(max(_finite(r.wait_fraction), 0.0), 1.0), 3)]
            )
            for t in r.teachers:
                teachers[f"{s.service}/{t.endpoint}"].append((s.student, t))
        for key, seen in teachers.items():
            fresh.add(key)
            f = _teacher_figures(seen)
            hist["teachers"].setdefault(key, collections.deque(maxlen=n)).append(
                [wall, f["rows_per_s"], f["latency_p99_ms"]]
            )
        for series in hist.values():  # forget what has no point in the window any more
            for key in [k for k, v in series.items() if k not in fresh and (not v or wall - v[-1][0] > HISTORY_S)]:
                del series[key]

    # --- Prometheus ----------------------------------------------------------------------------

    def collect(self):
        students = self._live()
        now = self._clock()
        sl, tl = ["service", "student"], ["service", "teacher", "student"]
        rate = GaugeMetricFamily(
            "distill_student_rows_per_second", "Rows per second the student's training loop took", labels=sl
        )
        tokens = GaugeMetricFamily(
            "distill_student_tokens_per_second", "Tokens per second (variable-length rows)", labels=sl
        )
        wait = GaugeMetricFamily(
            "distill_student_wait_fraction",
            "Share of the student's time its training loop waited for teacher outputs (0 to 1)",
            labels=sl,
        )
        rows = CounterMetricFamily("distill_student_rows", "Rows the student's training loop took", labels=sl)
        hits = CounterMetricFamily("distill_student_store_hits", "Rows read from a knowledge store", labels=sl)
        age = GaugeMetricFamily("distill_student_report_age_seconds", "Age of the student's last report", labels=sl)
        t_rate = GaugeMetricFamily("distill_teacher_rows_per_second", "Rows per second a teacher answered", labels=tl)
        t_rows = CounterMetricFamily("distill_teacher_rows", "Rows a teacher answered for a student", labels=tl)
        t_p50 = GaugeMetricFamily(
            "distill_teacher_latency_p50_seconds", "Median latency of the teacher's recent requests", labels=tl
        )
        t_p99 = GaugeMetricFamily(
            "distill_teacher_latency_p99_seconds", "99th percentile latency of the teacher's recent requests", labels=tl
        )
        t_flight = GaugeMetricFamily("distill_teacher_in_flight", "Requests in flight at the teacher", labels=tl)
        t_quar = GaugeMetricFamily(
            "distill_teacher_quarantined",
            "1 while the student keeps the teacher quarantined (reason: why)",
            labels=[*tl, "reason"],
        )
        for s in students:
            r, labels = s.report, [s.service, s.student]
            rate.add_metric(labels, _finite(r.rows_per_s))
            tokens.add_metric(labels, _finite(r.tokens_per_s))
            wait.add_metric(labels, min(max(_finite(r.wait_fraction), 0.0), 1.0))
            rows.add_metric(labels, s.rows_base + r.rows)
            hits.add_metric(labels, s.hits_base + r.store_hits)
            age.add_metric(labels, now - s.at)
            for ep in sorted(set(s.teacher_last) | set(s.teacher_base)):
                t_rows.add_metric([s.service, ep, s.student], s.teacher_base.get(ep, 0) + s.teacher_last.get(ep, 0))
            for t in r.teachers:
                labels3 = [s.service, t.endpoint, s.student]
                t_rate.add_metric(labels3, _finite(t.rows_per_s))
                if t.has_latency:
                    t_p50.add_metric(labels3, t.latency_p50_ms / 1000)
                    t_p99.add_metric(labels3, t.latency_p99_ms / 1000)
                t_flight.add_metric(labels3, t.in_flight)
                t_quar.add_metric([*labels3, t.quarantined[:_MAX_REASON]], 1.0 if t.quarantined else 0.0)
        yield from (rate, tokens, wait, rows, hits, age, t_rate, t_rows, t_p50, t_p99, t_flight, t_quar)


def _teacher_figures(seen: list[tuple[str, pb.TeacherFigures]]) -> dict:
    """One teacher's figures from what its students report: rows/s and in-flight summed, p50 the
    median of theirs, p99 the worst, quarantined the first reason (and who says so)."""
    lat = [t for _, t in seen if t.has_latency]
    quarantined = {student: t.quarantined for student, t in seen if t.quarantined}
    return {
        "rows_per_s": round(sum(_finite(t.rows_per_s) for _, t in seen), 2),
        "latency_p50_ms": round(statistics.median(t.latency_p50_ms for t in lat), 2) if lat else None,
        "latency_p99_ms": round(max(t.latency_p99_ms for t in lat), 2) if lat else None,
        "in_flight": sum(t.in_flight for _, t in seen),
        "quarantined": next(iter(quarantined.values()))[:_MAX_REASON] if quarantined else None,
        "quarantined_by": {k: v[:_MAX_REASON] for k, v in quarantined.items()},
        "reported_by": [student for student, _ in seen],
    }


def _student_figures(s: _Student | None, now: float) -> dict:
    if s is None:
        return {"reported": False, "rows_per_s": None, "wait_fraction": None}
    r = s.report
    return {
        "reported": True,
        "report_age_s": round(now - s.at, 1),
        "rows_per_s": round(_finite(r.rows_per_s), 2),
        "tokens_per_s": round(_finite(r.tokens_per_s), 2),
        "wait_fraction": round(min(max(_finite(r.wait_fraction), 0.0), 1.0), 3),
        "rows": s.rows_base + r.rows,
        "store_hits": s.hits_base + r.store_hits,
        "teacher_figures": {
            t.endpoint: {
                "rows_per_s": round(_finite(t.rows_per_s), 2),
                "latency_p50_ms": round(t.latency_p50_ms, 2) if t.has_latency else None,
                "latency_p99_ms": round(t.latency_p99_ms, 2) if t.has_latency else None,
                "in_flight": t.in_flight,
                "quarantined": t.quarantined[:_MAX_REASON] or None,
            }
            for t in r.teachers
        },
    }
