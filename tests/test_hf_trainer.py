"""distill_reader.hf: a GPT-2 student trained with transformers' Trainer on a real DistillReader's rows.

The teacher is ``hf_trainer_models:count_next`` served by ``distill teacher serve --topk``: exact,
so every row's top-k in the batches the trainer computes its loss on is compared with the teacher
applied to that very row, and it logs the rows it computes (what a resumed run must not resend).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="distill_reader.hf needs transformers (the llm extra)")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the llm extra)")

from hf_trainer_models import (  # noqa: E402
    MAX_LENGTH,
    VOCAB,
    arguments,
    count_row,
    count_teacher,
    expected_topk,
    make_reader,
    seen_rows,
    student_config,
)
from transformers import GPT2LMHeadModel, TrainerCallback  # noqa: E402

from distill_reader import ConfigError  # noqa: E402
from distill_reader.hf import DistillCollator, DistillRows, DistillTrainer  # noqa: E402

K = 4
ROWS = 96


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A ``count_next`` teacher with top-4 log-probs; (its address, the file of the rows it computed)."""
    with count_teacher(tmp_path_factory.mktemp("teacher"), K) as served:
        yield served


def student(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(student_config())


class RecordingTrainer(DistillTrainer):
    """Keeps a copy of every training batch compute_loss gets."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[dict[str, torch.Tensor]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.batches.append({key: value.detach().clone() for key, value in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def rows_of(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    """Each row of the batches, checked against the teacher and the collator's rules; its tokens."""
    rows = []
    for batch in batches:
        for i, length in enumerate(batch["teacher_lengths"].tolist()):
            tokens = batch["input_ids"][i, :length].numpy()
            values, indices = expected_topk(tokens, K)
            np.testing.assert_array_equal(batch["teacher_topk_values"][i, :length].numpy(), values)
            np.testing.assert_array_equal(batch["teacher_topk_indices"][i, :length].numpy(), indices)
            assert not batch["teacher_topk_values"][i, length:].any()
            assert batch["attention_mask"][i].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
            assert batch["labels"][i, :length].tolist() == tokens.tolist()
            assert (batch["labels"][i, length:] == -100).all()
            rows.append(tuple(tokens.tolist()))
    return rows


def expected_rows(start: int, stop: int) -> list[tuple[int, ...]]:
    return [tuple(count_row(i).tolist()) for i in range(start, stop)]


# --- training ---------------------------------------------------------------------------------------


def test_trainer_gets_each_rows_teacher_exactly_once_and_the_loss_falls(tmp_path, teacher):
    endpoint, _ = teacher
    with make_reader(tmp_path, endpoint, K) as reader:
        dataset = DistillRows(reader, epochs=2)
        trainer = RecordingTrainer(
            model=student(),
            # more steps than two epochs have: the trainer stops when the dataset ends
            args=arguments(tmp_path / "out", max_steps=2 * ROWS // 8 + 6),
            train_dataset=dataset,
            alpha=0.5,
        )
        trainer.train()
    assert rows_of(trainer.batches) == expected_rows(0, ROWS) * 2
    assert trainer.state.global_step == 2 * ROWS // 8
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 * ROWS // 8
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


class GradientsAtStep(TrainerCallback):
    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})


def test_accumulation_gives_the_gradient_of_one_big_batch(tmp_path, teacher):
    endpoint, _ = teacher
    with make_reader(tmp_path, endpoint, K, rows=16) as reader:
        for alpha in (0.0, 0.5, 1.0):
            gradients = []
            for batch_size, accumulation in ((16, 1), (8, 2), (4, 4)):
                callback = GradientsAtStep()
                trainer = DistillTrainer(
                    model=student(),
                    args=arguments(
                        tmp_path / f"out{batch_size}",
                        per_device_train_batch_size=batch_size,
                        gradient_accumulation_steps=accumulation,
                        max_steps=1,
                        max_grad_norm=0.0,
                    ),
                    train_dataset=DistillRows(reader),
                    callbacks=[callback],
                    alpha=alpha,
                    temperature=2.0,
                )
                trainer.train()
                assert len(callback.gradients) == 1
                gradients.append(callback.gradients[0])
            big = gradients[0]
            assert any(g.abs().sum() > 0 for g in big.values())
            for other in gradients[1:]:
                for name, g in big.items():
                    torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6, msg=f"alpha {alpha}: {name}")


