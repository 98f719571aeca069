"""Distil a causal-LM teacher into a small GPT-2 student with transformers' Trainer.

    # a teacher: any local save_pretrained causal LM, its top-16 log-probs per token
    distill teacher serve --model hf:./teacher --topk 16 --listen 127.0.0.1:8001 &
    python examples/hf_trainer_student.py --teacher 127.0.0.1:8001 --tokenizer ./teacher \\
        --text corpus.txt --output-dir student --max-steps 1000

    # the same on 2 processes (DDP, one reader per rank), resuming from the last checkpoint
    torchrun --nproc_per_node 2 examples/hf_trainer_student.py ... --resume

The student shares the teacher's tokenizer: the teacher's top-k indices are token ids of the
student's vocabulary. The text is tokenized once, cut into windows of ``--max-length`` tokens, and
the last ``--eval-fraction`` of them are held out: the evaluation reports the student's
cross-entropy on them (no teacher needed). Each rank reads ``windows[rank::world_size]``,
cut to as many windows on every rank. See docs/llm-trainer.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainingArguments

from distill_reader import DistillReader
from distill_reader.hf import DistillRows, DistillTrainer

CONFIG = """\
[conf]
mode = fixed
servers = {servers!r}
max_length = {max_length}

[feed]
feed_vars = ['tokens']
feed_types = ['int64']
feed_shapes = [(-1,)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['logits_topk_values', 'logits_topk_indices']
fetch_types = ['{values_dtype}', 'int32']
fetch_shapes = [(-1, {topk}), (-1, {topk})]
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HOST:PORT[,HOST:PORT...] of the teacher servers")
    p.add_argument("--tokenizer", required=True, help="the teacher's tokenizer directory")
    p.add_argument("--text", required=True, help="a UTF-8 text file to train on")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--student", help="a save_pretrained causal LM to start from (default: a new small GPT-2)")
    p.add_argument("--topk", type=int, default=16, help="the teachers' --topk")
    p.add_argument("--topk-dtype", default="float32", choices=["float32", "float16"], help="the teachers' --topk-dtype")
    p.add_argument("--temperature", type=float, default=1.0, help="the teachers' --temperature")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL (1 - alpha: cross-entropy)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per training window")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=16, help="per_device_train_batch_size")
    p.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-steps", type=int, default=200)
    p.add_argument("--save-steps", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="go on from the last checkpoint in --output-dir")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where there is a GPU")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # Token windows of the text; the last ones held out for evaluation.
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = np.asarray(tokenizer(Path(args.text).read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    windows = [ids[i : i + args.max_length] for i in range(0, len(ids) - args.max_length + 1, args.max_length)]
    held_out = max(1, int(len(windows) * args.eval_fraction))
    train, evaluation = windows[:-held_out], windows[-held_out:]
    per_rank = len(train) // world_size  # as many rows on every rank: DDP steps together
    shard = train[rank::world_size][:per_rank]

    # One DistillReader per rank, over this rank's windows.
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    conf = output / f"reader-rank{rank}.conf"
    conf.write_text(
        CONFIG.format(
            servers=args.teacher.split(","), max_length=args.max_length, topk=args.topk, values_dtype=args.topk_dtype
        )
    )
    reader = DistillReader(conf, batch_size=64, d_batch_size=16, capacity=4, occupied_capacity=1)
    reader.set_sample_generator(lambda: ((window,) for window in shard))

    if args.student:
        model = AutoModelForCausalLM.from_pretrained(args.student)
    else:
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tokenizer), n_positions=args.max_length, n_embd=128, n_layer=2, n_head=4)
        )
    training = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        logging_steps=max(1, args.eval_steps // 4),
        report_to="none",
        dataloader_num_workers=0,  # the reader has its own process
        use_cpu=args.cpu,
    )
    trainer = DistillTrainer(
        model=model,
        args=training,
        train_dataset=DistillRows(reader, epochs=None),  # passes over the windows until max_steps
        eval_dataset=[{"input_ids": window} for window in evaluation],  # cross-entropy only
        alpha=args.alpha,
        temperature=args.temperature,
    )
    with reader:
        trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        trainer.save_model(str(output / "final"))
        tokenizer.save_pretrained(str(output / "final"))
        print(f"held-out cross-entropy {metrics['eval_loss']:.4f} nats/token after {trainer.state.global_step} steps")


if __name__ == "__main__":
    main()
