"""The README's usage example runs as written: its teacher command, its config file and its code.

Only what a second run on a shared machine needs is changed: the teacher's port (a free one, in the
command and in the config) and the number of epochs (``range(300)`` becomes ``range(2)``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distill_reader
from distill_reader.config import load_config
from distill_reader.reader import DistillReader
from distill_reader.teacher.local import free_port, wait_until_ready

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIG = Path("examples/mnist_distill_reader.conf")
EPOCHS = 2


def section(heading: str) -> str:
    """The README's text from ``heading`` to the next heading of the same level."""
    level = heading.split()[0]
    start = README.index(f"\n{heading}\n")
    end = README.find(f"\n{level} ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def teacher_command() -> str:
    """The README's command that serves the example's teacher."""
    lines = [
        line
        for block in code_blocks(section("## Using DistillReader"), "bash")
        for line in block.splitlines()
        if line.startswith("distill teacher serve")
    ]
    assert len(lines) == 1, lines
    return lines[0]


def load_teacher_function():
    spec = importlib.util.spec_from_file_location("readme_mnist_teacher", ROOT / "examples" / "mnist_teacher.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.predict


def test_readme_config_block_is_the_shipped_example_file() -> None:
    blocks = code_blocks(section("## Config reference"), "ini")
    assert blocks, "no ini block under Config reference"
    assert blocks[-1] == (ROOT / CONFIG).read_text(encoding="utf-8")
    assert str(CONFIG) in section("## Using DistillReader")


def test_readme_usage_example_runs_against_the_readme_teacher(tmp_path, monkeypatch, capsys) -> None:
    port = free_port()
    command = shlex.split(teacher_command())
    assert command[0] == "distill", command  # `distill` of the activated venv is `python -m distill_reader`
    command = [sys.executable, "-m", "distill_reader", *(arg.replace(":8001", f":{port}") for arg in command[1:])]
    assert f"127.0.0.1:{port}" in command

    # The example reads its config relative to the repository root; run it in a copy whose only
    # change is the port.
    config_text = (ROOT / CONFIG).read_text(encoding="utf-8")
    assert "'127.0.0.1:8001'" in config_text
    (tmp_path / CONFIG).parent.mkdir()
    (tmp_path / CONFIG).write_text(config_text.replace("'127.0.0.1:8001'", f"'127.0.0.1:{port}'"))
    code, patched = re.subn(
        r"\brange\(300\)", f"range({EPOCHS})", code_blocks(section("## Using DistillReader"), "python")[0]
    )
    assert patched == 1

    # Every batch the example's loop receives, copied (the loop's arrays are views into the pool).
    epochs: list[list[list[np.ndarray]]] = []

    class RecordingReader(DistillReader):
        def distill_reader(self):
            run_epoch = super().distill_reader()

            def recorded():
                epochs.append([])
                for batch in run_epoch():
                    epochs[-1].append([array.copy() for array in batch])
                    yield batch

            return recorded

    monkeypatch.setattr(distill_reader, "DistillReader", RecordingReader, raising=False)
    monkeypatch.chdir(tmp_path)
    teacher = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, env=os.environ.copy())
    namespace: dict = {"__name__": "__readme__"}
    try:
        wait_until_ready(f"127.0.0.1:{port}", teacher)
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        if "dr" in namespace:
            namespace["dr"].close()
        teacher.terminate()
        teacher.wait(10)

    # The samples the example's own reader yields, in order.
    samples = [sample for sample_list in namespace["_reader"]() for sample in sample_list]
    images = np.stack([img for img, _ in samples])
    labels = np.stack([label for _, label in samples])
    teacher_fn = load_teacher_function()
    assert len(epochs) == EPOCHS
    for batches in epochs:
        assert [len(b[0]) for b in batches] == [32] * 6 + [2]  # 194 samples; the short last batch is kept
        np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images)
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)
        predictions = np.concatenate([b[2] for b in batches])
        np.testing.assert_allclose(predictions, teacher_fn({"img": images})["prediction"], rtol=1e-5, atol=1e-7)
    assert capsys.readouterr().out.startswith("epoch 0: 7 batches, last prediction[0] = [")


