"""The fleet at a glance (issue 21): students report their figures to discovery, which shows them in
/status.json and /metrics, behind the token when there is one; the deploy/ dashboard and alert
rules name metrics that exist and pass promtool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_reader import sample_list_reader

from distill_reader import DistillReader
from distill_reader.discovery.fleet import FIXED_SERVICE, Fleet
from distill_reader.discovery.proto import discovery_pb2 as pb
from distill_reader.discovery.server import ServerThread
from distill_reader.discovery.service import DiscoveryService
from distill_reader.discovery.stores.memory import MemoryStore
from distill_reader.security import Secret, TlsFiles

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DISCOVER = "mode = discover\nhost = {host}\nservice_name = tagger\nrequire_num = {require_num}"
TOKEN = "fleet-view-token-0123"
#: the wrong teacher's quarantine reason starts so (its served names are Paddle's, not the config's)
WRONG_WORDS = "[feed] var 'img': teacher"


# --- a fleet that trains ------------------------------------------------------------------------


def discover_config(write_config, discovery: str, require_num: int, extra: str = "") -> Path:
    from conftest import SEED_CONFIG

    text = SEED_CONFIG.format(servers=[], extra=extra).replace(
        "mode = fixed\nservers = []", DISCOVER.format(host=discovery, require_num=require_num)
    )
    return write_config(text=text)


@dataclass
class Student:
    """A DistillReader training epoch after epoch in a thread, until ``stop``."""

    reader: DistillReader
    stop: threading.Event = field(default_factory=threading.Event)
    first_epoch_at: float | None = None  # monotonic time its first epoch started
    epochs: int = 0
    error: BaseException | None = None
    thread: threading.Thread | None = None

    @property
    def id(self) -> str:
        assert self.reader.config.student_id
        return self.reader.config.student_id

    def start(self) -> Student:
        def train() -> None:
            try:
                while not self.stop.is_set():
                    if self.first_epoch_at is None:
                        self.first_epoch_at = time.monotonic()
                    for _ in self.reader.distill_reader()():
                        if self.stop.is_set():
                            break
                    self.epochs += 1
            except BaseException as exc:  # the test reports it
                self.error = exc

        self.thread = threading.Thread(target=train, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)
        self.reader.close()


def student(config: Path) -> Student:
    reader = DistillReader(config, 16, 4, capacity=6, occupied_capacity=1, teacher_timeout=30)
    reader.set_sample_list_generator(sample_list_reader(800, 8))
    return Student(reader)


@contextlib.contextmanager
def running(thread: ServerThread) -> Iterator[ServerThread]:
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def http_get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def status_json(base: str, token: str | None = None) -> dict:
    code, body = http_get(f"{base}/status.json", token)
    assert code == 200, body
    return json.loads(body)


def metrics(base: str, token: str | None = None) -> dict[tuple[str, frozenset], float]:
    code, body = http_get(f"{base}/metrics", token)
    assert code == 200, body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def series(values: dict[tuple[str, frozenset], float], name: str, **labels: str) -> list[float]:
    return [v for (n, ls), v in values.items() if n == name and set(labels.items()) <= ls]


def wait_for(check, timeout: float, what: str):
    """``check()`` until it returns something true (its value); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = check()
        except (AssertionError, KeyError, StopIteration, IndexError, TypeError) as exc:
            got, last = None, exc
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")


def by_id(items: list[dict], key: str, value: str) -> dict:
    return next(i for i in items if i[key] == value)


# --- reports, figures, metrics -----------------------------------------------------------------


