"""`distill bench --quick`: a smoke run of every scenario (no timing assertions: the machine is noisy)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_reader.bench.commands import SCENARIO_NAMES


@pytest.mark.timeout(120)
def test_quick_run_reports_every_scenario_with_numeric_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "distill_reader", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True
    assert data["machine"]["cpus"] == os.cpu_count()
    assert set(data["scenarios"]) == set(SCENARIO_NAMES)
    for name, rows in data["scenarios"].items():
        assert rows, name
        for row in rows:
            for key in ("measured", "limit", "ratio"):
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (name, row)
            assert math.isclose(row["ratio"], row["measured"] / row["limit"], rel_tol=1e-9), (name, row)
            # The verdict is the ratio against the target (whether a timing figure meets its target
            # depends on the machine's load, so only the pool's size is asserted below).
            if row["target"] is None:
                assert row["passed"] is None, (name, row)
            else:
                meets = row["ratio"] <= row["target"] if row["at_most"] else row["ratio"] >= row["target"]
                assert row["passed"] is meets, (name, row)
    # The pool's size is arithmetic, not timing: capacity × batch bytes, plus alignment padding.
    (pool,) = [row for row in data["scenarios"]["memory"] if row["label"] == "shared memory in use (the pool)"]
    assert 1.0 <= pool["ratio"] <= pool["target"] and pool["passed"] is True, pool
    assert "teacher-bound" in done.stdout  # the table


def test_bench_help_lists_the_scenarios() -> None:
    from click.testing import CliRunner

    from distill_reader.cli import main

    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    for name in SCENARIO_NAMES:
        assert name in result.output
