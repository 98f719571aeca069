"""``distill demo text``: the run end to end at tiny sizes, and the causality its teacher must have."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("onnx")

from test_demo import mean_std, table_rows  # noqa: E402

from distill_reader.cli import main  # noqa: E402
from distill_reader.demo.text import VOCAB  # noqa: E402

SEEDS, STUDENT_STEPS, BATCH, K = 2, 6, 8, 4
SEED_LINE = re.compile(
    r"^seed (\d+): student with the teacher ([\d.]+) bits per char, without ([\d.]+) \(saved ([+-][\d.]+)\)$", re.M
)


@pytest.mark.timeout(180)
def test_demo_text_runs_end_to_end_and_its_table_is_consistent():
    env = {**os.environ, "COLUMNS": "160"}  # one table row a line
    command = [sys.executable, "-m", "distill_reader", "demo", "text", "--seeds", str(SEEDS)]
    command += ["--teacher-steps", "10", "--student-steps", str(STUDENT_STEPS), "--batch-size", str(BATCH)]
    command += ["--d-batch-size", "3", "--topk", str(K), "--teacher-chars", "40000", "--held-out-chars", "4000"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)

    seeds = SEED_LINE.findall(result.stdout)
    assert [int(s[0]) for s in seeds] == list(range(SEEDS)), result.stdout
    with_teacher, without_teacher, saved = (np.array([float(s[i]) for s in seeds]) for i in (1, 2, 3))
    assert np.all(np.isfinite(with_teacher)) and np.all(with_teacher > 0)
    assert np.all(np.isfinite(without_teacher)) and np.all(without_teacher > 0)
    np.testing.assert_allclose(saved, without_teacher - with_teacher, atol=1.1e-3)

    for row, values in [
        ("student bits per char, trained with the teacher", with_teacher),
        ("student bits per char, trained without a teacher", without_teacher),
        (f"bits per char saved by the teacher (mean ± std over {SEEDS} seeds)", saved),
    ]:
        mean, std = mean_std(rows[row])
        assert mean == pytest.approx(values.mean(), abs=1e-3), row
        assert std == pytest.approx(values.std(ddof=1), abs=2e-3), row
    assert rows["seeds where the teacher helped"] == f"{int((saved > 0).sum())} of {SEEDS}"
    assert 0 < float(rows["teacher bits per char"]) < 8  # 8 bits: a uniform guess over 256 would be worse
    assert rows["rows streamed through DistillReader"] == f"{SEEDS * STUDENT_STEPS * BATCH:,}"
    assert float(rows["samples/s (reader + student training)"].replace(",", "")) > 0
    assert rows["bytes per token carried (top-k)"] == str(K * (4 + 4))  # float32 value + int32 index
    assert rows["bytes per token, dense"] == str(VOCAB * 4)


def test_exported_teacher_is_causal_under_onnxruntime(tmp_path):
    """Zeros padded after a row change none of its positions, in any batch: the batcher and reader pad."""
    import onnxruntime as ort
    import torch

    from distill_reader.demo.charlm import CharLM, export_onnx

    torch.manual_seed(0)
    model = CharLM(embedding=8, hidden=16).eval()
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "charlm.onnx")))
    assert [(i.name, i.type, len(i.shape)) for i in session.get_inputs()] == [("tokens", "tensor(int64)", 2)]
    assert session.get_outputs()[0].name == "logits"

    rng = np.random.default_rng(0)
    lengths = [5, 12, 1, 9]
    rows = [rng.integers(1, VOCAB, n) for n in lengths]
    for pad_to in (12, 20):
        padded = np.zeros((len(rows), pad_to), dtype=np.int64)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        logits = session.run(None, {"tokens": padded})[0]
        assert logits.shape == (len(rows), pad_to, VOCAB) and logits.dtype == np.float32
        for i, row in enumerate(rows):
            alone = session.run(None, {"tokens": row[None, :]})[0][0]
            np.testing.assert_allclose(logits[i, : len(row)], alone, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                reference = model(torch.from_numpy(row[None, :]))[0].numpy()
            np.testing.assert_allclose(alone, reference, rtol=1e-4, atol=1e-5)
        if pad_to == 12:
            first = logits
        else:  # the same batch with 8 more zeros: the real positions are bit for bit the same
            for i, n in enumerate(lengths):
                np.testing.assert_array_equal(logits[i, :n], first[i, :n])


def test_demo_text_without_torch_names_the_extra(monkeypatch):
    monkeypatch.setattr("distill_reader.demo.text.missing_packages", lambda: ["torch"])
    result = CliRunner().invoke(main, ["demo", "text"])
    assert result.exit_code == 1
    assert "needs torch" in result.output and "pip install 'distill-reader[demo-text]'" in result.output


def test_demo_keeps_the_digits_demo_as_its_default():
    """`distill demo [options]` is still the digits demo (tests/test_demo.py runs it); `text` is a subcommand."""
    help_text = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "--seeds" in help_text and "--labelled-fraction" in help_text and "text" in help_text