def test_students_figures_reach_status_json_and_metrics(write_config, teachers):
    """A discover-mode student beside a wrong teacher and a fixed-mode student that only reports:
    their rows/s, waits, the teachers' rows/s and latencies and the quarantine's reason show in
    /status.json, and the same figures in /metrics."""
    with running(ServerThread(http="127.0.0.1:0")) as discovery:
        base = f"http://{discovery.http_address}"
        register = ("--register", discovery.address, "--service-name", "tagger")
        good = teachers.start("reader_models:slow_tag", *register)
        wrong = teachers.start("reader_models:tag_paddle_names", *register)
        started = time.monotonic()
        learner = student(discover_config(write_config, discovery.address, require_num=2)).start()
        fixed = student(write_config([good], extra=f"report_to = {discovery.address}")).start()
        try:

            def settled() -> dict | None:
                st = status_json(base)
                svc = st["services"]["tagger"]
                s = by_id(svc["students"], "id", learner.id)
                t_good = by_id(svc["teachers"], "endpoint", good)
                t_wrong = by_id(svc["teachers"], "endpoint", wrong)
                f = by_id(st["services"][FIXED_SERVICE]["students"], "id", fixed.id)
                ok = (
                    s["rows_per_s"] > 0
                    # The teacher takes 20 ms a request, the loop nothing: it mostly waits.
                    and 0.3 < s["wait_fraction"] <= 1
                    and t_good["rows_per_s"] > 0
                    and t_wrong["quarantined"]
                    and f["rows_per_s"] > 0
                    and sorted(s["teachers"]) == sorted([good, wrong])
                )
                return st if ok else None

            st = wait_for(settled, 30, "the students' figures in /status.json")
            assert learner.error is None and fixed.error is None
            svc = st["services"]["tagger"]
            s = by_id(svc["students"], "id", learner.id)
            assert s["reported"] and 0 <= s["wait_fraction"] <= 1
            t_good = by_id(svc["teachers"], "endpoint", good)
            assert t_good["registered"] and t_good["quarantined"] is None
            assert 0 < t_good["latency_p50_ms"] <= t_good["latency_p99_ms"] < 10_000
            t_wrong = by_id(svc["teachers"], "endpoint", wrong)
            assert WRONG_WORDS in t_wrong["quarantined"], t_wrong
            assert t_wrong["quarantined_by"] == {learner.id: t_wrong["quarantined"]}
            assert t_wrong["rows_per_s"] == 0
            # The fixed-mode reader is under the fixed-mode pseudo-service, with its teacher.
            fixed_svc = st["services"][FIXED_SERVICE]
            f = by_id(fixed_svc["students"], "id", fixed.id)
            assert 0 <= f["wait_fraction"] <= 1 and f["teachers"] == [good]
            assert by_id(fixed_svc["teachers"], "endpoint", good)["registered"] is False
            assert "this server" in st["reports"]
            assert st["report_seconds"] == 1.0  # the page polls as often as the students report
            # History for the charts fills in (a point every 2 s).
            wait_for(lambda: status_json(base)["history"]["students"][f"tagger/{learner.id}"], 10, "history")

            # /metrics: the same figures, labelled by service, teacher and student.
            m = metrics(base)
            (wait,) = series(m, "distill_student_wait_fraction", service="tagger", student=learner.id)
            assert 0 <= wait <= 1
            assert series(m, "distill_student_rows_per_second", service="tagger", student=learner.id)[0] >= 0
            assert series(m, "distill_teacher_quarantined", service="tagger", teacher=wrong, student=learner.id) == [1]
            quarantine = [ls for (n, ls), v in m.items() if n == "distill_teacher_quarantined" and v == 1]
            assert WRONG_WORDS in dict(quarantine[0])["reason"]
            assert series(m, "distill_teacher_quarantined", service="tagger", teacher=good, student=learner.id) == [0]
            assert series(m, "distill_teacher_latency_p99_seconds", teacher=good, student=learner.id)[0] > 0
            first = series(m, "distill_teacher_rows_total", service="tagger", teacher=good, student=learner.id)[0]
            student_rows = series(m, "distill_student_rows_total", service="tagger", student=learner.id)[0]
            assert first > 0
            # Consistent: the rows the loop took came from the good teacher (the wrong one's answers
            # are never used); the teacher's count runs ahead by what is in the pool at most.
            wrong_rows = series(m, "distill_teacher_rows_total", teacher=wrong, student=learner.id)
            assert wrong_rows in ([], [0])
            assert student_rows - 16 * 8 <= first <= student_rows + 16 * 8

            def counted_on() -> dict | None:
                m = metrics(base)
                rows = series(m, "distill_teacher_rows_total", service="tagger", teacher=good, student=learner.id)
                return m if rows[0] > first else None

            m2 = wait_for(counted_on, 10, "the teacher's rows counter counting on")
            later = series(m2, "distill_teacher_rows_total", service="tagger", teacher=good, student=learner.id)[0]
            assert later > first  # the counter counts on
            assert series(m2, "distill_student_rows_total", service=FIXED_SERVICE, student=fixed.id)[0] > 0
            # A report per student about once a second, not one per batch.
            reports = series(m2, "distill_discovery_rpcs_total", method="Report", code="OK")[0]
            assert 2 <= reports <= 2 * (time.monotonic() - started) * 1.5 + 4, reports
        finally:
            learner.close()
            fixed.close()
        assert learner.error is None and fixed.error is None
        # A teacher killed: its lease lapses (counted); one stopped: it deregisters (not counted).
        teachers.kill(wrong)
        lapses = "distill_discovery_teacher_lapses_total"
        wait_for(lambda: series(metrics(base), lapses, service="tagger") == [1], 10, "the lapse counted")
        teachers.kill(good, signal.SIGTERM)
        wait_for(lambda: not status_json(base)["services"].get("tagger", {}).get("teachers"), 10, "teachers gone")
        time.sleep(0.5)
        assert series(metrics(base), lapses, service="tagger") == [1]
        # A student that left is no longer shown (its lease is gone).
        wait_for(
            lambda: (
                learner.id not in [s["id"] for s in status_json(base)["services"].get("tagger", {}).get("students", [])]
            ),
            10,
            "the student gone from the page",
        )


