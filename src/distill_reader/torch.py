"""PyTorch integration: DistillReader batches as ``torch.Tensor``s.

``DistillDataset(reader)`` is an ``IterableDataset`` whose every iteration runs one epoch of the
reader and yields a list of tensors (feed vars, then fetch vars). Tensors are made with
``torch.from_numpy``, so they share the reader's pool memory (no copy): like the arrays, they stay
valid until ``occupied_capacity`` further batches were taken. ``pin_memory=True`` copies each
batch into page-locked memory instead (one copy, for fast ``.to("cuda", non_blocking=True)``);
where torch has no accelerator to pin memory for (a CPU-only build or machine) the dataset warns and
makes plain copies, which are still independent of the pool.

Iterate it directly, or through ``DataLoader(dataset, batch_size=None, num_workers=0)``: the
reader already batches and already works in its own process, so DataLoader workers add nothing
(and would each start a reader of their own).

Distributed data parallel: every rank is its own student. Give each rank its own shard of the
data (its reader function yields only that rank's samples, e.g. ``samples[rank::world_size]``)
and its own DistillReader; in discover mode each rank registers separately and discovery spreads
the teachers over all ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping

try:
    import torch
    from torch.utils.data import IterableDataset
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("distill_reader.torch needs PyTorch: pip install torch") from exc

from distill_reader.errors import ConfigError
from distill_reader.reader.distill_reader import DistillReader


def can_pin_memory() -> bool:
    """Whether ``Tensor.pin_memory()`` works here: it needs an accelerator (CUDA, ROCm, ...)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


class DistillDataset(IterableDataset):
    """An ``IterableDataset`` over a configured :class:`~distill_reader.DistillReader`.

    ``pin_memory=True``: every tensor is a copy, page-locked where :func:`can_pin_memory`.
    """

    def __init__(self, reader: DistillReader, pin_memory: bool = False) -> None:
        super().__init__()
        self.reader = reader
        self.pin_memory = pin_memory
        self._pin = pin_memory and can_pin_memory()
        if pin_memory and not self._pin:
            warnings.warn(
                "DistillDataset(pin_memory=True): torch has no accelerator to pin memory for; "
                "each batch is copied into ordinary memory instead",
                stacklevel=2,
            )
        self._epoch = reader.distill_reader()

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            raise ConfigError(
                "DistillDataset runs its own pipeline process: use DataLoader(..., num_workers=0) "
                "or iterate the dataset directly"
            )
        for batch in self._epoch():
            tensors = [torch.from_numpy(array) for array in batch]
            if self._pin:
                tensors = [t.pin_memory() for t in tensors]
            elif self.pin_memory:
                tensors = [t.clone() for t in tensors]
            yield tensors


# --- Top-k distillation loss -------------------------------------------------------------------

# Teacher log-probs below this (the log of float32's smallest normal number, about -87.3),
# including -inf, count as this value: the reverse KL stays finite where the teacher gives an entry
# probability 0, and the forward KL moves by less than 1e-35 per entry.
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)
_VALUES = ("logprobs", "logits")
_TAILS = ("bucket", "renormalize")
_REDUCTIONS = ("mean", "sum", "none")


