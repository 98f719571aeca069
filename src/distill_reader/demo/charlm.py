"""The text demo's models: character-level GRU language models in PyTorch, their training and ONNX export.

Imported only by ``distill demo text`` once it checked that torch and onnx are installed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill_reader.demo.text import INPUT_NAME, OUTPUT_NAME, VOCAB
from distill_reader.torch import topk_kl_loss


class CharLM(nn.Module):
    """Embedding -> one GRU layer -> linear: ``tokens`` int64 ``[n, L]`` -> ``logits`` ``[n, L, VOCAB]``.

    Causal by construction (a unidirectional GRU), so zeros padded after a row change none of its
    real positions: what the teacher server's padding and the reader's batches rely on.
    """

    def __init__(self, embedding: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embedding(tokens))[0])


def next_char_loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each real position's prediction of the next character of its row.

    A row of length ``l`` has ``l - 1`` targets (its last position's next character is not in it).
    """
    n, length, _ = logits.shape
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none").view(
        n, length - 1
    )
    real = torch.arange(length - 1)[None, :] < (lengths[:, None] - 1)
    return (losses * real).sum() / real.sum().clamp(min=1)


def train_teacher(batches: Iterable[list[np.ndarray]], seed: int, embedding: int = 64, hidden: int = 256) -> CharLM:
    """A teacher trained on next-character prediction, one Adam step per batch of rows."""
    torch.manual_seed(seed)
    model = CharLM(embedding, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for rows in batches:
        tokens, lengths = pad(rows)
        loss = next_char_loss(model(tokens), tokens, lengths)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def pad(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (tokens ``[n, longest]`` padded with 0, lengths ``[n]``), as the reader pads."""
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    tokens = np.zeros((len(rows), lengths.max()), dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return torch.from_numpy(tokens), torch.from_numpy(lengths)


class StudentTrainer:
    """A small student and its optimizer; :meth:`step` with or without the teacher's top-k.

    With the teacher: ``alpha * T^2 * topk_kl_loss + (1 - alpha) * next-character cross-entropy``,
    both over real positions only; without: the cross-entropy alone.
    """

    def __init__(self, seed: int, alpha: float, temperature: float, embedding: int = 16, hidden: int = 64) -> None:
        torch.manual_seed(seed)
        self.model = CharLM(embedding, hidden)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        self.alpha = alpha
        self.temperature = temperature

    def step(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        topk_values: torch.Tensor | None = None,
        topk_indices: torch.Tensor | None = None,
    ) -> float:
        logits = self.model(tokens)
        loss = next_char_loss(logits, tokens, lengths)
        if topk_values is not None:
            kl = topk_kl_loss(logits, topk_values, topk_indices, lengths, temperature=self.temperature)
            loss = self.alpha * self.temperature**2 * kl + (1 - self.alpha) * loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


@torch.no_grad()
def bits_per_char(model: CharLM, text: np.ndarray, window: int, batch: int = 64) -> float:
    """Exact bits per character of ``model`` on ``text``: the text cut into windows of ``window + 1``
    characters overlapping by one, each predicting its ``window`` next characters from a fresh state;
    the summed cross-entropy over every predicted character, divided by their count and by ln 2."""
    n = (len(text) - 1) // window
    inputs = torch.from_numpy(text[: n * window]).view(n, window)
    targets = torch.from_numpy(text[1 : n * window + 1]).view(n, window)
    total = 0.0
    for start in range(0, n, batch):
        logits = model(inputs[start : start + batch]).double()
        total += float(
            F.cross_entropy(logits.reshape(-1, VOCAB), targets[start : start + batch].reshape(-1), reduction="sum")
        )
    return total / (n * window) / math.log(2)


def export_onnx(model: CharLM, path: Path) -> Path:
    """``tokens`` int64 ``[batch, len]`` -> ``logits`` float32 ``[batch, len, VOCAB]``, batch and length dynamic."""
    example = torch.zeros((1, 8), dtype=torch.int64)  # batch 1: the exporter's advice for a GRU without h0
    with warnings.catch_warnings():
        # The tracer's warnings (a GRU exported with a batch other than 1, Python booleans in nn.GRU's
        # checks) concern a given h0 and fixed shapes: this model starts from zeros, and
        # tests/test_demo_text.py runs the exported file on other batch sizes and lengths.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "len"}, OUTPUT_NAME: {0: "batch", 1: "len"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript
        )
    return path