def test_store_hits_are_reported(write_config, teachers, tmp_path):
    """A fixed-mode reader reading every row from a knowledge store reports them as store hits."""
    from test_knowledge import store_config

    with running(ServerThread(http="127.0.0.1:0")) as discovery:
        base = f"http://{discovery.http_address}"
        store = tmp_path / "store"
        writer = DistillReader(store_config(write_config, [teachers.start()], store, "write"), 16, 4, 4, 1)
        writer.set_sample_list_generator(sample_list_reader(400, 8))
        with writer:
            assert sum(len(b[0]) for b in writer.distill_reader()()) == 400
        conf = store_config(write_config, [], store, "read").read_text()
        conf = conf.replace("servers = []", f"servers = ['127.0.0.1:9']\nreport_to = {discovery.address}")
        reader = DistillReader(write_config(text=conf), 16, 4, 4, 1)
        reader.set_sample_list_generator(sample_list_reader(400, 8))
        with reader:
            assert sum(len(b[0]) for b in reader.distill_reader()()) == 400
            assert reader.config.student_id
            hits = wait_for(
                lambda: (
                    series(metrics(base), "distill_student_store_hits_total", student=reader.config.student_id) == [400]
                ),
                10,
                "400 store hits",
            )
            assert hits
            st = by_id(status_json(base)["services"][FIXED_SERVICE]["students"], "id", reader.config.student_id)
            assert st["store_hits"] == 400 and st["rows"] == 400


def test_a_long_wait_for_teachers_shows_while_it_lasts():
    """A student stuck waiting (its teachers quarantined or gone) reports that it waits, not 0."""
    from distill_reader.reader.stats import StatsTracker

    stats = StatsTracker(60.0)
    with stats.waiting_for_teachers(time.perf_counter()):
        time.sleep(0.3)
        during = stats.snapshot().teacher_wait_seconds
        assert during >= 0.25
    after = stats.snapshot().teacher_wait_seconds
    assert after >= during  # monotone: the rates of the reports are differences
    stats.batch(16, 0.3, 0.0, 0.3, 0.3)
    assert stats.snapshot().teacher_wait_seconds == after


def test_report_to_is_for_fixed_mode_and_checked(write_config):
    from distill_reader.config import load_config
    from distill_reader.errors import ConfigError

    conf = load_config(write_config(["127.0.0.1:8001"], extra="report_to = 10.0.0.2:7400, 10.0.0.3:7400"))
    assert conf.report_to == ("10.0.0.2:7400", "10.0.0.3:7400")
    with pytest.raises(ConfigError, match=r"\[conf\] report_to: 'nowhere' is not a 'host:port'"):
        load_config(write_config(["127.0.0.1:8001"], extra="report_to = nowhere"))
    with pytest.raises(ConfigError, match=r"\[conf\] report_to: fixed mode only"):
        load_config(discover_config(write_config, "127.0.0.1:7400", 1, extra="report_to = 127.0.0.1:7400"))