def topk_kl_loss(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    values: str = "logprobs",
    temperature: float = 1.0,
    tail: str = "bucket",
    reduction: str = "mean",
) -> torch.Tensor:
    """KL divergence between a student and a teacher known only by its top-k entries per token.

    ``student_logits`` ``[n, L, V]``; ``topk_values`` and ``topk_indices`` (int32 or int64)
    ``[n, L, K]``: the teacher's K largest entries at each position and their vocabulary indices,
    distinct within a position; ``lengths`` ``[n]``: positions ``>= lengths[i]`` are padding and
    contribute nothing, whatever they hold (``None``: every position is real; then any
    ``[..., V]`` / ``[..., K]`` shapes work). Computed in float32 at least (float16 inputs welcome),
    differentiable w.r.t. ``student_logits``.

    - ``values="logprobs"`` (what ``distill teacher serve`` publishes by default): the teacher's
      log-probabilities over the whole vocabulary, at whatever temperature the server applied.
      ``values="logits"``: raw teacher logits, divided by ``temperature`` like the student's; they
      say nothing about the mass outside the top-k, so they need ``tail="renormalize"``.
    - ``temperature`` divides the student's logits (and raw teacher logits).
    - ``reverse=False``: forward KL(teacher || student), the usual distillation loss (mass-covering);
      ``reverse=True``: KL(student || teacher) (mode-seeking).
    - ``tail``, the rule for the probability mass outside the top-k:

      ``"bucket"`` (default): the teacher's top-k probabilities are kept as they are and its missing
      mass ``1 - sum(p_topk)`` goes into one "rest" bucket, compared with the student's mass outside
      the same K indices. This is the exact KL between the two distributions coarse-grained onto
      K + 1 outcomes (the K entries and "everything else"): a lower bound of the dense KL, equal to it
      when K = V, and it never makes the teacher look more confident than it is.

      ``"renormalize"``: the teacher's top-k renormalized to sum to 1, compared with the student's
      distribution restricted to the same K indices and renormalized: the exact KL of the two
      distributions conditioned on "the outcome is one of these K". It ignores how much mass the
      student puts elsewhere (nothing pushes it back into the top-k), so prefer ``"bucket"`` when the
      teacher sends log-probs.

    - ``reduction="mean"``: the per-token KL averaged over real tokens (0 when there are none);
      ``"sum"``: summed over real tokens; ``"none"``: per token, shape ``[n, L]``, 0 at padding.

    Teacher log-probs below ``log(float32 tiny)`` (about -87.3), ``-inf`` included, count as that
    floor, so the reverse KL stays finite. As in Hinton et al., multiply by ``temperature**2`` when
    mixing with a hard-label loss.
    """
    if values not in _VALUES:
        raise ConfigError(f"topk_kl_loss: values must be one of {_VALUES}, got {values!r}")
    if tail not in _TAILS:
        raise ConfigError(f"topk_kl_loss: tail must be one of {_TAILS}, got {tail!r}")
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"topk_kl_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if values == "logits" and tail == "bucket":
        raise ConfigError(
            "topk_kl_loss: values='logits' carry no information about the mass outside the top-k; "
            "pass tail='renormalize' (or have the teacher publish log-probs)"
        )
    if not temperature > 0:
        raise ConfigError(f"topk_kl_loss: temperature must be > 0, got {temperature}")
    real = _real_positions(student_logits, topk_values, topk_indices, lengths)

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    vocab, k = student_logits.shape[-1], topk_values.shape[-1]
    # Padding may hold anything (NaN, duplicated indices): replace it with harmless values before
    # computing, since masking a NaN afterwards would still poison the gradients.
    real_k = real.unsqueeze(-1)
    logits = torch.where(real_k, student_logits.to(dtype), 0.0) / temperature
    teacher = torch.where(real_k, topk_values.to(dtype), -math.log(k))
    indices = torch.where(real_k, topk_indices.long(), torch.arange(k, device=topk_indices.device))
    _check_indices(indices, real, vocab)

    student_logp = torch.log_softmax(logits, dim=-1)
    student_topk = student_logp.gather(-1, indices)
    if values == "logits":
        teacher = teacher / temperature
    if tail == "renormalize":
        teacher_logp = torch.log_softmax(teacher.clamp(min=_LOG_FLOOR) if values == "logprobs" else teacher, dim=-1)
        student_logq = torch.log_softmax(student_topk, dim=-1)
        kl = _kl(teacher_logp, student_logq, reverse)
    else:
        teacher_logp = teacher.clamp(min=_LOG_FLOOR)
        kl = _kl(teacher_logp, student_topk, reverse)
        if k < vocab:  # at K = V there is no rest (and no rest bucket)
            # log(1 - sum p_topk) cancels digits when the top-k holds nearly all the mass: in float64
            # (cheap: K values a token) it is exact for the values given, as float32 would not be.
            exact = torch.float64 if teacher_logp.device.type != "mps" else dtype  # MPS has no float64
            teacher_rest = torch.logsumexp(teacher_logp.to(exact), dim=-1).clamp(max=0.0)
            teacher_rest = torch.log(-torch.expm1(teacher_rest)).clamp(min=_LOG_FLOOR).to(dtype)
            # The student's log-mass outside the K indices, computed from its logits rather than as
            # log(1 - sum q_topk), which loses all precision when the top-k holds nearly all the mass.
            outside = logits.scatter(-1, indices, torch.finfo(dtype).min)
            student_rest = torch.logsumexp(outside, dim=-1) - torch.logsumexp(logits, dim=-1)
            kl = kl + _kl(teacher_rest.unsqueeze(-1), student_rest.unsqueeze(-1), reverse)
    kl = torch.where(real, kl, 0.0)
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    return total / real.sum().clamp(min=1)


