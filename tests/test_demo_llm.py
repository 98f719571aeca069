"""``distill demo llm`` end to end (``--quick``), and the ULD path of ``distill_reader.hf`` it uses:
rows with an alignment through a real reader, the collator and ``DistillTrainer(loss="uld")``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="distill demo llm needs torch (the llm extra)")
pytest.importorskip("transformers", reason="distill demo llm needs transformers (the llm extra)")
pytest.importorskip("tokenizers", reason="distill demo llm needs tokenizers (the llm extra)")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the llm extra)")

from hf_trainer_models import MAX_LENGTH, VOCAB, count_row, count_teacher, expected_topk  # noqa: E402
from hf_trainer_models import arguments as trainer_arguments  # noqa: E402
from test_demo import mean_std, table_rows  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from distill_reader import ConfigError, DistillReader  # noqa: E402
from distill_reader.hf import DistillCollator, DistillRows, DistillTrainer, distill_loss_sums  # noqa: E402
from distill_reader.torch import uld_loss  # noqa: E402

K = 4
SEED_LINE = re.compile(
    r"^seed (\d+): same tokenizer: with the teacher ([\d.]+) bits per char, without ([\d.]+) \(saved ([+-][\d.]+)\); "
    r"other tokenizer: with the teacher ([\d.]+), without ([\d.]+) \(saved ([+-][\d.]+)\)$",
    re.M,
)


@pytest.mark.timeout(300)
def test_demo_llm_quick_runs_end_to_end_and_its_table_is_consistent():
    env = {**os.environ, "COLUMNS": "240"}  # one line per seed and per table row
    command = [sys.executable, "-m", "distill_reader", "demo", "llm", "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=290)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    seeds = SEED_LINE.findall(result.stdout)
    assert [int(s[0]) for s in seeds] == [0, 1], result.stdout
    values = np.array([[float(x) for x in s[1:]] for s in seeds])
    assert np.all(np.isfinite(values)) and np.all(values[:, [0, 1, 3, 4]] > 0)
    np.testing.assert_allclose(values[:, 2], values[:, 1] - values[:, 0], atol=1.1e-3)
    np.testing.assert_allclose(values[:, 5], values[:, 4] - values[:, 3], atol=1.1e-3)
    for row, column in [
        ("student bits per char, trained with the teacher", 0),
        ("student bits per char, trained without a teacher", 1),
        ("bits per char saved by the teacher (mean ± std over 2 seeds)", 2),
        ("student with another tokenizer bits per char, trained with the teacher", 3),
        ("student with another tokenizer bits per char, trained without a teacher", 4),
        ("bits per char saved by the teacher (other tokenizer) (mean ± std over 2 seeds)", 5),
    ]:
        mean, std = mean_std(rows[row])
        assert mean == pytest.approx(values[:, column].mean(), abs=1e-3), row
        assert std == pytest.approx(values[:, column].std(ddof=1), abs=2e-3), row
    assert rows["seeds where the teacher helped"] == f"{int((values[:, 2] > 0).sum())} of 2"
    assert rows["seeds where the teacher helped (other tokenizer)"] == f"{int((values[:, 5] > 0).sum())} of 2"
    assert 0 < float(rows["teacher bits per char"]) < 8
    assert 0 < float(rows["student positions aligned with a teacher position (other tokenizer)"].rstrip("%")) <= 100
    assert float(rows["teacher tokens/s through DistillReader (reader + student training)"].replace(",", "")) > 0
    assert rows["bytes per token carried (top-k)"] == str(8 * (4 + 4))  # float32 value + int32 index, top-8
    assert rows["vocabularies: teacher's tokenizer, other tokenizer"] == "512, 384"


def test_demo_llm_options_are_checked():
    from click.testing import CliRunner

    from distill_reader.cli import main

    for option in (
        ["--seeds", "0"],
        ["--steps", "0"],
        ["--vocab", "10"],
        ["--alpha", "2"],
        ["--max-length", "4"],
        ["--topk", "0"],
    ):
        result = CliRunner().invoke(main, ["demo", "llm", *option])
        assert result.exit_code == 2, (option, result.output)
    # Rows longer than the students' text: refused once the tokenizers are trained (on little text here).
    short = ["--teacher-chars", "10000", "--student-chars", "2000", "--max-length", "1024"]
    result = CliRunner().invoke(main, ["demo", "llm", *short])
    assert result.exit_code == 2, result.output
    assert "--student-chars 2000: the students' text is at most --max-length 1024 tokens" in result.output


# --- the ULD path --------------------------------------------------------------------------------------


def student(seed: int = 0, vocab: int = 24) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=MAX_LENGTH, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def arguments(output_dir: Path, **kwargs) -> TrainingArguments:
    return trainer_arguments(output_dir, **{"per_device_train_batch_size": 4, **kwargs})


def hand_rows() -> list[dict[str, torch.Tensor]]:
    """Two rows of a student with another tokenizer: 5 and 3 student tokens, 3 and 4 teacher positions."""
    rng = np.random.default_rng(0)
    logp = [np.log(rng.dirichlet(np.ones(K) * 0.5, size=n) * 0.9).astype(np.float32) for n in (3, 4)]
    logp = [np.sort(v, axis=-1)[:, ::-1].copy() for v in logp]
    return [
        {
            "input_ids": torch.tensor([1, 2, 3, 4, 5]),
            "teacher_topk_values": torch.from_numpy(logp[0]),
            "teacher_topk_indices": torch.zeros((3, K), dtype=torch.int32),
            "alignment": torch.tensor([0, -1, 1, -1, 2]),
        },
        {
            "input_ids": torch.tensor([6, 7, 8]),
            "teacher_topk_values": torch.from_numpy(logp[1]),
            "teacher_topk_indices": torch.zeros((4, K), dtype=torch.int32),
            "alignment": torch.tensor([1, 3, 7]),  # 7: past the teacher's row (masked)
        },
    ]


def test_collator_pads_each_side_to_its_own_length():
    rows = hand_rows()
    batch = DistillCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 5) and batch["teacher_topk_values"].shape == (2, 4, K)
    assert batch["teacher_lengths"].tolist() == [3, 4]
    assert batch["alignment"].tolist() == [[0, -1, 1, -1, 2], [1, 3, 7, -1, -1]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, -100, -100]]
    assert torch.equal(batch["teacher_topk_values"][0, :3], rows[0]["teacher_topk_values"])
    assert torch.all(batch["teacher_topk_values"][0, 3] == 0)
    with pytest.raises(ConfigError, match="alignment"):
        DistillCollator()([rows[0], {k: v for k, v in rows[1].items() if k != "alignment"}])
    with pytest.raises(ConfigError, match="alignment of shape"):
        DistillCollator()([{**rows[0], "alignment": torch.tensor([0, 1])}])


def test_uld_loss_of_the_trainer_is_ce_plus_uld_at_aligned_positions(tmp_path):
    rows = hand_rows()
    batch = DistillCollator()(rows)
    model = student()
    trainer = DistillTrainer(
        model=model, args=arguments(tmp_path), train_dataset=rows, loss="uld", alpha=0.3, temperature=2.0
    )
    loss = trainer.compute_loss(model, batch).detach()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    # By hand: the aligned positions are (0, 0) (0, 2) (0, 4) (1, 0) (1, 1); (1, 2) points past the teacher.
    uld = uld_loss(
        logits, batch["teacher_topk_values"], batch["alignment"], None, batch["teacher_lengths"], temperature=2.0
    )
    per_position = uld_loss(
        logits,
        batch["teacher_topk_values"],
        batch["alignment"],
        None,
        batch["teacher_lengths"],
        temperature=2.0,
        reduction="none",
    )
    assert (per_position != 0).nonzero().tolist() == [[0, 0], [0, 2], [0, 4], [1, 0], [1, 1]]
    assert float(loss) == pytest.approx(float((0.7 * ce + 0.3 * uld).detach()), rel=1e-5)
    _, _, uld_sum, positions = distill_loss_sums(logits, batch["labels"], dict(batch), temperature=2.0)
    assert int(positions) == 5 and float(uld_sum.detach()) == pytest.approx(
        float(per_position.sum().detach()), rel=1e-5
    )

    # A loss that does not fit its rows is refused.
    with pytest.raises(ConfigError, match="loss='uld'"):
        DistillTrainer(model=model, args=arguments(tmp_path), train_dataset=rows).compute_loss(model, batch)
    with pytest.raises(ConfigError, match="loss must be one of"):
        DistillTrainer(model=model, args=arguments(tmp_path), train_dataset=rows, loss="kld")


UL_CONFIG = """\
[conf]
mode = fixed
servers = {servers!r}
max_length = {max_length}