def _report(student: str, instance: str, rows: int, teacher_rows: int, **kw) -> pb.StudentReport:
    r = pb.StudentReport(service_name="svc", student_id=student, instance_id=instance, rows=rows, **kw)
    r.teachers.add(endpoint="127.0.0.1:9000", rows=teacher_rows, rows_per_s=10.0)
    return r


def test_totals_stay_monotone_when_a_student_restarts():
    now = [0.0]
    fleet = Fleet(clock=lambda: now[0])

    def totals() -> tuple[float, float]:
        values = {(s.name, s.labels.get("student")): s.value for f in fleet.collect() for s in f.samples}
        return values[("distill_student_rows_total", "a")], values[("distill_teacher_rows_total", "a")]

    fleet.report(_report("a", "one", 100, 90))
    fleet.report(_report("a", "one", 200, 180))
    assert totals() == (200, 180)
    fleet.report(_report("a", "two", 50, 40))  # restarted: a new instance counts from 0
    assert totals() == (250, 220)
    fleet.report(_report("a", "two", 60, 10))  # the student dropped the teacher and took it again
    assert totals() == (260, 230)
    now[0] = 100.0  # stale: forgotten
    assert fleet.students() == []


# --- behind the token, HTTPS -------------------------------------------------------------------


def test_pages_need_the_token_but_healthz_does_not(tmp_path):
    with running(ServerThread(http="127.0.0.1:0", token=Secret(TOKEN))) as discovery:
        base = f"http://{discovery.http_address}"
        for path in ("/", "/status.json", "/metrics"):
            assert http_get(base + path)[0] == 401, path
            assert http_get(base + path, "wrong-token")[0] == 401, path
            code, body = http_get(base + path, TOKEN)
            assert code == 200, path
            assert TOKEN not in body
        code, body = http_get(base + "/")
        assert "needs its token" in body  # the page itself asks for it (no data in it)
        assert http_get(base + "/status.json")[1] and "services" not in http_get(base + "/status.json")[1]
        assert http_get(base + "/healthz") == (200, "ok\n")


def test_https_when_the_server_has_tls(tmp_path):
    from security_support import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = TlsFiles(cert=pki.server_cert.read_bytes(), key=pki.server_key.read_bytes())
    with running(ServerThread(http="127.0.0.1:0", tls=tls, token=Secret(TOKEN))) as discovery:
        port = discovery.http_address.rsplit(":", 1)[1]
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.check_hostname = False  # the test certificate names no host
        base = f"https://127.0.0.1:{port}"
        assert http_get(base + "/healthz", context=context) == (200, "ok\n")
        assert http_get(base + "/status.json", context=context)[0] == 401
        assert http_get(base + "/status.json", TOKEN, context=context)[0] == 200
        with pytest.raises(OSError):  # no plaintext beside it (the TLS handshake fails)
            http_get(f"http://127.0.0.1:{port}/healthz")


# --- deploy/: Grafana dashboard and Prometheus alert rules ---------------------------------------

DASHBOARD = ROOT / "deploy" / "grafana" / "distill-fleet.json"
RULES = ROOT / "deploy" / "prometheus" / "distill-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "distill-alerts-test.yml"


def exposed_metric_names() -> set[str]:
    """Every series name a discovery server exposes once a student reported (with a quarantine)."""
    service = DiscoveryService(MemoryStore())
    r = _report("a", "one", 10, 10)
    r.teachers.add(endpoint="127.0.0.1:9001", quarantined="wrong", has_latency=True, latency_p99_ms=5)
    service.fleet.report(r)
    service.metrics.teachers.labels("svc", "true").set(1)
    service.metrics.students.labels("svc").set(1)
    service.metrics.changes.labels("svc").inc()
    service.metrics.teacher_lapses.labels("svc").inc()
    service.metrics.rpcs.labels("Report", "OK").inc()
    service.metrics.reconcile.observe(0.01)
    from prometheus_client import generate_latest

    return {
        s.name for f in text_string_to_metric_families(generate_latest(service.registry).decode()) for s in f.samples
    }


