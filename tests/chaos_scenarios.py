"""Fault-injection scenarios: faults injected into a running DistillReader, and what they cost.

Every scenario runs real processes on loopback: ``distill teacher serve`` teachers serving
``reader_models:slow_tag`` (an exact model: each output row is a function of its own input row, and
the label encodes the sample's number), ``distill discovery serve``, ``redis-server``/``etcd``, and,
where the machine allows, a teacher in its own network namespace. A fault is injected at a random
moment of an epoch (``random.Random(seed)``); the epoch is audited batch by batch:

* ``lost``: samples of the epoch that never arrived; ``duplicated``: arrived more than once;
  ``wrong``: arrived with a teacher output that is not the model's output for that very sample;
* ``recover_s``: the longest wait for a batch from the fault on (for "all teachers die, one comes
  back": from the restart), i.e. how long the training loop stalled because of the fault;
* ``error``: the exception that ended the epoch, for the scenarios where no teacher is left
  (``expect_error``) — it must come within ``teacher_timeout`` plus a few seconds, never a hang.

``tests/test_chaos.py`` runs them with small sizes (and long, slow-marked);
``tests/chaos_report.py`` runs them all and prints the report (docs/fault-tolerance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from conftest import READER_CONFIG, TeacherProcesses
from fault_injectors import SilentListener, WrongTeacher
from netns_support import NetnsHosts, netns_available
from reader_models import make_sample, tag_rows

from distill_reader.bench.processes import DiscoveryProcess, StoreProcess
from distill_reader.teacher.local import free_port

SERVICE = "chaos"  # the discovery service of the discover-mode scenarios


def write_config(
    directory: str | os.PathLike[str], servers: Sequence[str] = (), discovery: str = "", require_num: int = 2
) -> Path:
    """A reader config: fixed ``servers``, or discover mode on ``discovery`` (service ``chaos``)."""
    if discovery:
        conf = f"mode = discover\nhost = {discovery}\nservice_name = {SERVICE}\nrequire_num = {require_num}"
    else:
        conf = f"mode = fixed\nservers = {list(servers)!r}"
    path = Path(directory) / f"chaos-{time.monotonic_ns()}.conf"
    path.write_text(READER_CONFIG.format(conf=conf))
    return path


def sample_reader(n: int, start_delay_s: float = 0.0) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """Samples ``0 … n-1``; the first after ``start_delay_s`` (every teacher's workers are then idle)."""
    samples = [make_sample(i) for i in range(n)]

    def reader() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if start_delay_s:
            time.sleep(start_delay_s)
        yield from samples

    return reader


def teacher_fleet(delay_s: float = 0.01) -> TeacherProcesses:
    """Teacher processes serving ``reader_models:slow_tag``, ``delay_s`` a batch (like a GPU); their
    logs (a broken model's tracebacks) are not the report's."""
    env = {"SLOW_TAG_SECONDS": repr(delay_s)}
    return TeacherProcesses("reader_models:slow_tag", env=env, output=subprocess.DEVNULL)


@dataclass
class FaultResult:
    """What one injected fault cost."""

    fault: str
    faults_injected: int = 0
    samples: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    recover_s: float = 0.0
    error: str = ""
    error_after_s: float = 0.0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """Every sample exactly once with the right output (or, when expected, a clear error)."""
        return self.lost == 0 and self.duplicated == 0 and self.wrong == 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Audit:
    """Consumes one epoch's batches, counting what was delivered and when."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = np.zeros(n, dtype=np.int64)
        self.wrong = 0
        self.out_of_order = 0
        self.arrivals: list[float] = []
        self.faults: list[float] = []  # moments faults were injected (or recovery started)
        self.started = time.monotonic()
        self._last_label = -1

    def add(self, batch: Sequence[np.ndarray]) -> None:
        self.arrivals.append(time.monotonic())
        img, label, prediction = batch
        labels = label[:, 0]
        if (labels < 0).any() or (labels >= self.n).any():
            self.wrong += int(len(labels))
            return
        np.add.at(self.seen, labels, 1)
        expected_img = np.stack([make_sample(int(i))[0] for i in labels])
        good = (img.reshape(len(img), -1) == expected_img.reshape(len(img), -1)).all(axis=1)
        good &= (prediction == tag_rows(expected_img)).all(axis=1)
        self.wrong += int((~good).sum())
        if len(labels) and (labels[0] <= self._last_label or (np.diff(labels) <= 0).any()):
            self.out_of_order += 1
        if len(labels):
            self._last_label = int(labels[-1])

    def mark(self) -> float:
        now = time.monotonic()
        self.faults.append(now)
        return now

    def longest_stall(self, since: float | None = None) -> float:
        """The longest wait for a batch from ``since`` (default: the first fault) on."""
        start = since if since is not None else (self.faults[0] if self.faults else None)
        if start is None:
            return 0.0
        stall, previous = 0.0, start
        for t in self.arrivals:
            if t < start:
                continue
            stall = max(stall, t - previous)
            previous = t
        return stall

    def fill(self, result: FaultResult) -> FaultResult:
        result.samples = self.n
        result.delivered = int(self.seen.sum())
        result.lost = int((self.seen == 0).sum())
        result.duplicated = int((self.seen > 1).sum())
        result.wrong = self.wrong + self.out_of_order
        return result


def _reader(
    config: Path, n: int, batch_size: int = 16, d_batch_size: int = 4, start_delay_s: float = 0.0, **options: Any
):
    from distill_reader import DistillReader

    options.setdefault("copy", True)
    dr = DistillReader(str(config), batch_size, d_batch_size, capacity=6, occupied_capacity=1, **options)
    dr.set_sample_generator(sample_reader(n, start_delay_s))
    return dr


def run_epoch(
    dr: Any, n: int, on_step: Callable[[int, Audit], None] | None = None, result: FaultResult | None = None
) -> tuple[Audit, BaseException | None]:
    """One epoch, calling ``on_step(step, audit)`` after each batch; the audit and any error."""
    audit = Audit(n)
    error: BaseException | None = None
    try:
        for step, batch in enumerate(dr.distill_reader()()):
            audit.add(batch)
            if on_step is not None:
                on_step(step, audit)
    except Exception as exc:  # noqa: BLE001 - reported, the caller decides what was expected
        error = exc
        if result is not None:
            result.error = f"{type(exc).__name__}: {exc}"
            result.error_after_s = time.monotonic() - (audit.faults[0] if audit.faults else audit.started)
    return audit, error


# -- the scenarios -----------------------------------------------------------------------------
# Each takes ``n`` (samples per epoch), ``seed`` and a temporary directory, returns a FaultResult.


def kill_one_of_n(tmp: Path, n: int = 2000, seed: int = 0, teachers: int = 3, kills: int = 3) -> FaultResult:
    """SIGKILL a random teacher at random moments, restarting the previous victim in between."""
    rng = random.Random(seed)
    fleet = teacher_fleet()
    result = FaultResult(f"SIGKILL 1 of {teachers} teachers, {kills}× at random moments")
    try:
        endpoints = [fleet.start() for _ in range(teachers)]
        batches = n // 16
        moments = sorted(rng.sample(range(2, max(batches - 2, kills + 3)), kills))
        victims: list[str] = []

        def on_step(step: int, audit: Audit) -> None:
            if step in moments:
                if victims and victims[-1] not in fleet.alive():
                    fleet.restart(victims[-1], wait=False)
                victim = rng.choice([e for e in fleet.alive() if e in endpoints])
                victims.append(victim)
                audit.mark()
                fleet.kill(victim)
                result.faults_injected += 1

        with _reader(write_config(tmp, endpoints), n, request_timeout=5, teacher_timeout=30) as dr:
            started = time.monotonic()
            audit, error = run_epoch(dr, n, on_step, result)
            result.seconds = time.monotonic() - started
            result.recover_s = audit.longest_stall()
            audit.fill(result)
            # The next epoch runs whole, on whoever is up.
            second, error2 = run_epoch(dr, n)
            result.details["next_epoch_clean"] = error2 is None and second.fill(FaultResult("")).clean
            if error is not None or error2 is not None:
                result.error = result.error or f"{type(error2).__name__}: {error2}"
    finally:
        fleet.stop_all()
    return result


def _kill_all(fleet: TeacherProcesses, endpoints: Sequence[str], audit: Audit, result: FaultResult) -> None:
    """SIGKILL the teachers of ``endpoints`` now, counting the faults from this moment."""
    audit.mark()
    for endpoint in endpoints:
        fleet.kill(endpoint)
    result.faults_injected += len(endpoints)


def kill_all_then_one_back(
    tmp: Path, n: int = 1000, seed: int = 0, teachers: int = 2, down_s: float = 2.0
) -> FaultResult:
    """SIGKILL every teacher at a random moment; after ``down_s`` one comes back on its port."""
    rng = random.Random(seed)
    fleet = teacher_fleet()
    result = FaultResult(f"SIGKILL all {teachers} teachers, one back after {down_s:g} s")
    try:
        endpoints = [fleet.start() for _ in range(teachers)]
        moment = rng.randrange(2, max(3, n // 16 - 2))
        back: list[float] = []

        def on_step(step: int, audit: Audit) -> None:
            if step == moment:
                _kill_all(fleet, endpoints, audit, result)

                def comeback() -> None:
                    time.sleep(down_s)
                    back.append(fleet.restart(rng.choice(endpoints), wait=False))

                threading.Thread(target=comeback, daemon=True).start()

        with _reader(write_config(tmp, endpoints), n, request_timeout=5, teacher_timeout=30) as dr:
            started = time.monotonic()
            audit, _ = run_epoch(dr, n, on_step, result)
            result.seconds = time.monotonic() - started
            audit.fill(result)
            if back:
                result.recover_s = audit.longest_stall(back[0])
                result.details["restart_to_first_batch_s"] = next(
                    (t - back[0] for t in audit.arrivals if t >= back[0]), -1.0
                )
    finally:
        fleet.stop_all()
    return result


def no_teacher_left(tmp: Path, n: int = 1000, seed: int = 0, teacher_timeout: float = 2.0) -> FaultResult:
    """SIGKILL every teacher for good: the epoch must fail with NoTeacherError after teacher_timeout."""
    rng = random.Random(seed)
    fleet = teacher_fleet()
    result = FaultResult(f"SIGKILL all teachers for good (teacher_timeout={teacher_timeout:g} s)")
    try:
        endpoints = [fleet.start() for _ in range(2)]
        moment = rng.randrange(1, 10)

        def on_step(step: int, audit: Audit) -> None:
            if step == moment:
                _kill_all(fleet, endpoints, audit, result)

        with _reader(write_config(tmp, endpoints), n, request_timeout=5, teacher_timeout=teacher_timeout) as dr:
            started = time.monotonic()
            audit, error = run_epoch(dr, n, on_step, result)
            result.seconds = time.monotonic() - started
            audit.fill(result)
            result.details["error_type"] = type(error).__name__ if error else ""
            # Samples of a failed epoch are not delivered; count only the duplicates and wrong ones.
            result.lost = 0
    finally:
        fleet.stop_all()
    return result


def _start_bad_teacher(kind: str, fleet: TeacherProcesses, closers: list[Callable[[], None]]) -> str:
    """Start a bad teacher of ``kind``; its address. What must be closed goes to ``closers``."""
    if kind in ("hang", "broken"):
        return fleet.start(f"reader_models:{kind}")
    bad = SilentListener() if kind == "silent" else WrongTeacher(kind).start()
    closers.append(bad.close)
    return bad.endpoint


def bad_teacher_beside_good(
    tmp: Path,
    kind: str,
    n: int = 1000,
    seed: int = 0,
    request_timeout: float = 1.0,
    max_attempts: int = 3,
    delay_s: float = 0.01,
    **options: Any,
) -> FaultResult:
    """One good teacher and one bad one (``hang``, ``silent``, ``broken``, ``shape``, ``bytes``,
    ``dtype``, ``missing``) from the start: every sample must come from the good one."""
    fleet = teacher_fleet(delay_s)
    result = FaultResult(f"{kind} teacher beside a good one")
    closers: list[Callable[[], None]] = []
    try:
        good = fleet.start()
        bad = _start_bad_teacher(kind, fleet, closers)
        result.faults_injected = 1
        config = write_config(tmp, [bad, good])
        with _reader(
            config, n, request_timeout=request_timeout, teacher_timeout=30, max_attempts=max_attempts, **options
        ) as dr:
            started = time.monotonic()
            audit, _ = run_epoch(dr, n, result=result)
            result.seconds = time.monotonic() - started
            audit.fill(result)
            result.recover_s = max(np.diff([started, *audit.arrivals]), default=0.0)
            stats = dr.stats()
            result.details["requests_to_bad"] = sum(t.requests for t in stats.teachers if t.endpoint == bad)
    finally:
        for close in closers:
            close()
        fleet.stop_all()
    return result


def only_bad_teacher(
    tmp: Path, kind: str, n: int = 200, teacher_timeout: float = 2.0, request_timeout: float = 1.0
) -> FaultResult:
    """Only a bad teacher: the epoch must end with a clear exception (never hang)."""
    fleet = teacher_fleet()
    result = FaultResult(f"only a {kind} teacher")
    closers: list[Callable[[], None]] = []
    try:
        bad = _start_bad_teacher(kind, fleet, closers)
        result.faults_injected = 1
        with _reader(
            write_config(tmp, [bad]), n, request_timeout=request_timeout, teacher_timeout=teacher_timeout
        ) as dr:
            started = time.monotonic()
            audit, error = run_epoch(dr, n, result=result)
            result.seconds = time.monotonic() - started
            result.error_after_s = result.seconds
            audit.fill(result)
            result.lost = 0
            result.details["error_type"] = type(error).__name__ if error else ""
    finally:
        for close in closers:
            close()
        fleet.stop_all()
    return result


def _restart_mid_epoch(
    tmp: Path, result: FaultResult, discovery: DiscoveryProcess, victim: Any, n: int, seed: int, down_s: float
) -> None:
    """Two teachers registered with ``discovery``; ``victim`` (it, or its store) SIGKILLed at a
    random step of an epoch of a discover-mode reader and started again ``down_s`` later."""
    rng = random.Random(seed)
    fleet = teacher_fleet()
    try:
        for _ in range(2):
            fleet.start(None, "--register", discovery.endpoint, "--service-name", SERVICE)
        moment = rng.randrange(2, max(3, n // 16 // 2))

        def on_step(step: int, audit: Audit) -> None:
            if step == moment:
                audit.mark()
                victim.kill()
                result.faults_injected += 1
                threading.Thread(target=lambda: (time.sleep(down_s), victim.start()), daemon=True).start()

        config = write_config(tmp, discovery=discovery.endpoint, require_num=2)
        with _reader(config, n, request_timeout=5, teacher_timeout=30) as dr:
            started = time.monotonic()
            audit, _ = run_epoch(dr, n, on_step, result)
            result.seconds = time.monotonic() - started
            result.recover_s = audit.longest_stall()
            audit.fill(result)
            result.details["assigned_after"] = _wait_assigned(discovery.endpoint, 2, timeout=15)
    finally:
        fleet.stop_all()


def discovery_restart(
    tmp: Path, n: int = 2000, seed: int = 0, store: str = "memory", down_s: float = 1.0
) -> FaultResult:
    """``distill discovery serve`` SIGKILLed mid-epoch and restarted on its port ``down_s`` later."""
    discovery = DiscoveryProcess(store)
    result = FaultResult(f"discovery server ({store.split(':')[0]}) SIGKILLed, back after {down_s:g} s")
    try:
        discovery.start()
        _restart_mid_epoch(tmp, result, discovery, discovery, n, seed, down_s)
    finally:
        discovery.stop()
    return result


def _wait_assigned(discovery: str, count: int, timeout: float) -> float:
    """Seconds until discovery reports ``count`` teachers for the service's student (-1: never)."""
    from distill_reader.discovery.client import fetch_status

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            status = asyncio.run(asyncio.wait_for(fetch_status(discovery, SERVICE), 2))
            students = [s for service in status.services for s in service.students]
            if students and all(len(s.teachers) == count for s in students):
                return time.monotonic() - started
        time.sleep(0.1)
    return -1.0


def store_restart(tmp: Path, kind: str, n: int = 2000, seed: int = 0, down_s: float = 1.0) -> FaultResult:
    """Redis or etcd SIGKILLed under a discovery server mid-epoch, restarted ``down_s`` later."""
    store = StoreProcess(kind, tmp)
    discovery = DiscoveryProcess()
    result = FaultResult(f"{kind} SIGKILLed under discovery, back after {down_s:g} s")
    try:
        store.start()
        discovery.store = store.url
        discovery.start()
        _restart_mid_epoch(tmp, result, discovery, store, n, seed, down_s)
    finally:
        discovery.stop()
        store.stop()
    return result


def link_down(
    tmp: Path, n: int = 2000, seed: int = 0, down_s: float = 2.0, request_timeout: float = 1.0
) -> FaultResult:
    """A teacher in its own network namespace cut off (link down) mid-epoch, back ``down_s`` later."""
    why = netns_available()
    if why is not None:
        return FaultResult("teacher's link taken down (network namespace)", error=f"skipped: {why}")
    rng = random.Random(seed)
    fleet = teacher_fleet()
    result = FaultResult(f"teacher's link down for {down_s:g} s (network namespace)")
    with NetnsHosts(1) as hosts:
        try:
            remote = fleet.start(endpoint=f"{hosts.addresses[0]}:{free_port()}", prefix=hosts.command(0))
            local = fleet.start()
            moment = rng.randrange(2, max(3, n // 16 // 2))

            def on_step(step: int, audit: Audit) -> None:
                if step == moment:
                    audit.mark()
                    hosts.cut(0)
                    result.faults_injected += 1
                    threading.Thread(target=lambda: (time.sleep(down_s), hosts.restore(0)), daemon=True).start()

            config = write_config(tmp, [remote, local])
            with _reader(config, n, request_timeout=request_timeout, teacher_timeout=30) as dr:
                started = time.monotonic()
                audit, _ = run_epoch(dr, n, on_step, result)
                result.seconds = time.monotonic() - started
                result.recover_s = audit.longest_stall()
                audit.fill(result)
                # Back up: the cut-off teacher serves again in the next epoch.
                time.sleep(max(0.0, down_s + 0.5 - (time.monotonic() - audit.faults[0])) if audit.faults else 0)
                first = {t.endpoint: t for t in dr.stats().teachers}
                result.details["remote_failures"] = first[remote].failures  # its requests lost in the cut
                second, error2 = run_epoch(dr, n)
                teachers = {t.endpoint: t for t in dr.stats().teachers}
                result.details["next_epoch_clean"] = error2 is None and second.fill(FaultResult("")).clean
                result.details["remote_requests"] = teachers[remote].requests
                # Rows it answered (tries that time out count as requests, not as rows).
                result.details["remote_rows_next_epoch"] = teachers[remote].rows - first[remote].rows
        finally:
            fleet.stop_all()
    return result


class TeacherWatch:
    """Calls ``dr.stats()`` from its own thread every ``interval`` seconds, as a user's metrics
    thread would, and records when each teacher was first seen quarantined and when it last
    started answering requests again."""

    def __init__(self, dr: Any, interval: float = 0.02) -> None:
        self._dr = dr
        self._interval = interval
        self.quarantined_at: dict[str, float] = {}
        self.requests: dict[str, list[tuple[float, int]]] = {}  # endpoint -> (when, requests so far)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="teacher-watch", daemon=True)

    def __enter__(self) -> TeacherWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                teachers = self._dr.stats().teachers
            except Exception as exc:  # noqa: BLE001 - a thread-safety bug: reported, not hidden
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            now = time.monotonic()
            for t in teachers:
                if t.quarantined:
                    self.quarantined_at.setdefault(t.endpoint, now)
                self.requests.setdefault(t.endpoint, []).append((now, t.requests))

    def served_after(self, endpoint: str, moment: float) -> float | None:
        """When ``endpoint``'s request count first grew after ``moment`` (None: it did not)."""
        before = None
        for when, count in self.requests.get(endpoint, []):
            if when <= moment:
                before = count
            elif before is not None and count > before:
                return when
        return None


def misconfigured_teacher_fixed(tmp: Path, n: int = 2000, seed: int = 0, epochs: int = 4) -> FaultResult:
    """A good teacher and one serving the wrong model (other tensor names) from the start; the bad
    one is replaced by a right one on its port mid-epoch. Measures the time to quarantine it (from
    the epoch's start) and to use it again (from its fix), auditing every epoch."""
    rng = random.Random(seed)
    fleet = teacher_fleet()
    result = FaultResult("misconfigured teacher beside a good one, fixed mid-epoch")
    try:
        good = fleet.start()
        bad = fleet.start("reader_models:tag_paddle_names")  # other tensor names
        result.faults_injected = 1
        moment = rng.randrange(3, 10)
        fixed_at: list[float] = []

        def on_step(step: int, audit: Audit) -> None:
            if step == moment and not fixed_at:
                fleet.kill(bad)
                fleet.start(endpoint=bad)
                fixed_at.append(audit.mark())

        with _reader(write_config(tmp, [good, bad]), n, teacher_timeout=30) as dr, TeacherWatch(dr) as watch:
            started = time.monotonic()
            audits = []
            for epoch in range(epochs):
                audit, _ = run_epoch(dr, n, on_step if epoch == 0 else None, result)
                audits.append(audit)
                if fixed_at and watch.served_after(bad, fixed_at[0]) is not None:
                    break
            result.seconds = time.monotonic() - started
            audits[0].fill(result)
            result.details["epochs"] = len(audits)
            result.details["all_epochs_clean"] = all(a.fill(FaultResult("")).clean for a in audits)
            quarantined = watch.quarantined_at.get(bad)
            result.details["quarantine_s"] = quarantined - started if quarantined is not None else -1.0
            served = watch.served_after(bad, fixed_at[0]) if fixed_at else None
            result.recover_s = served - fixed_at[0] if served is not None else -1.0
            result.details["rejoin_s"] = result.recover_s
            result.details["stats_errors"] = watch.errors
    finally:
        fleet.stop_all()
    return result


def only_misconfigured_teacher(tmp: Path, n: int = 200) -> FaultResult:
    """Only a teacher serving the wrong model: the epoch must fail at once, not after teacher_timeout."""
    fleet = teacher_fleet()
    result = FaultResult("only a misconfigured teacher (teacher_timeout=600 s)")
    try:
        bad = fleet.start("reader_models:tag_paddle_names")  # other tensor names
        result.faults_injected = 1
        with _reader(write_config(tmp, [bad]), n, teacher_timeout=600) as dr:
            audit, error = run_epoch(dr, n, result=result)
            audit.fill(result)
            result.lost = 0
            result.details["error_type"] = type(error).__name__ if error else ""
    finally:
        fleet.stop_all()
    return result


def no_discovery_server(tmp: Path, n: int = 1000, teacher_timeout: float = 2.0) -> FaultResult:
    """Discover mode with no discovery server: NoTeacherError after teacher_timeout; then discovery
    and a teacher start, and the same reader's next epoch must be whole."""
    fleet = teacher_fleet()
    discovery = DiscoveryProcess()
    result = FaultResult(f"no discovery server (teacher_timeout={teacher_timeout:g} s), then one starts")
    try:
        result.faults_injected = 1
        config = write_config(tmp, discovery=discovery.endpoint, require_num=1)
        with _reader(config, n, teacher_timeout=teacher_timeout) as dr:
            audit, error = run_epoch(dr, n, result=result)
            result.details["error_type"] = type(error).__name__ if error else ""
            discovery.start()
            started = time.monotonic()
            fleet.start(None, "--register", discovery.endpoint, "--service-name", SERVICE)
            # The teacher registers in the background once ready, and the student reconnects to
            # discovery after a back-off: the next epoch starts once the student has the teacher, or
            # it races that (under load) with the short teacher_timeout.
            result.details["assigned_after"] = _wait_assigned(discovery.endpoint, 1, timeout=30)
            second, error2 = run_epoch(dr, n)
            result.recover_s = (second.arrivals[0] - started) if second.arrivals else -1.0
            second.fill(result)
            result.details["next_epoch_clean"] = error2 is None and result.clean and result.delivered == n
    finally:
        fleet.stop_all()
        discovery.stop()
    return result


# -- the report --------------------------------------------------------------------------------


def scenarios(quick: bool) -> list[tuple[str, Callable[[Path], FaultResult]]]:
    """Every fault of the report, with its sizes (``quick``: the test suite's smoke sizes)."""
    n = 600 if quick else 5000
    runs: list[tuple[str, Callable[[Path], FaultResult]]] = [
        ("kill-one", lambda t: kill_one_of_n(t, n, kills=2 if quick else 8)),
        ("kill-all-one-back", lambda t: kill_all_then_one_back(t, n)),
        ("no-teacher", lambda t: no_teacher_left(t, n)),
    ]
    for kind in ("hang", "silent", "broken", "shape", "bytes", "dtype", "nan"):
        runs.append((f"{kind}-beside-good", lambda t, k=kind: bad_teacher_beside_good(t, k, n)))
        runs.append((f"only-{kind}", lambda t, k=kind: only_bad_teacher(t, k)))
    runs.append(("misconfigured-fixed", lambda t: misconfigured_teacher_fixed(t, n)))
    runs.append(("only-misconfigured", lambda t: only_misconfigured_teacher(t)))
    runs.append(("no-discovery", lambda t: no_discovery_server(t, n)))
    runs.append(("discovery-restart", lambda t: discovery_restart(t, n)))
    for kind in ("redis", "etcd"):
        if StoreProcess.available(kind):
            runs.append((f"{kind}-restart", lambda t, k=kind: store_restart(t, k, n)))
    runs.append(("link-down", lambda t: link_down(t, n)))
    return runs


def run_report(
    quick: bool = False, only: Sequence[str] = (), progress: Callable[[str], None] = lambda _m: None
) -> list[FaultResult]:
    """The scenarios of :func:`scenarios` (``only``: those named), each in a temporary directory; one
    that raised is a result saying so."""
    results = []
    for name, function in scenarios(quick):
        if only and name not in only:
            continue
        progress(name)
        with tempfile.TemporaryDirectory(prefix="distill-chaos-") as tmp:
            try:
                results.append(function(Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - the report shows it
                results.append(FaultResult(name, error=f"scenario failed: {type(exc).__name__}: {exc}"))
    return results
