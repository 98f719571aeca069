"""Fault injection: teachers killed, hung, silent or wrong; discovery, Redis and etcd restarted;
a teacher's link cut. Every sample exactly once with the right output, or a clear exception.

The scenarios are ``chaos_scenarios``'s with small sizes; the long ones are slow-marked
(``DISTILL_SLOW_TESTS=1``), and ``tests/chaos_report.py`` runs them all long and prints the report
(docs/fault-tolerance.md). ``pytest -s`` prints each result.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import chaos_scenarios as chaos
import pytest
from chaos_support import assert_clean, slow
from netns_support import netns_available

from distill_reader.bench.processes import StoreProcess

pytestmark = pytest.mark.timeout(90)

N = 480  # samples per epoch: 30 batches of 16

# A teacher that answers every request with an error fails the epoch with TeacherError after
# max_attempts, or, when its back-off (escalated once per failed request in flight) outlasts
# teacher_timeout first, with NoTeacherError carrying the same message: which one is a race.
WRONG = ("TeacherError", "NoTeacherError")
MISMATCH = ("TeacherMismatchError",)


def test_sigkill_one_of_three_at_random_moments(tmp_path):
    result = chaos.kill_one_of_n(tmp_path, N, seed=1, teachers=3, kills=2)
    assert_clean(result)
    assert result.faults_injected == 2
    assert result.details["next_epoch_clean"]
    assert result.recover_s < 10  # request_timeout=5 bounds how long a lost request can stall


@slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(5))
def test_sigkill_one_of_three_long(tmp_path, seed):
    result = chaos.kill_one_of_n(tmp_path, 5000, seed=seed, teachers=3, kills=8)
    assert_clean(result)
    assert result.details["next_epoch_clean"]


def test_sigkill_all_then_one_comes_back(tmp_path):
    result = chaos.kill_all_then_one_back(tmp_path, N, seed=2, teachers=2, down_s=1.5)
    assert_clean(result)
    assert result.faults_injected == 2
    # The restarted teacher is used within its start-up time plus gRPC's 2 s reconnect backoff.
    assert 0 < result.details["restart_to_first_batch_s"] < 15


def test_all_teachers_gone_for_good_raises_no_teacher_error(tmp_path):
    result = chaos.no_teacher_left(tmp_path, N, seed=3, teacher_timeout=2.0)
    print(result.to_json())
    assert result.details["error_type"] == "NoTeacherError", result.error
    assert "no teacher answered for 2 s (teacher_timeout=2)" in result.error
    assert "UNAVAILABLE" in result.error  # the last errors are named
    # teacher_timeout, plus the 5 s request timeout of requests in flight at the kill (a generous bound).
    assert result.error_after_s < 2.0 + 5.0 + 5.0
    assert (result.duplicated, result.wrong) == (0, 0)


@pytest.mark.parametrize("kind", ["hang", "silent"])
def test_bad_teacher_beside_a_good_one_costs_nothing(tmp_path, kind):
    result = chaos.bad_teacher_beside_good(tmp_path, kind, N, request_timeout=1.0)
    assert_clean(result)


@slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["hang", "silent"])
def test_bad_teacher_beside_a_good_one_long(tmp_path, kind):
    result = chaos.bad_teacher_beside_good(tmp_path, kind, 3000, request_timeout=1.0, max_in_flight=4)
    assert_clean(result)


@pytest.mark.parametrize("kind", ["shape", "nan", "dtype", "missing", "undeclared-shape"])
def test_wrong_answers_beside_a_good_teacher_cost_nothing(tmp_path, kind):
    """Wrong answers quarantine the teacher: every sample comes from the good one."""
    result = chaos.bad_teacher_beside_good(tmp_path, kind, N)
    assert_clean(result)
    assert result.details["requests_to_bad"] >= 1


@pytest.mark.parametrize("kind", ["broken", "shape"])
def test_wrong_teacher_beside_a_busy_good_one_fails_no_epoch(tmp_path, kind):
    # One worker per teacher; the good teacher takes 1 s a request. The wrong one fails the first
    # request at once, then again after its 0.2 s and 0.4 s back-offs: 3 attempts in 0.6 s, while
    # the good teacher, which never failed it, is still busy with its first request. (With the
    # default max_in_flight the same happens at random: idle workers of the failing teacher, already
    # waiting in the queue, take the request back before its back-off.)
    result = chaos.bad_teacher_beside_good(tmp_path, kind, 16, delay_s=1.0, request_timeout=5.0, max_in_flight=1)
    assert_clean(result)


@pytest.mark.parametrize(
    ("kind", "types", "message"),
    [
        ("hang", ("NoTeacherError",), "no teacher answered for 2 s (teacher_timeout=2); last errors: teacher "),
        ("silent", ("NoTeacherError",), "no teacher answered for 2 s (teacher_timeout=2); last errors: teacher "),
        (
            "broken",
            WRONG,
            "failed: INTERNAL: model 'teacher' failed: the teacher model is broken",
        ),
        # Wrong answers quarantine the only teacher: the epoch fails at once, with that reason.
        ("shape", MISMATCH, "returned FP32[4, 9] for fetch var 'prediction', expected FP32[4, 10]"),
        ("bytes", MISMATCH, "returned 80 bytes for fetch var 'prediction', expected 160"),
        ("dtype", MISMATCH, "returned FP64[4, 10] for fetch var 'prediction', expected FP32[4, 10]"),
        ("missing", MISMATCH, "answered without output 'prediction'"),
        ("nan", ("TeacherOutputError",), "answered NaN or inf in fetch var 'prediction' for 4 of 4 rows whose inputs"),
    ],
)
def test_only_a_bad_teacher_fails_clearly(tmp_path, kind, types, message):
    result = chaos.only_bad_teacher(tmp_path, kind, 64, teacher_timeout=2.0, request_timeout=1.0)
    print(result.to_json())
    assert result.details["error_type"] in types, result.error
    assert message in result.error
    assert result.delivered == 0
    # A clear error, never a hang: teacher_timeout (2 s) + request_timeout (1 s) + slack.
    assert result.error_after_s < 10


def test_discovery_server_killed_and_restarted(tmp_path):
    result = chaos.discovery_restart(tmp_path, 960, seed=4, down_s=1.0)
    assert_clean(result)
    assert result.faults_injected == 1
    # The teachers re-register with the restarted (memory) server and the student gets them back.
    assert result.details["assigned_after"] >= 0


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_store_killed_and_restarted(tmp_path, kind):
    if not StoreProcess.available(kind):
        pytest.skip(f"{StoreProcess.BINARIES[kind]} is not installed (scripts/install-services.sh)")
    result = chaos.store_restart(tmp_path, kind, 960, seed=5, down_s=1.0)
    assert_clean(result)
    assert result.details["assigned_after"] >= 0


def test_teacher_link_down_in_network_namespace(tmp_path):
    why = netns_available()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    result = chaos.link_down(tmp_path, 960, seed=6, down_s=2.0, request_timeout=1.0)
    assert_clean(result)
    assert result.details["next_epoch_clean"]
    assert result.details["remote_requests"] > 0
    assert result.details["remote_failures"] > 0, result.details  # the cut cost it requests...
    assert result.details["remote_rows_next_epoch"] > 0, result.details  # ...and once back, it served


def test_misconfigured_teacher_is_quarantined_then_rejoins_once_fixed(tmp_path):
    result = chaos.misconfigured_teacher_fixed(tmp_path, 1600, seed=7)
    assert_clean(result)
    assert result.details["all_epochs_clean"]
    assert result.details["quarantine_s"] >= 0, "the bad teacher was never seen quarantined"
    assert result.details["rejoin_s"] >= 0, "the fixed teacher was never used again"
    assert result.details["stats_errors"] == []  # stats() from a monitoring thread, all along


def test_only_a_misconfigured_teacher_fails_at_once(tmp_path):
    # teacher_timeout is 600 s: reaching this test's timeout first would mean the reader waited for it.
    result = chaos.only_misconfigured_teacher(tmp_path)
    assert result.details["error_type"] == "TeacherMismatchError", result.error
    assert "has no input of that name; its inputs are ['image']" in result.error


def test_no_discovery_server_then_one_starts(tmp_path):
    result = chaos.no_discovery_server(tmp_path, N, teacher_timeout=2.0)
    assert result.details["error_type"] == "NoTeacherError", result.error
    assert f"no discovery server answered for service '{chaos.SERVICE}'" in result.error
    assert result.details["next_epoch_clean"], result


def test_the_report_script_runs_as_the_docs_say(tmp_path):
    """docs/fault-tolerance.md's report command, from the repository root, on two quick faults:
    one with only a broken teacher (a clear error), one with a good teacher beside a wrong one (clean)."""
    root = Path(__file__).resolve().parent.parent
    docs = (root / "docs" / "fault-tolerance.md").read_text(encoding="utf-8")
    command = re.search(r"^\.venv/bin/python (tests/chaos_report\.py) ", docs, flags=re.M)
    assert command, "docs/fault-tolerance.md no longer says how to run the report"
    out = tmp_path / "report.json"
    only = ["only-broken", "shape-beside-good"]  # the report's order
    done = subprocess.run(
        [sys.executable, command[1], "--quick", "--only", *only, "--json", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=80,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    title, *rows = done.stdout.splitlines()
    assert title.startswith("fault-injection report (quick sizes"), done.stdout
    assert [row.split()[0] for row in rows] == only, done.stdout
    assert "error after" in rows[0] and "Error" in rows[0], rows[0]
    assert "lost 0" in rows[1] and "duplicated 0" in rows[1] and "wrong 0" in rows[1], rows[1]
    results = json.loads(out.read_text())
    assert results["shape-beside-good"]["delivered"] == results["shape-beside-good"]["samples"] == 600
    assert results["only-broken"]["details"]["error_type"] in WRONG
    assert "the teacher model is broken" in results["only-broken"]["error"]
    assert "only-broken" in done.stderr  # progress, on stderr