def multi_teacher_loss(
    student_logits: torch.Tensor,
    teachers: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    weights: Mapping[str, float] | None = None,
    lengths: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    values: str = "logprobs",
    temperature: float = 1.0,
    tail: str = "bucket",
    reduction: str = "mean",
) -> torch.Tensor:
    """The weighted sum of one KL per teacher, for teacher groups (``[teacher NAME]``, docs/groups.md).

    ``teachers`` maps a teacher's name (its group, say) to what it sent: a pair ``(topk_values,
    topk_indices)`` (its top-k at each position, as for :func:`topk_kl_loss`), or one tensor of
    shape ``student_logits.shape`` (its whole distribution, e.g. a classifier's 10 outputs).
    ``weights`` maps the same names to a weight >= 0 each (``None``: ``1 / len(teachers)`` each,
    the mean); the result is ``sum(weights[t] * KL_t)``. Every other argument is
    :func:`topk_kl_loss`'s and applies to each teacher (``values="logits"``: a whole distribution is
    compared renormalized, which is exact when it covers the vocabulary).
    """
    if not teachers:
        raise ConfigError("multi_teacher_loss: teachers is empty; give each teacher's outputs by name")
    if weights is None:
        weights = {name: 1.0 / len(teachers) for name in teachers}
    if set(weights) != set(teachers):
        missing, extra = sorted(set(teachers) - set(weights)), sorted(set(weights) - set(teachers))
        raise ConfigError(
            f"multi_teacher_loss: weights must name the teachers {sorted(teachers)}; missing {missing}, unknown {extra}"
        )
    total: torch.Tensor | None = None
    for name, outputs in teachers.items():
        weight = weights[name]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"multi_teacher_loss: weights[{name!r}] must be a number >= 0, got {weight!r}")
        if isinstance(outputs, torch.Tensor):  # the whole distribution: its top-k is all of it
            if outputs.shape != student_logits.shape:
                raise ConfigError(
                    f"multi_teacher_loss: teachers[{name!r}] has shape {tuple(outputs.shape)}, the student's logits "
                    f"{tuple(student_logits.shape)}; pass a (topk_values, topk_indices) pair for a top-k teacher"
                )
            vocab = student_logits.shape[-1]
            indices = torch.arange(vocab, device=outputs.device).expand(outputs.shape)
            outputs, teacher_tail = (outputs, indices), ("renormalize" if values == "logits" else tail)
        else:
            teacher_tail = tail
        topk_values, topk_indices = outputs
        kl = topk_kl_loss(
            student_logits,
            topk_values,
            topk_indices,
            lengths,
            reverse=reverse,
            values=values,
            temperature=temperature,
            tail=teacher_tail,
            reduction=reduction,
        )
        total = weight * kl if total is None else total + weight * kl
    assert total is not None
    return total