[feed]
feed_vars = ['student_tokens', 'tokens', 'alignment']
feed_types = ['int64', 'int64', 'int64']
feed_shapes = [(-1,), (-1,), (-1,)]
predict_feed_ids = [1]

[fetch]
fetch_vars = ['logits_topk_values', 'logits_topk_indices']
fetch_types = ['float32', 'int32']
fetch_shapes = [(-1, {k}), (-1, {k})]
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with count_teacher(tmp_path_factory.mktemp("teacher"), K) as served:
        yield served


def aligned_sample(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row ``i``: the teacher's tokens ``count_row(i)``, a student row of other length and tokens, an alignment."""
    teacher_tokens = count_row(i)
    n = 3 + i % 7
    student_tokens = (np.arange(n) * 3 + i) % 24
    alignment = np.where(np.arange(n) % 2 == 0, np.arange(n) // 2 * 3 % len(teacher_tokens), -1)
    return student_tokens.astype(np.int64), teacher_tokens, alignment.astype(np.int64)


def test_rows_with_an_alignment_through_a_real_reader_and_trainer(tmp_path, teacher):
    endpoint, _ = teacher
    conf = tmp_path / "reader.conf"
    conf.write_text(UL_CONFIG.format(servers=[endpoint], max_length=MAX_LENGTH, k=K))
    samples = [aligned_sample(i) for i in range(24)]
    reader = DistillReader(conf, 8, 4, capacity=4, occupied_capacity=1)
    reader.set_sample_generator(lambda: iter(samples))
    rows = DistillRows(reader, student_tokens="student_tokens", alignment="alignment")
    with reader:
        seen = list(rows)
    assert len(seen) == len(samples)
    for row, (student_tokens, teacher_tokens, alignment) in zip(seen, samples):
        assert row["input_ids"].tolist() == student_tokens.tolist()
        assert row["alignment"].tolist() == alignment.tolist()
        values, indices = expected_topk(teacher_tokens, K)
        np.testing.assert_allclose(row["teacher_topk_values"].numpy(), values, atol=1e-6)
        assert row["teacher_topk_indices"].numpy().tolist() == indices.tolist()

    # Trained by DistillTrainer(loss="uld"): it runs and the loss is finite.
    reader = DistillReader(conf, 8, 4, capacity=4, occupied_capacity=1)
    reader.set_sample_generator(lambda: iter(samples))
    model = student()
    trainer = DistillTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=6),
        train_dataset=DistillRows(reader, epochs=None, student_tokens="student_tokens", alignment="alignment"),
        loss="uld",
    )
    with reader:
        result = trainer.train()
    assert np.isfinite(result.training_loss) and trainer.rows_trained == 24
    assert VOCAB == 32  # the teacher's vocabulary: the student's (24) differs

    with pytest.raises(ConfigError, match="go together"):
        DistillRows(reader, student_tokens="student_tokens")
    with pytest.raises(ConfigError, match="not a feed var"):
        DistillRows(reader, student_tokens="student", alignment="alignment")
