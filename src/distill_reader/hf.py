"""Hugging Face transformers integration: train a causal-LM student with ``Trainer`` on DistillReader rows.

Three pieces (docs/llm-trainer.md shows a whole script):

- :class:`DistillRows`: an ``IterableDataset`` over a :class:`~distill_reader.DistillReader` whose
  config has a variable-length token var (``tokens``, its ``tokens_length``) and the teacher's
  per-token top-k (``logits_topk_values`` / ``logits_topk_indices``, ``[T, K]`` per row). It yields
  one dict per row, ``input_ids`` ``[T]``, ``teacher_topk_values`` and ``teacher_topk_indices``
  ``[T, K]`` (copies: the reader's pool is not held), and it remembers where it is (epoch, row), so
  that a resumed run skips the rows it had trained on *before* they are sent to a teacher.
- :class:`DistillCollator`: pads rows to the batch's longest: ``input_ids``, ``attention_mask``,
  ``labels`` (``-100`` on padding), and where the rows carry a teacher, ``teacher_topk_values``,
  ``teacher_topk_indices`` ``[n, L, K]`` (0 on padding) and ``teacher_lengths`` ``[n]``. Rows
  without a teacher (a plain held-out set: ``{"input_ids": [...]}``) collate too.
- :class:`DistillTrainer`: a ``Trainer`` whose loss is
  ``(1 - alpha) * CE + alpha * temperature**2 * KL``, both per token: the cross-entropy of the
  student's next-token predictions, and :func:`~distill_reader.torch.topk_kl_loss` between the
  teacher's top-k and the student at every position the teacher answered.

Students with another tokenizer (docs/llm-tokenizers.md): the reader's samples carry the student's
tokens, the teacher's tokens of the same text (the predict feed) and their alignment
(:func:`distill_reader.alignment.align_text`); ``DistillRows(reader, student_tokens=...,
alignment=...)`` yields ``input_ids`` (the student's), the teacher's top-k at the teacher's own
positions and ``alignment``; the collator pads each side to its own longest row; and
``DistillTrainer(loss="uld")`` trains on ``(1 - alpha) * CE + alpha * ULD``
(:func:`~distill_reader.torch.uld_loss`, Universal Logit Distillation at aligned positions).

The shift. A row's tokens ``x_0 .. x_{T-1}``; the teacher's top-k at position ``t`` is its
distribution of the token after ``x_0 .. x_t`` (it saw the same causal prefix), and the student's
logits at ``t`` predict the same token. So the KL compares ``logits[:, t]`` with the teacher at
``t`` for ``t < T`` (no shift), while the cross-entropy compares ``logits[:, t]`` with
``x_{t+1}`` for ``t < T - 1`` (``labels`` shifted by one, as in transformers' causal-LM loss): the
last position has a teacher distribution but no label.

Per-token normalization. During training each loss is summed over its tokens and divided by its
token count over the whole optimizer step (every micro-batch of the gradient accumulation, and
every rank when ``average_tokens_across_devices``): ``gradient_accumulation_steps`` micro-batches
of ``b`` rows give the gradient one batch of their rows would. Evaluation reports the per-batch
mean of the same loss (the cross-entropy alone for rows without a teacher).

Resuming. The trainer counts the rows it trained on and writes, with every checkpoint,
``distill_rows_rank<r>.json`` (the rows, and the reader's epoch and row they reach, per rank);
``train(resume_from_checkpoint=...)`` reads it and the dataset's next epoch skips those rows in the
user's reader (``DistillReader.distill_reader(skip_rows=...)``): they are not sent to a teacher
again. Trainer's own skipping (which would replay the batches through the reader) is turned off
for a :class:`DistillRows` train set. The user's reader function must yield the same rows in the
same order each time it is called.

Distributed data parallel (``torchrun``): one reader per rank. Each rank's reader function yields
that rank's share of the samples (``samples[rank::world_size]``, with equally many rows on every
rank), and the trainer gives each rank's :class:`DistillRows` to its own dataloader (accelerate
neither splits it nor dispatches rank 0's batches).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from accelerate.data_loader import DataLoaderShard
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "distill_reader.hf needs PyTorch, transformers and accelerate: pip install 'distill-reader[llm]'"
    ) from exc

from distill_reader.errors import ConfigError
from distill_reader.reader.distill_reader import DistillReader
from distill_reader.torch import topk_kl_loss, uld_loss

log = logging.getLogger("distill_reader")

#: The keys a teacher adds to a row and to a batch (``alignment``: a student with another tokenizer).
TEACHER_KEYS = ("teacher_topk_values", "teacher_topk_indices", "teacher_lengths", "alignment")
#: ``DistillTrainer``'s losses: the KL on the teacher's top-k (same tokenizer), Universal Logit Distillation.
LOSSES = ("kl", "uld")
#: The file each rank writes into a checkpoint: the rows it had trained on.
ROWS_FILE = "distill_rows_rank{rank}.json"


class DistillRows(IterableDataset):
    """The rows of a :class:`~distill_reader.DistillReader`, one dict each, for ``Trainer``.

    ``tokens``: the feed var of the token ids (variable length, ``(-1,)``); ``topk_values`` and
    ``topk_indices``: the fetch vars of the teacher's top-k (``(-1, K)``). ``epochs``: passes over
    the user's reader (``None``: forever, for a run bounded by ``max_steps``); a train set's
    iterations continue one another (:meth:`resume_at`), an evaluation set's each start again.
    Iterate it in the main process only (``dataloader_num_workers=0``): the reader runs its own
    pipeline process.

    A student with another tokenizer: ``tokens`` is the teacher's token feed var (the predict
    feed), ``student_tokens`` the student's and ``alignment`` the alignment's (all three variable,
    ``(-1,)``; see docs/llm-tokenizers.md). Each row then has ``input_ids`` (the student's tokens,
    ``[S]``), the teacher's top-k at the teacher's positions (``[T, K]``) and ``alignment`` ``[S]``
    (the teacher position supervising each student position, -1 for none).
    """

    def __init__(
        self,
        reader: DistillReader,
        *,
        tokens: str = "tokens",
        topk_values: str = "logits_topk_values",
        topk_indices: str = "logits_topk_indices",
        epochs: int | None = 1,
        student_tokens: str | None = None,
        alignment: str | None = None,
    ) -> None:
        super().__init__()
        if (student_tokens is None) != (alignment is None):
            raise ConfigError("DistillRows: student_tokens and alignment go together (another tokenizer)")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ConfigError(f"DistillRows: epochs must be an integer >= 1 or None, got {epochs!r}")
        config = reader.config
        feeds = [spec.name for spec in config.feeds]
        fetches = [spec.name for spec in config.fetches]
        if tokens not in feeds:
            raise ConfigError(f"DistillRows: tokens={tokens!r} is not a feed var of the reader ({feeds})")
        index = feeds.index(tokens)
        if index not in config.variable_feeds:
            raise ConfigError(f"DistillRows: feed var {tokens!r} must have a variable length, shape (-1,)")
        for name in (topk_values, topk_indices):
            if name not in fetches:
                raise ConfigError(f"DistillRows: {name!r} is not a fetch var of the reader ({fetches})")
        n_feeds, n_fetches = len(feeds), len(fetches)
        # The student's tokens and the alignment (another tokenizer): variable feed vars, with lengths.
        self._student: tuple[int, int, int, int] | None = None
        if student_tokens is not None and alignment is not None:
            positions = []
            for name in (student_tokens, alignment):
                if name not in feeds:
                    raise ConfigError(f"DistillRows: {name!r} is not a feed var of the reader ({feeds})")
                if feeds.index(name) not in config.variable_feeds:
                    raise ConfigError(f"DistillRows: feed var {name!r} must have a variable length, shape (-1,)")
                positions.append(feeds.index(name))
            lengths = [n_feeds + n_fetches + config.variable_feeds.index(i) for i in positions]
            self._student = (positions[0], lengths[0], positions[1], lengths[1])
        self.reader = reader
        self.epochs = epochs
        self._tokens = index
        self._values = n_feeds + fetches.index(topk_values)
        self._indices = n_feeds + fetches.index(topk_indices)
        self._length = n_feeds + n_fetches + config.variable_feeds.index(index)
        # Where the next iteration starts, and the rows before it (trained on in earlier runs).
        self._start = (0, 0)
        self._rows_before = 0
        self._stream = False
        # (rows before the epoch's first row, epoch) for each epoch begun: see position().
        self._epoch_starts: list[tuple[int, int]] = [(0, 0)]

    def resume_at(self, epoch: int, row: int, rows: int) -> None:
        """Make the dataset a stream (what :class:`DistillTrainer` does with its train set) that starts
        at ``row`` of ``epoch`` (0-based), after ``rows`` rows in all.

        A stream's iterations continue one another: Trainer iterates an ``IterableDataset`` again
        when it ends before ``max_steps``, and each new iteration starts with the epoch after the
        last one (none once ``epochs`` were read). Otherwise every iteration starts at the first
        row (an evaluation set).
        """
        self._start = (int(epoch), int(row))
        self._rows_before = int(rows)
        self._stream = True
        self._epoch_starts = [(int(rows) - int(row), int(epoch))]

    def position(self, rows: int) -> tuple[int, int]:
        """The (epoch, row) a stream reached once ``rows`` rows (counted from the first ever) were consumed."""
        starts = [start for start in self._epoch_starts if start[0] <= rows]
        begun, epoch = starts[-1] if starts else self._epoch_starts[0]
        return epoch, rows - begun

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise ConfigError(
                "DistillRows runs its reader's pipeline process: use dataloader_num_workers=0 (the default)"
            )
        epoch, row = self._start
        rows = self._rows_before
        while self.epochs is None or epoch < self.epochs:
            epoch_reader = self.reader.distill_reader(skip_rows=row) if row else self.reader.distill_reader()
            for batch in epoch_reader():
                lengths = batch[self._length]
                for i, length in enumerate(lengths.tolist()):
                    # ``sample``, not ``row``: that is the row the epoch started at, above.
                    if self._student is None:
                        sample = {"input_ids": torch.tensor(batch[self._tokens][i, :length])}
                    else:  # another tokenizer: the student's own tokens, not the teacher's
                        tokens, tokens_length, alignment, alignment_length = self._student
                        student_length = int(batch[tokens_length][i])
                        if int(batch[alignment_length][i]) != student_length:
                            raise ConfigError(
                                f"DistillRows: a row has {student_length} student tokens but "
                                f"{int(batch[alignment_length][i])} alignment entries"
                            )
                        sample = {
                            "input_ids": torch.tensor(batch[tokens][i, :student_length]),
                            "alignment": torch.tensor(batch[alignment][i, :student_length], dtype=torch.long),
                        }
                    sample["teacher_topk_values"] = torch.tensor(batch[self._values][i, :length])
                    sample["teacher_topk_indices"] = torch.tensor(batch[self._indices][i, :length])
                    yield sample
                    rows += 1
            epoch, row = epoch + 1, 0
            if self._stream:
                self._start, self._rows_before = (epoch, 0), rows
                self._epoch_starts.append((rows, epoch))


class DistillCollator:
    """Pads a list of rows (dicts with ``input_ids``, and optionally the teacher's top-k) on the right.

    ``input_ids``: padded with ``pad_token_id`` (any id: the attention mask hides it and its label
    is ``-100``); ``labels``: ``input_ids`` with ``-100`` on padding (the model shifts them, so
    position ``t``'s label is token ``t + 1``); ``teacher_lengths``: each row's length. Either every
    row carries a teacher or none does.

    Rows with an ``alignment`` (a student with another tokenizer): the teacher's top-k is padded to
    the batch's longest *teacher* row, ``teacher_lengths`` are the teacher's row lengths (the
    top-k's positions), and ``alignment`` ``[n, L]`` is padded with -1 (no teacher position).
    Either every row carries an alignment or none does.
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ConfigError("DistillCollator: no rows")
        ids = [torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long) for row in rows]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        width = int(lengths.max())
        real = torch.arange(width)[None, :] < lengths[:, None]
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
        batch = {
            "input_ids": input_ids,
            "attention_mask": real.long(),
            "labels": torch.where(real, input_ids, -100),
        }
        with_teacher = ["teacher_topk_values" in row for row in rows]
        if any(with_teacher):
            if not all(with_teacher):
                raise ConfigError("DistillCollator: some rows carry the teacher's top-k and others do not")
            aligned = ["alignment" in row for row in rows]
            if any(aligned) and not all(aligned):
                raise ConfigError("DistillCollator: some rows carry an alignment and others do not")
            teacher_lengths = lengths
            if all(aligned):
                # Another tokenizer: the teacher's rows have their own lengths.
                teacher_lengths = torch.tensor(
                    [len(np.asarray(row["teacher_topk_values"])) for row in rows], dtype=torch.long
                )
                alignment = torch.full((len(rows), width), -1, dtype=torch.long)
                for i, row in enumerate(rows):
                    part = torch.as_tensor(np.asarray(row["alignment"]), dtype=torch.long)
                    if part.shape != (int(lengths[i]),):
                        raise ConfigError(
                            f"DistillCollator: row {i} has {int(lengths[i])} tokens but an alignment of "
                            f"shape {tuple(part.shape)}"
                        )
                    alignment[i, : len(part)] = part
                batch["alignment"] = alignment
            teacher_width = int(teacher_lengths.max())
            for key in ("teacher_topk_values", "teacher_topk_indices"):
                parts = [torch.as_tensor(np.asarray(row[key])) for row in rows]
                out = torch.zeros((len(rows), teacher_width, parts[0].shape[-1]), dtype=parts[0].dtype)
                for i, part in enumerate(parts):
                    if part.shape[0] != teacher_lengths[i]:
                        raise ConfigError(
                            f"DistillCollator: row {i} has {int(teacher_lengths[i])} tokens but {part.shape[0]} "
                            f"positions of {key}"
                        )
                    out[i, : part.shape[0]] = part
                batch[key] = out
            batch["teacher_lengths"] = teacher_lengths
        return batch


def aligned_positions(alignment: torch.Tensor, teacher_lengths: torch.Tensor) -> torch.Tensor:
    """``[n, S]`` bool: the student positions :func:`~distill_reader.torch.uld_loss` compares (an
    alignment that is not -1 and points inside the teacher's row)."""
    teacher_lengths = teacher_lengths.to(alignment.device)
    return (alignment >= 0) & (alignment < teacher_lengths[:, None])


def teacher_positions(batch: dict[str, torch.Tensor]) -> int:
    """The positions a batch's distillation term averages over: the teacher's positions, or the
    aligned student positions of a batch with an ``alignment``; 0 without a teacher."""
    if "teacher_lengths" not in batch:
        return 0
    if "alignment" in batch:
        return int(aligned_positions(batch["alignment"], batch["teacher_lengths"]).sum())
    return int(batch["teacher_lengths"].sum())


def distill_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: dict[str, torch.Tensor] | None = None,
    *,
    temperature: float = 1.0,
    values: str = "logprobs",
    tail: str = "bucket",
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed losses of a batch and their token counts: ``(ce_sum, ce_tokens, kl_sum, kl_tokens)``.

    ``logits`` ``[n, L, V]`` (the student's); ``labels`` ``[n, L]`` (``-100``: no label), shifted
    here: ``logits[:, t]`` against ``labels[:, t + 1]``. ``teacher``: ``teacher_topk_values``,
    ``teacher_topk_indices`` ``[n, L, K]`` and ``teacher_lengths`` ``[n]``, compared with
    ``logits[:, t]`` at ``t < teacher_lengths`` (``None``: the KL terms are 0). A teacher with an
    ``alignment`` ``[n, L]`` (another tokenizer): the distillation terms are
    :func:`~distill_reader.torch.uld_loss`'s sum and the count of aligned positions instead
    (``tail`` is then ``uld_loss``'s, ``values`` must be ``"logprobs"``).
    """
    vocab = logits.shape[-1]
    shift_labels = labels[:, 1:]
    ce_sum = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    ce_tokens = (shift_labels != -100).sum()
    if teacher is None:
        zero = torch.zeros((), device=logits.device)
        return ce_sum, ce_tokens, zero, torch.zeros((), dtype=torch.long, device=logits.device)
    lengths = teacher["teacher_lengths"]
    if "alignment" in teacher:
        if values != "logprobs" or reverse:
            raise ConfigError("the ULD loss takes the teacher's log-probs (values='logprobs') and no reverse")
        alignment = teacher["alignment"].to(logits.device)
        uld_sum = uld_loss(
            logits,
            teacher["teacher_topk_values"],
            alignment,
            None,  # the alignment is -1 on padding
            lengths,
            temperature=temperature,
            tail=tail,
            reduction="sum",
        )
        return ce_sum, ce_tokens, uld_sum, aligned_positions(alignment, lengths).sum()
    kl_sum = topk_kl_loss(
        logits,
        teacher["teacher_topk_values"],
        teacher["teacher_topk_indices"],
        lengths,
        values=values,
        temperature=temperature,
        tail=tail,
        reverse=reverse,
        reduction="sum",
    )
    return ce_sum, ce_tokens, kl_sum, lengths.sum()


class DistillTrainer(Trainer):
    """A ``Trainer`` for a causal-LM student on :class:`DistillRows` (or any rows :class:`DistillCollator` takes).

    ``alpha``: the weight of the KL (``1 - alpha``: the cross-entropy's); ``temperature``: the
    temperature of the student's softmax in the KL, the teacher server's ``--temperature`` (its
    log-probs are published at it), and the KL is multiplied by ``temperature**2`` (Hinton et al.);
    ``values``, ``tail``, ``reverse``: as in :func:`~distill_reader.torch.topk_kl_loss`. Every other
    argument is ``Trainer``'s; ``data_collator`` defaults to :class:`DistillCollator`.

    ``loss="uld"``: a student with another tokenizer, on rows with an ``alignment``
    (``DistillRows(..., student_tokens=..., alignment=...)``): ``(1 - alpha) * CE + alpha * ULD``,
    the cross-entropy on the student's own tokens and :func:`~distill_reader.torch.uld_loss` per
    aligned position (Boizard et al., 2024: the L1 distance between the sorted next-token
    distributions; no ``temperature**2``, it is not a KL; ``temperature`` divides the student's
    logits; ``tail`` is ``"bucket"`` or ``"zeros"``). Each loss takes only its kind of rows.

    Needs a transformers whose ``Trainer`` has ``loss_is_scaled_for_ga`` (5.25 is tested): the loss
    is normalized over the optimizer step, which the Trainer must not divide again. Keep
    ``dataloader_num_workers=0``.
    """

    def __init__(
        self,
        *args: Any,
        alpha: float = 0.5,
        temperature: float = 1.0,
        values: str = "logprobs",
        tail: str = "bucket",
        reverse: bool = False,
        loss: str = "kl",
        **kwargs: Any,
    ) -> None:
        if loss not in LOSSES:
            raise ConfigError(f"DistillTrainer: loss must be one of {LOSSES}, got {loss!r}")
        if loss == "uld" and (values != "logprobs" or reverse):
            raise ConfigError("DistillTrainer: loss='uld' takes the teacher's log-probs and no reverse")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"DistillTrainer: alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ConfigError(f"DistillTrainer: temperature must be > 0, got {temperature}")
        if "loss_is_scaled_for_ga" not in vars(Trainer):
            raise ImportError(
                "DistillTrainer needs a transformers whose Trainer has loss_is_scaled_for_ga (5.25 is tested): "
                "pip install -U transformers"
            )
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = DistillCollator()
        super().__init__(*args, **kwargs)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.kl_options = {"values": values, "tail": tail, "reverse": reverse}
        self.loss = loss
        # The token counts of the optimizer step under way (set by get_batch_samples, read by
        # compute_loss within training_step); None: per-batch means (evaluation).
        self._step_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows_trained = 0
        self.add_callback(_RowsCheckpoint(self))

    # -- loss ---------------------------------------------------------------------------------
    @property
    def loss_is_scaled_for_ga(self) -> bool:  # type: ignore[override]
        """Trainer divides the loss by the accumulation steps unless it was normalized over the step."""
        return self._step_tokens is not None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``(1 - alpha) * CE + alpha * temperature**2 * KL`` (``loss="uld"``: ``+ alpha * ULD``), each per token."""
        inputs = dict(inputs)
        teacher = {key: inputs.pop(key) for key in TEACHER_KEYS if key in inputs}
        labels = inputs.pop("labels")
        if teacher and ("alignment" in teacher) != (self.loss == "uld"):
            raise ConfigError(
                f"DistillTrainer(loss={self.loss!r}) got a batch "
                + ("with an alignment: use loss='uld'" if "alignment" in teacher else "without an alignment")
            )
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        ce_sum, ce_tokens, kl_sum, kl_tokens = distill_loss_sums(
            logits, labels, teacher or None, temperature=self.temperature, **self.kl_options
        )
        if self._step_tokens is not None:
            ce_tokens, kl_tokens = self._step_tokens
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        else:
            scale = 1
        ce = ce_sum / ce_tokens.clamp(min=1)
        if teacher:
            kl = kl_sum / kl_tokens.clamp(min=1)
            weight = self.temperature**2 if self.loss == "kl" else 1.0
            loss = (1.0 - self.alpha) * ce + self.alpha * weight * kl
        else:
            loss = ce
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, *args: Any, **kwargs: Any):
        """Trainer's, and the token counts of the step's micro-batches (over every rank when
        ``average_tokens_across_devices``), for :meth:`compute_loss`."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        ce = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batch_samples)
        kl = sum(teacher_positions(batch) for batch in batch_samples)
        counts = torch.tensor([ce, kl], dtype=torch.long, device=self.args.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).view(-1, 2).sum(0)
        self._batch_tokens = (counts[0], counts[1])
        return batch_samples, num_items_in_batch

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        self.rows_trained += int(inputs["input_ids"].shape[0])
        self._step_tokens = self._batch_tokens
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._step_tokens = None

    # -- data ---------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # Keep the teacher's fields of map-style rows (Trainer drops what forward() does not take).
        self._signature_columns += [key for key in TEACHER_KEYS if key not in self._signature_columns]

    def _rows_loader(self, dataset: DistillRows, batch_size: int) -> DataLoaderShard:
        # accelerate would split an IterableDataset between ranks or dispatch rank 0's batches:
        # each rank has its own reader and its own rows instead.
        return DataLoaderShard(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=0,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, DistillRows):
            return self._rows_loader(self.train_dataset, self._train_batch_size)
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset: Any = None):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if isinstance(dataset, DistillRows):
            return self._rows_loader(dataset, self.args.eval_batch_size)
        return super().get_eval_dataloader(eval_dataset)

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        if isinstance(self.train_dataset, DistillRows):
            return dataloader  # it skips the rows itself, before they reach a teacher
        return super().get_resumed_dataloader(dataloader, num_batches)

    # -- resuming -----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        dataset = self.train_dataset
        self.rows_trained = 0
        if isinstance(dataset, DistillRows):
            dataset.resume_at(0, 0, 0)
            if checkpoint and not self.args.ignore_data_skip:
                self._resume_rows(dataset, str(checkpoint))
        return super().train(checkpoint if checkpoint else resume_from_checkpoint, *args, **kwargs)

    def _resume_rows(self, dataset: DistillRows, checkpoint: str) -> None:
        path = os.path.join(checkpoint, ROWS_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            log.warning("%s: no %s; the reader starts from its first row", checkpoint, os.path.basename(path))
            return
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("world_size") != self.args.world_size:
            raise ConfigError(
                f"{path}: saved by {saved.get('world_size')} ranks, resumed by {self.args.world_size}: "
                "each rank's reader has other rows now; resume with as many ranks"
            )
        dataset.resume_at(saved["epoch"], saved["row"], saved["rows"])
        self.rows_trained = int(saved["rows"])
        log.info(
            "resuming the reader at epoch %d, row %d (%d rows trained)", saved["epoch"], saved["row"], saved["rows"]
        )


class _RowsCheckpoint(TrainerCallback):
    """Writes the rows a rank has trained on into each checkpoint (``distill_rows_rank<r>.json``)."""

    def __init__(self, trainer: DistillTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        dataset = self.trainer.train_dataset
        if not isinstance(dataset, DistillRows):
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        rows = self.trainer.rows_trained
        epoch, row = dataset.position(rows)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ROWS_FILE.format(rank=args.process_index))
        saved = {"rows": rows, "epoch": epoch, "row": row, "world_size": args.world_size}
        with open(path + ".tmp", "w") as fh:
            json.dump(saved, fh)
        os.replace(path + ".tmp", path)