def _kl(logp: torch.Tensor, logq: torch.Tensor, reverse: bool) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities (KL(q || p) when ``reverse``)."""
    if reverse:
        logp, logq = logq, logp
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _real_positions(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    lengths: torch.Tensor | None,
) -> torch.Tensor:
    """Check the shapes; the boolean mask of real (not padded) positions, ``student_logits.shape[:-1]``."""
    if student_logits.dim() < 2:
        raise ConfigError(f"topk_kl_loss: student_logits must be [..., V], got shape {tuple(student_logits.shape)}")
    if topk_values.shape != topk_indices.shape:
        raise ConfigError(
            f"topk_kl_loss: topk_values {tuple(topk_values.shape)} and topk_indices "
            f"{tuple(topk_indices.shape)} must have the same shape"
        )
    if topk_values.shape[:-1] != student_logits.shape[:-1]:
        raise ConfigError(
            f"topk_kl_loss: topk_values {tuple(topk_values.shape)} must match student_logits "
            f"{tuple(student_logits.shape)} in every dimension but the last"
        )
    if not 1 <= topk_values.shape[-1] <= student_logits.shape[-1]:
        raise ConfigError(
            f"topk_kl_loss: K = {topk_values.shape[-1]} must be between 1 and the vocabulary size "
            f"V = {student_logits.shape[-1]}"
        )
    if topk_indices.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"topk_kl_loss: topk_indices must be int32 or int64, got {topk_indices.dtype}")
    if not topk_values.is_floating_point():
        raise ConfigError(f"topk_kl_loss: topk_values must be floating point, got {topk_values.dtype}")
    if lengths is None:
        return torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    if student_logits.dim() != 3:
        raise ConfigError(
            f"topk_kl_loss: with lengths, student_logits must be [n, L, V], got shape {tuple(student_logits.shape)}"
        )
    n, length = student_logits.shape[:2]
    if lengths.shape != (n,) or lengths.is_floating_point():
        raise ConfigError(
            f"topk_kl_loss: lengths must be an integer tensor of shape ({n},), "
            f"got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if bool(((lengths < 0) | (lengths > length)).any()):
        raise ConfigError(f"topk_kl_loss: lengths must be in [0, L = {length}], got {lengths.tolist()}")
    positions = torch.arange(length, device=student_logits.device)
    return positions < lengths.to(student_logits.device).unsqueeze(-1)


def _check_indices(indices: torch.Tensor, real: torch.Tensor, vocab: int) -> None:
    """Indices at real positions must lie in [0, V) and be distinct within their position."""
    if bool(((indices < 0) | (indices >= vocab)).any()):
        raise ConfigError(f"topk_kl_loss: topk_indices must lie in [0, V = {vocab}) at every real position")
    sorted_indices = indices.sort(dim=-1).values
    if bool((sorted_indices[..., 1:] == sorted_indices[..., :-1]).any()):
        raise ConfigError("topk_kl_loss: topk_indices repeat an index within a position")


# --- Cross-tokenizer distillation: Universal Logit Distillation --------------------------------

_ULD_TAILS = ("bucket", "zeros")


def uld_loss(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    alignment: torch.Tensor,
    student_lengths: torch.Tensor | None = None,
    teacher_lengths: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    reduction: str = "mean",
) -> torch.Tensor:
    """Universal Logit Distillation between a student and a teacher with another tokenizer.

    Boizard, El Haddad, Hudelot, Colombo, "Towards Cross-Tokenizer Distillation: the Universal
    Logit Distillation Loss for LLMs", arXiv:2402.12030 (2024). At each aligned pair of positions,
    the distance between the student's and the teacher's next-token distributions **sorted in
    decreasing order**, the shorter vector padded with zeros::

        d = sum_i | q_(i) - p_(i) |        q_(1) >= q_(2) >= ...,  p_(1) >= p_(2) >= ...

    which the paper derives as a closed form of the 1-Wasserstein distance between the two
    distributions when the transport cost between any student token and any teacher token is the
    same (the vocabularies have no known correspondence). What it assumes, and so what it teaches:
    it ignores *which* tokens carry the mass (it is unchanged by any relabelling of either
    vocabulary) and matches only the shape of the distribution: how confident the teacher is, and
    how its mass spreads over its 1st, 2nd, ... most likely tokens. Its value lies in [0, 2].

    - ``student_logits`` ``[n, S, V]``; ``teacher_topk_values`` ``[n, T, K]``: the teacher's top-K
      **log-probabilities** at each of its positions (what ``distill teacher serve --topk``
      publishes; the indices are not needed, the loss does not look at token identities), at
      whatever temperature the server applied; ``alignment`` (integer) ``[n, S]``: for each student
      position, the teacher position whose distribution supervises it, -1 for none
      (:func:`distill_reader.alignment.align`: the positions whose contexts end at the same place
      of the text). The teacher's values must be on the student's device; the alignment and the
      lengths are moved there. The paper pairs positions by index from the answer's first token instead; the
      alignment replaces that.
    - Masked (contributing 0): student positions ``>= student_lengths[i]``, positions whose
      alignment is negative, and positions aligned with a teacher position ``>= teacher_lengths[i]``
      (or ``>= T``), e.g. a teacher row cut shorter than the text. ``None`` lengths: all real.
    - ``temperature`` divides the student's logits (the teacher's is the server's).
    - ``tail``: the teacher is known by its top K only; ``r = 1 - sum(p_topk)`` is its mass on
      tokens it did not send, in unknown pieces each at most ``p_(K)``. ``"bucket"`` (default) ends
      the sum with ``|sum_{i>K} q_(i) - r|`` (the student's mass past its own K largest against
      ``r``): by the triangle inequality a lower bound of the full-vocabulary distance, within
      ``2 r`` of it, and 0 for a student equal to the teacher. ``"zeros"``: the teacher's sorted
      vector padded with zeros after its K values, as the paper pads the shorter vocabulary: it ends
      with ``sum_{i>K} q_(i)``, within ``r`` of the full distance, but it pushes the student to put
      all its mass into K tokens. Both equal the paper's loss when ``r = 0`` (K the teacher's whole
      vocabulary); when ``K > V``, the student's vector is padded with zeros.
    - ``reduction="mean"``: averaged over aligned positions (0 when there are none; the paper's code
      averages over each row's positions, then over rows); ``"sum"``; ``"none"``: ``[n, S]``.

    Computed in float32 at least, differentiable w.r.t. ``student_logits``. The paper's training
    loss is cross-entropy on the student's own tokens plus ``lambda`` times this distillation term.
    """
    if tail not in _ULD_TAILS:
        raise ConfigError(f"uld_loss: tail must be one of {_ULD_TAILS}, got {tail!r}")
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"uld_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not temperature > 0:
        raise ConfigError(f"uld_loss: temperature must be > 0, got {temperature}")
    aligned = _aligned_positions(student_logits, teacher_topk_values, alignment, student_lengths, teacher_lengths)

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    n, _, vocab = student_logits.shape
    k = teacher_topk_values.shape[-1]
    # The teacher's values at the aligned positions; unaligned ones get harmless values (they may
    # hold anything, and a NaN masked afterwards would still poison the gradients).
    source = torch.where(aligned, alignment.to(aligned.device).long(), 0)
    teacher = teacher_topk_values.gather(1, source.unsqueeze(-1).expand(-1, -1, k))
    aligned_k = aligned.unsqueeze(-1)
    teacher = torch.where(aligned_k, teacher.to(dtype), -math.log(k))
    teacher_p = teacher.exp().sort(dim=-1, descending=True).values
    logits = torch.where(aligned_k, student_logits.to(dtype), 0.0) / temperature
    student_p = torch.softmax(logits, dim=-1)
    top, top_indices = student_p.topk(min(k, vocab), dim=-1)  # sorted, descending
    if k > vocab:
        top = torch.nn.functional.pad(top, (0, k - vocab))
    distance = (top - teacher_p).abs().sum(dim=-1)
    if k < vocab:
        # The student's mass past its K largest, from its logits rather than as 1 - sum(top), which
        # cancels digits when the top K hold nearly all the mass.
        outside = logits.scatter(-1, top_indices, torch.finfo(dtype).min)
        student_rest = (torch.logsumexp(outside, dim=-1) - torch.logsumexp(logits, dim=-1)).exp()
    else:
        student_rest = torch.zeros_like(distance)
    if tail == "bucket":
        exact = torch.float64 if teacher.device.type != "mps" else dtype  # MPS has no float64
        teacher_rest = (1.0 - teacher.to(exact).exp().sum(dim=-1)).clamp(min=0.0).to(dtype)
        distance = distance + (student_rest - teacher_rest).abs()
    else:
        distance = distance + student_rest
    distance = torch.where(aligned, distance, 0.0)
    if reduction == "none":
        return distance
    total = distance.sum()
    if reduction == "sum":
        return total
    return total / aligned.sum().clamp(min=1)


def _aligned_positions(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    alignment: torch.Tensor,
    student_lengths: torch.Tensor | None,
    teacher_lengths: torch.Tensor | None,
) -> torch.Tensor:
    """Check the shapes; the boolean ``[n, S]`` mask of the student positions the loss compares."""
    if student_logits.dim() != 3:
        raise ConfigError(f"uld_loss: student_logits must be [n, S, V], got shape {tuple(student_logits.shape)}")
    n, length, _ = student_logits.shape
    if teacher_topk_values.dim() != 3 or teacher_topk_values.shape[0] != n or teacher_topk_values.shape[-1] < 1:
        raise ConfigError(
            f"uld_loss: teacher_topk_values must be [n = {n}, T, K], got shape {tuple(teacher_topk_values.shape)}"
        )
    if not teacher_topk_values.is_floating_point():
        raise ConfigError(f"uld_loss: teacher_topk_values must be floating point, got {teacher_topk_values.dtype}")
    if alignment.shape != (n, length) or alignment.is_floating_point():
        raise ConfigError(
            f"uld_loss: alignment must be an integer tensor of shape ({n}, {length}), "
            f"got {alignment.dtype} {tuple(alignment.shape)}"
        )
    device = student_logits.device
    teacher_length = teacher_topk_values.shape[1]
    alignment = alignment.to(device)
    aligned = (alignment >= 0) & (alignment < teacher_length)
    for name, lengths, limit in (
        ("student_lengths", student_lengths, length),
        ("teacher_lengths", teacher_lengths, teacher_length),
    ):
        if lengths is None:
            continue
        if lengths.shape != (n,) or lengths.is_floating_point():
            raise ConfigError(
                f"uld_loss: {name} must be an integer tensor of shape ({n},), "
                f"got {lengths.dtype} {tuple(lengths.shape)}"
            )
        if bool(((lengths < 0) | (lengths > limit)).any()):
            raise ConfigError(f"uld_loss: {name} must be in [0, {limit}], got {lengths.tolist()}")
    if student_lengths is not None:
        aligned &= torch.arange(length, device=device) < student_lengths.to(device).unsqueeze(-1)
    if teacher_lengths is not None:
        aligned &= alignment < teacher_lengths.to(device).unsqueeze(-1)
    return aligned