def metric_names_in(expr: str) -> set[str]:
    """The distill metric names a PromQL expression uses (label values and matchers left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    return set(re.findall(r"\bdistill_[a-zA-Z0-9_]+", expr))


def test_grafana_dashboard_queries_name_existing_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 8
    exposed = exposed_metric_names()
    assert {"distill_student_wait_fraction", "distill_teacher_rows_total"} <= exposed
    for expr in exprs:
        names = metric_names_in(expr)
        assert names, f"a query names no distill metric: {expr}"
        assert names <= exposed, f"{expr}: {sorted(names - exposed)} are not exposed"
    # The alert rules too.
    import yaml

    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "DistillTeacherQuarantined",
        "DistillStudentsWaiting",
        "DistillServiceWithoutTeacher",
        "DistillTeacherLatencyHigh",
        "DistillTeacherLeasesLapsing",
        "DistillStudentLeasesLapsing",
    }
    for r in rules:
        names = metric_names_in(r["expr"])
        assert names and names <= exposed, f"{r['alert']}: {sorted(names - exposed)} are not exposed"


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package: bash scripts/install-services.sh)")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The rules' own unit tests: each alert fires on the series it is about, and not otherwise.
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60, cwd=RULES.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_reporter_close_ends_a_report_stuck_on_a_hung_server():
    """A discovery server that takes the connection and never answers: ``close()`` ends the report in
    flight (the reporter's thread is gone when it returns), it does not leave it running for the
    RPC's deadline after the training process thinks reporting stopped."""
    from types import SimpleNamespace

    from distill_reader.discovery.client import StudentReporter

    with contextlib.closing(socket.socket()) as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel accepts the connection; no one ever answers on it
        sampled = threading.Event()

        def sample():
            sampled.set()  # the report goes out right after this
            return SimpleNamespace(samples=0, teachers=[])

        reporter = StudentReporter(f"127.0.0.1:{hung.getsockname()[1]}", None, "stuck", sample).start()
        assert sampled.wait(10)
        started = time.monotonic()
        reporter.close(timeout=5.0)
        assert time.monotonic() - started < 1.5, "close() waited for the hung report's deadline"
        assert reporter._thread is not None and not reporter._thread.is_alive()
        assert reporter.sent == 0


def test_history_sampler_does_not_read_the_store():
    """The dashboard's history is sampled every 2 s from the states the reconcile loop already read
    (a resync old at most), not from a full read of every service in the store: that read, with
    thousands of students, is work on the loop that keeps the teachers' leases."""
    thread = ServerThread(http="127.0.0.1:0").start()
    assert thread.server is not None
    server, store = thread.server, thread.server.store
    fleet = server.service.fleet
    fleet.report(_report("s1", "one", 10, 10))
    reads_by_sampler = []
    for name in ("read", "services"):
        original = getattr(store, name)

        async def counted(*args, _original=original, _name=name):
            if asyncio.current_task() is server._history_task:
                reads_by_sampler.append(_name)
            return await _original(*args)

        setattr(store, name, counted)
    samples = []
    sample = fleet.sample
    fleet.sample = lambda *args: (samples.append(1), sample(*args))
    try:
        wait_for(lambda: len(samples) >= 2, 10, "two history samples")
        assert reads_by_sampler == []
    finally:
        thread.stop()


def test_reports_of_gone_students_are_forgotten_without_a_reader():
    """A server without ``--http`` never reads its reports (no page, no /metrics): a student that
    stopped reporting is still forgotten, or every training process ever run would stay in memory."""
    now = [0.0]
    fleet = Fleet(clock=lambda: now[0])
    for i in range(100):
        fleet.report(_report(f"s{i}", "one", 10, 10))
    now[0] = 100.0
    fleet.report(_report("late", "one", 10, 10))
    assert list(fleet._students) == [("svc", "late")]