def test_loss_compares_each_position_with_the_right_targets():
    """CE: logits at t against token t + 1 (t < T - 1); KL: logits at t against the teacher at t (t < T)."""
    model = student()
    rows = [count_row(i) for i in (3, 10)]
    batch = DistillCollator()(
        [
            {"input_ids": r, "teacher_topk_values": v, "teacher_topk_indices": i}
            for r in rows
            for v, i in [expected_topk(r, K)]
        ]
    )
    temperature, alpha = 2.0, 0.25
    trainer = DistillTrainer(model=model, args=arguments("unused"), alpha=alpha, temperature=temperature)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        ce, kl, ce_n, kl_n = 0.0, 0.0, 0, 0
        for r in rows:
            logits = model(input_ids=torch.tensor(r)[None]).logits[0].double()
            values, indices = expected_topk(r, K)
            for t in range(len(r)):
                if t + 1 < len(r):
                    ce -= torch.log_softmax(logits[t], -1)[int(r[t + 1])].item()
                    ce_n += 1
                q = torch.log_softmax(logits[t] / temperature, -1)
                p = torch.tensor(values, dtype=torch.float64)[t]
                idx = torch.tensor(indices, dtype=torch.long)[t]
                rest_p = 1 - p.exp().sum()
                rest_q = 1 - q[idx].exp().sum()
                kl += (p.exp() * (p - q[idx])).sum().item() + (rest_p * (rest_p.log() - rest_q.log())).item()
                kl_n += 1
    want = (1 - alpha) * ce / ce_n + alpha * temperature**2 * kl / kl_n
    assert loss.item() == pytest.approx(want, rel=1e-4)


def test_resumed_run_goes_on_from_the_rows_it_had_reached(tmp_path, teacher):
    endpoint, log = teacher
    out = tmp_path / "out"

    def run(seed: int, resume: str | None = None) -> RecordingTrainer:
        with make_reader(tmp_path, endpoint, K) as reader:
            trainer = RecordingTrainer(
                model=student(seed),
                args=arguments(out, max_steps=20, save_strategy="steps", save_steps=8),
                train_dataset=DistillRows(reader, epochs=2),
            )
            trainer.train(resume_from_checkpoint=resume)
        return trainer

    # The whole run: 20 steps of 8 rows over two epochs of 96 rows, a checkpoint every 8 steps.
    whole = run(0)
    assert rows_of(whole.batches) == expected_rows(0, ROWS) + expected_rows(0, 64)
    saved = json.loads((out / "checkpoint-16" / "distill_rows_rank0.json").read_text())
    assert saved == {"rows": 128, "epoch": 1, "row": 32, "world_size": 1}
    # Resumed at step 16 (128 rows: row 32 of the second epoch): only rows from there on go to the
    # teacher again, each once.
    log.unlink(missing_ok=True)
    resumed = run(1, str(out / "checkpoint-16"))
    assert rows_of(resumed.batches) == expected_rows(32, 64)
    seen = seen_rows(log)
    assert len(seen) == len(set(seen))
    assert set(expected_rows(32, 64)) <= set(seen) <= set(expected_rows(32, ROWS))
    assert resumed.rows_trained == 160
    # The model is the uninterrupted run's.
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # resume_from_checkpoint=True takes the last checkpoint (step 20, 160 rows) and its rows. (At
    # max_steps already, Trainer still runs a step with an IterableDataset.)
    log.unlink(missing_ok=True)
    again = run(2, True)
    assert rows_of(again.batches) == expected_rows(64, 64 + 8 * len(again.batches))
    assert set(seen_rows(log)) <= set(expected_rows(64, ROWS))