def _shims(folder: Path) -> dict[str, str]:
    """An environment whose ``python`` and ``distill`` are this interpreter's, as in the README's
    activated venv."""
    folder.mkdir()
    for name, command in (("python", f'"{sys.executable}"'), ("distill", f'"{sys.executable}" -m distill_reader')):
        (folder / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (folder / name).chmod(0o755)
    env = os.environ.copy()
    env["PATH"] = f"{folder}{os.pathsep}{env['PATH']}"
    return env


def _run_block(block: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"{block}\nexited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_readme_store_commands_capture_then_read_back(tmp_path) -> None:
    """The knowledge-store section's commands, as a user copies them, against the usage example's
    teacher: the first block captures, then (the teacher stopped) the second reads every row back."""
    blocks = code_blocks(section("## Knowledge store: teacher outputs captured once"), "bash")
    assert len(blocks) == 2, blocks
    capture, read_back = blocks
    port = free_port()
    command = shlex.split(teacher_command())
    command = [sys.executable, "-m", "distill_reader", *(arg.replace(":8001", f":{port}") for arg in command[1:])]
    # The user's working directory: the repository's example config (on a free port) and the usage
    # example saved as example.py, as the README says.
    (tmp_path / CONFIG).parent.mkdir()
    config_text = (ROOT / CONFIG).read_text(encoding="utf-8")
    (tmp_path / CONFIG).write_text(config_text.replace("'127.0.0.1:8001'", f"'127.0.0.1:{port}'"))
    code, patched = re.subn(
        r"\brange\(300\)", f"range({EPOCHS})", code_blocks(section("## Using DistillReader"), "python")[0]
    )
    assert patched == 1
    (tmp_path / "example.py").write_text(code)
    env = _shims(tmp_path / "bin")

    teacher = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, env=os.environ.copy())
    try:
        wait_until_ready(f"127.0.0.1:{port}", teacher)
        captured = _run_block(capture, tmp_path, env)
    finally:
        teacher.terminate()
        teacher.wait(10)
    assert "rows:           194 (194 recorded" in captured, captured
    read = _run_block(read_back, tmp_path, env)  # no teacher runs now: every row comes from the store

    def epoch_lines(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith("epoch ")]

    assert epoch_lines(captured) and epoch_lines(read) == epoch_lines(captured)
    assert "ok: 194 rows" in read, read
    config = load_config(tmp_path / "store.conf")
    assert config.store is not None
    assert (config.store.path, config.store.policy) == (tmp_path / "teacher-outputs", "read")


def test_readme_sizing_text_and_the_pool_warning_agree(tmp_path) -> None:
    """The usage example's sizes draw the pool warning with its one teacher (issue 17: the README
    called them fine for one small teacher while the example printed the warning). The README says
    that the example gets it, quotes its advice, and both say what the advice cannot see: a teacher
    that is busy already (the example's own, measured) gains nothing from it."""
    from distill_reader.reader.stats import StatsTracker
    from distill_reader.teacher.stats import TeacherStats

    code = code_blocks(section("## Using DistillReader"), "python")[0]
    sizes = re.search(r"DistillReader\('[^']+', (\d+), (\d+), capacity=(\d+), occupied_capacity=(\d+)\)", code)
    assert sizes, code
    batch_size, d_batch_size, capacity, occupied = map(int, sizes.groups())
    reader = DistillReader(ROOT / CONFIG, batch_size, d_batch_size, capacity=capacity, occupied_capacity=occupied)
    pool = reader._stats._pool  # the sizes the reader judges its pool by, max_in_flight's default included
    reader.close()
    assert pool is not None

    def warning(teachers: int) -> str:
        tracker = StatsTracker(60.0, pool)
        tracker.pipeline_report([TeacherStats(f"t{i}:1", True, 16, 0, 0, 10.0, 10.0, 10.0) for i in range(teachers)], 0)
        message = tracker._judge_pool()
        assert message is not None, "no pool warning for the usage example's sizes"
        return message

    one, eight = warning(1), warning(8)
    sizing = README[README.index("**Sizing for throughput.**") : README.index("### Failures and shutdown")]
    text = " ".join(sizing.split())
    advice = re.search(r"capacity=\d+ would feed them", one)[0]
    assert advice == "capacity=7 would feed them" and f"`{advice}`" in text
    eight_advice = re.search(r"capacity=\d+ would feed them", eight)[0].removesuffix(" would feed them")
    assert eight_advice == "capacity=35" and f"get `{eight_advice}`" in text
    assert "fine for one" not in text
    assert "unless the teachers are busy already" in one and "busy already" in text
    assert "gains nothing" in one and "gains nothing" in text


@pytest.mark.parametrize("document", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_docs_speak_of_the_product_not_of_how_it_was_made(document) -> None:
    """Words of the development process mean nothing to a user (issue 17: "the seed's example", "the
    seed guide's sizes", "after the fleet-robustness and sequence work"); the guide the API comes from
    is "the original DistillReader guide"."""
    text = (ROOT / document if document == "README.md" else ROOT / "docs" / document).read_text(encoding="utf-8")
    text = " ".join(text.split())
    for phrase in ("the seed's", "seed guide", "fleet-robustness", "sequence work"):
        assert phrase not in text.lower(), f"{document}: {phrase!r}"


def test_readme_config_table_lists_every_key_the_loader_reads() -> None:
    """Any key not in the Config reference table is refused, the README says: so the table names
    every key of :data:`KNOWN_KEYS` (``[store] precision`` was missing), and no other."""
    from distill_reader.config import KNOWN_KEYS

    listed: set[tuple[str, str]] = set()
    for row in re.findall(r"^\| (`\[\w+(?: NAME)?\] [^|]*)\|", section("## Config reference"), flags=re.M):
        names = re.findall(r"`([^`]+)`", row)
        header = re.match(r"\[(\w+)(?: NAME)?\] (\w+)$", names[0])  # [teacher NAME]: every group
        assert header, row
        listed |= {(header[1], header[2]), *((header[1], name) for name in names[1:])}
    assert listed == {(s, key) for s, keys in KNOWN_KEYS.items() for key in keys}
