"""``distill demo`` as ``make demo`` runs it: its table's rows, their consistency, and the README's copy.

The demo is deterministic for given seeds (splits, teachers, labelled subsets and students are all
seeded, and the reader yields batches in input order), so the README can quote its accuracies and
gain exactly; only samples/s varies from run to run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("onnx")

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
SEEDS, EPOCHS = 5, 10  # the demo's defaults
ROWS = [
    "samples streamed through DistillReader",
    "samples/s (reader + student training)",
    "teacher test accuracy",
    "student test accuracy, trained with the teacher",
    "student test accuracy, trained without a teacher",
    f"gain from the teacher, points (mean ± std over {SEEDS} seeds)",
    "seeds where the teacher helped",
]
SEED_LINE = re.compile(
    r"^seed (\d+): teacher ([\d.]+), student with the teacher ([\d.]+), without ([\d.]+) \(([+-][\d.]+) points\)$",
    re.M,
)


def table_rows(text: str) -> dict[str, str]:
    """The rows of a rich table printed as text: ``│ label │ value │`` -> {label: value}."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def mean_std(value: str) -> tuple[float, float]:
    mean, std = value.split(" ± ")
    return float(mean), float(std)


@pytest.fixture(scope="module")
def demo_output() -> str:
    env = {**os.environ, "COLUMNS": "160"}  # one table row a line
    result = subprocess.run(
        [sys.executable, "-m", "distill_reader", "demo"], capture_output=True, text=True, env=env, timeout=540
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(600)
def test_demo_table_has_its_rows_and_they_agree_with_the_seeds(demo_output):
    from distill_reader.demo.digits import load_digits_split

    rows = table_rows(demo_output)
    assert list(rows)[-len(ROWS) :] == ROWS, rows
    seeds = [tuple(float(v) for v in match) for match in SEED_LINE.findall(demo_output)]
    assert [int(s[0]) for s in seeds] == list(range(SEEDS)), demo_output
    teacher, with_teacher, without_teacher, gain = (np.array(column) for column in list(zip(*seeds))[1:])

    assert rows[ROWS[0]] == f"{SEEDS * EPOCHS * len(load_digits_split().x_train):,}"
    assert float(rows[ROWS[1]].replace(",", "")) > 0
    for row, values in [(ROWS[2], teacher), (ROWS[3], with_teacher), (ROWS[4], without_teacher)]:
        mean, std = mean_std(rows[row])
        assert mean == pytest.approx(values.mean(), abs=1e-3), row  # the seeds' lines are rounded
        assert std == pytest.approx(values.std(ddof=1), abs=2e-3), row
    np.testing.assert_allclose(gain, 100 * (with_teacher - without_teacher), atol=0.11)
    mean, std = mean_std(rows[ROWS[5]])
    assert mean == pytest.approx(gain.mean(), abs=0.05)
    assert std == pytest.approx(gain.std(ddof=1), abs=0.1)
    assert rows[ROWS[6]] == f"{int((gain > 0).sum())} of {SEEDS}"


@pytest.mark.timeout(600)
def test_readme_quotes_the_demo_as_it_runs(demo_output):
    """The README's demo table is this run's, row for row, but for samples/s."""
    start = README.index("`make demo`")
    block = README[README.index("```\n", start) : README.index("\n```\n", README.index("```\n", start) + 4)]
    quoted, ran = table_rows(block), table_rows(demo_output)
    assert list(quoted) == ROWS, quoted
    for row in ROWS:
        if row != "samples/s (reader + student training)":
            assert quoted[row] == ran[row], row


@pytest.mark.parametrize(
    "args",
    [["--batch-size", "0"], ["--d-batch-size", "0"], ["--batch-size", "-3"], ["--seeds", "0"], ["--epochs", "0"]],
)
def test_demo_sizes_out_of_range_are_usage_errors(args):
    """A bad size is a usage error naming the option, before anything runs (issue 17: `--batch-size 0`
    ended in a ConfigError traceback after a teacher was trained and served)."""
    from click.testing import CliRunner

    from distill_reader.cli import main

    result = CliRunner().invoke(main, ["demo", *args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[0]}'" in result.output and "Traceback" not in result.output
