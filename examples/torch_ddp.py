"""DistributedDataParallel: every rank is its own student with its own DistillReader.

    python examples/torch_ddp.py --teachers HOST:PORT[,HOST:PORT] [--world-size 2]

Each rank reads its own shard of the training set (``samples[rank::world_size]``), streams it
through its own DistillReader to the teachers, and trains its DDP replica on the teacher's logits.
Started here with ``torch.multiprocessing.spawn`` on the CPU (gloo); with ``torchrun`` only the
process-group set-up differs. Teachers: any OIP server serving the digits model as ``digits``, e.g.
``distill teacher serve --model digits.onnx --name digits`` (see examples/torch_digits.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distill_reader import DistillReader
from distill_reader.demo.digits import load_digits_split, write_reader_config
from distill_reader.torch import DistillDataset


def run_rank(rank: int, world_size: int, teachers: list[str], port: int, epochs: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    data = load_digits_split()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def my_shard():  # each rank trains on its own samples
        for x, y in zip(data.x_train[rank::world_size], data.y_train[rank::world_size]):
            yield x, np.array([y], dtype=np.int64)

    seen = 0
    with tempfile.TemporaryDirectory() as tmp:
        config = write_reader_config(Path(tmp) / "reader.conf", teachers)
        with DistillReader(config, 32, 8, capacity=4, occupied_capacity=1) as reader:
            reader.set_sample_generator(my_shard)
            for _ in range(epochs):
                for pixels, _labels, teacher_logits in DistillDataset(reader):
                    t = 4.0
                    loss = (
                        t
                        * t
                        * F.kl_div(
                            F.log_softmax(model(pixels) / t, 1),
                            F.log_softmax(teacher_logits / t, 1),
                            reduction="batchmean",
                            log_target=True,
                        )
                    )
                    optimizer.zero_grad()
                    loss.backward()  # DDP averages the gradients over the ranks
                    optimizer.step()
                    seen += len(pixels)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean()
    Path(out, f"rank{rank}").write_text(f"{seen} {accuracy:.4f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", required=True, help="comma-separated HOST:PORT of OIP teachers")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--port", type=int, default=29511, help="the process group's rendezvous port")
    parser.add_argument("--out", default=".", help="folder for one result file per rank")
    args = parser.parse_args()
    torch.multiprocessing.spawn(
        run_rank,
        args=(args.world_size, args.teachers.split(","), args.port, args.epochs, args.out),
        nprocs=args.world_size,
    )
    for rank in range(args.world_size):
        seen, accuracy = Path(args.out, f"rank{rank}").read_text().split()
        print(f"rank {rank}: {seen} samples, test accuracy {accuracy}")


if __name__ == "__main__":
    main()
