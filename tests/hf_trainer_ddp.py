"""One rank of the DDP test of tests/test_hf_trainer.py, started by ``torchrun --nproc_per_node 2`` (CPU, gloo).

    hf_trainer_ddp.py TEACHER OUTPUT_DIR ROWS

Each rank reads rows ``count_row(rank::world_size)`` through its own DistillReader and trains the
same GPT-2 student with DistillTrainer; it writes ``OUTPUT_DIR/rank<r>.json``: the rows its loss
was computed on, in order; rank 0 also saves its final parameters (``OUTPUT_DIR/params.pt``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from hf_trainer_models import count_row, make_reader, student_config
from transformers import GPT2LMHeadModel, TrainingArguments

from distill_reader.hf import DistillRows, DistillTrainer

K = 4


class Recording(DistillTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[list[int]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            for ids, n in zip(inputs["input_ids"].tolist(), inputs["teacher_lengths"].tolist()):
                self.rows.append(ids[:n])
        return super().compute_loss(model, inputs, *args, **kwargs)


def main() -> None:
    teacher, output, rows = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    shard = list(range(rank, rows, world_size))
    reader = make_reader(output / f"reader{rank}", teacher, K, rows=0)
    samples = [count_row(i) for i in shard]
    reader.set_sample_generator(lambda: ((s,) for s in samples))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(student_config())
    args = TrainingArguments(
        output_dir=str(output / "out"),
        per_device_train_batch_size=4,
        max_steps=len(shard) // 4,
        optim="sgd",  # (Adam's first steps are about the gradients' signs: float noise where they are 0)
        learning_rate=0.1,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Recording(model=model, args=args, train_dataset=DistillRows(reader))
    with reader:
        trainer.train()
    result = {"rank": rank, "world_size": trainer.args.world_size, "rows": trainer.rows}
    (output / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save({name: p.detach() for name, p in trainer.model.named_parameters()}, output / "params.pt")


if __name__ == "__main__":
    main()