def test_evaluation_with_and_without_a_teacher(tmp_path, teacher):
    endpoint, _ = teacher
    held_out = [{"input_ids": count_row(i)} for i in range(ROWS, ROWS + 24)]
    # the eval reader's rows, with the teacher's top-k, as a map-style dataset (Trainer keeps the columns)
    mapped = [
        {"input_ids": row, "teacher_topk_values": topk[0], "teacher_topk_indices": topk[1]}
        for row in map(count_row, range(24))
        for topk in [expected_topk(row, K)]
    ]
    eval_reader = make_reader(tmp_path / "eval", endpoint, K, rows=24)
    with make_reader(tmp_path, endpoint, K) as reader, eval_reader:
        trainer = DistillTrainer(
            model=student(),
            args=arguments(tmp_path / "out", max_steps=ROWS // 8),
            train_dataset=DistillRows(reader),
            eval_dataset={"plain": held_out, "teacher": DistillRows(eval_reader), "mapped": mapped},
        )
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    for key in ("eval_plain_loss", "eval_teacher_loss"):
        assert math.isfinite(before[key]) and math.isfinite(after[key])
        assert after[key] < 0.5 * before[key], (key, before, after)
    # Without a teacher the loss is the cross-entropy: a random student's is about log(VOCAB).
    assert abs(before["eval_plain_loss"] - math.log(VOCAB)) < 0.5
    for metrics in (before, after):
        assert metrics["eval_mapped_loss"] == pytest.approx(metrics["eval_teacher_loss"], rel=1e-6)


def test_collator_pads_rows_with_and_without_a_teacher():
    collate = DistillCollator(pad_token_id=7)
    plain = collate([{"input_ids": [1, 2, 3]}, {"input_ids": np.array([4])}])
    assert plain["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert plain["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert "teacher_lengths" not in plain
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    rows = [
        {"input_ids": [1, 2, 3], "teacher_topk_values": values, "teacher_topk_indices": np.ones((3, 2), np.int32)},
        {"input_ids": [4], "teacher_topk_values": values[:1], "teacher_topk_indices": np.ones((1, 2), np.int32)},
    ]
    batch = collate(rows)
    assert batch["teacher_lengths"].tolist() == [3, 1]
    assert batch["teacher_topk_values"].shape == (2, 3, 2)
    assert batch["teacher_topk_values"][1].tolist() == [[0, 1], [0, 0], [0, 0]]
    assert batch["teacher_topk_indices"].dtype == torch.int32
    with pytest.raises(Exception, match="some rows carry"):
        collate([rows[0], {"input_ids": [1]}])


def test_ddp_one_reader_per_rank_under_torchrun(tmp_path, teacher):
    """``torchrun --nproc_per_node 2`` on the CPU (gloo): each rank's reader sends its own rows to the
    teacher, once, the ranks' rows partition the data, and the model is the one a single process
    trains with batches of both ranks' rows (tokens counted over the ranks)."""
    import subprocess
    import sys

    from distill_reader.teacher.local import free_port

    endpoint, log = teacher
    log.unlink(missing_ok=True)
    rows = 32
    tests = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}"]
    done = subprocess.run(
        [*torchrun, str(tests / "hf_trainer_ddp.py"), endpoint, str(tmp_path), str(rows)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, result in enumerate(ranks):
        assert result["world_size"] == 2
        assert [tuple(row) for row in result["rows"]] == [tuple(count_row(i).tolist()) for i in range(r, rows, 2)]
        saved = json.loads((tmp_path / "out" / "checkpoint-4" / f"distill_rows_rank{r}.json").read_text())
        assert saved["rows"] == 16 and saved["world_size"] == 2
        # the end of the first epoch (the dataset may have seen it end already)
        assert (saved["epoch"], saved["row"]) in ((0, 16), (1, 0))
    assert sorted(seen_rows(log)) == sorted(expected_rows(0, rows))
    # One process, batches of 8 rows: rows 0-7 are the first step's rows of both ranks, and so on.
    with make_reader(tmp_path / "single", endpoint, K, rows=rows) as reader:
        torch.manual_seed(0)
        single = DistillTrainer(
            model=GPT2LMHeadModel(student_config()),
            args=arguments(tmp_path / "single", max_steps=rows // 8, optim="sgd", learning_rate=0.1),
            train_dataset=DistillRows(reader),
        )
        single.train()
    ddp = torch.load(tmp_path / "params.pt")
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(ddp[name], p.detach(), rtol=1e-4, atol=1e-5)


def test_example_script_trains_and_resumes(tmp_path, teacher, monkeypatch, capsys):
    """examples/hf_trainer_student.py with tests/llm_support's tiny GPT-2 tokenizer, run and resumed.

    (The teacher is the counting one: its top-k indices are ids below 32 of the tokenizer's 2,048.)
    """
    import runpy
    import sys
    import sysconfig

    from llm_support import tiny_lm_dir

    directory = tiny_lm_dir()
    text = tmp_path / "text.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "heapq.py").read_text()[:12000])
    script = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer_student.py"
    command = [
        str(script),
        f"--teacher={teacher[0]}",
        f"--tokenizer={directory}",
        f"--text={text}",
        f"--output-dir={tmp_path / 'out'}",
        f"--topk={K}",
        f"--max-length={MAX_LENGTH}",
        "--batch-size=8",
        "--eval-steps=3",
        "--save-steps=3",
        "--cpu",
    ]
    for steps, resume in ((3, []), (6, ["--resume"])):
        monkeypatch.setattr(sys, "argv", [*command, f"--max-steps={steps}", *resume])
        runpy.run_path(str(script), run_name="__main__")
        assert f"after {steps} steps" in capsys.readouterr().out
    for step, rows in ((3, 24), (6, 48)):  # the resumed run went on from row 24
        saved = json.loads((tmp_path / "out" / f"checkpoint-{step}" / "distill_rows_rank0.json").read_text())
        assert saved == {"rows": rows, "epoch": 0, "row": rows, "world_size": 1}
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_the_docs_show_the_example_script():
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "llm-trainer.md").read_text()
    script = (root / "examples" / "hf_trainer_student.py").read_text()
    assert "```python\n" + script + "```" in doc


def test_rows_name_the_vars_they_need(tmp_path):
    reader = make_reader(tmp_path, "127.0.0.1:1", K, rows=1)  # no epoch runs: nothing is asked
    with pytest.raises(ConfigError, match="'ids' is not a feed var"):
        DistillRows(reader, tokens="ids")
    with pytest.raises(ConfigError, match="'topk_values' is not a fetch var"):
        DistillRows(reader, topk_values="topk_values")
    with pytest.raises(ConfigError, match="epochs"):
        DistillRows(reader, epochs=0)
    with pytest.raises(ConfigError, match="alpha"):
        DistillTrainer(model=student(), args=arguments(tmp_path / "out"), alpha=1.5)
