"""``distill_reader.torch.topk_kl_loss`` against dense and brute-force references.

The reference is the documented rule written out position by position in numpy float64: the
teacher's top-k probabilities (floored at float32's smallest normal number), plus for
``tail="bucket"`` one rest bucket holding ``1 - sum(p_topk)`` against the student's mass outside
the same indices, or for ``tail="renormalize"`` both restricted to the K indices and renormalized.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from distill_reader import ConfigError  # noqa: E402
from distill_reader.torch import multi_teacher_loss, topk_kl_loss  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TINY = float(np.finfo(np.float32).tiny)
N, L, V, K = 3, 5, 11, 4
LENGTHS = [5, 2, 0]  # a full row, a padded one, an empty one


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What a teacher server publishes: the top-k of its log-softmax, and their indices."""
    logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return values, indices


def make_inputs(seed: int = 0, k: int = K, dtype=torch.float32):
    """Student logits, teacher logits (both [N, L, V]) and the lengths."""
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(N, L, V, generator=g)).to(dtype)
    teacher = (3 * torch.randn(N, L, V, generator=g)).to(dtype)
    return student, teacher, torch.tensor(LENGTHS)


def reference(student, values, indices, lengths, *, reverse=False, kind="logprobs", temperature=1.0, tail="bucket"):
    """The documented rule, one real position at a time, in numpy float64: per-token KL [n, L]."""
    student = student.double().numpy()
    values, indices = values.double().numpy(), indices.numpy()
    out = np.zeros(student.shape[:2])
    for i, length in enumerate(lengths.tolist()):
        for t in range(length):
            s = student[i, t] / temperature
            q = np.exp(s - s.max())
            q /= q.sum()
            q_topk = q[indices[i, t]]
            if kind == "logits":
                p = np.exp(values[i, t] / temperature - (values[i, t] / temperature).max())
                p /= p.sum()
            else:
                p = np.maximum(np.exp(values[i, t]), TINY)
            if tail == "renormalize":
                p, q_coarse = p / p.sum(), q_topk / q_topk.sum()
            elif len(p) == len(s):
                q_coarse = q_topk
            else:
                p = np.append(p, max(1.0 - p.sum(), TINY))
                q_coarse = np.append(q_topk, 1.0 - q_topk.sum())
            if reverse:
                p, q_coarse = q_coarse, p
            out[i, t] = np.sum(p * (np.log(p) - np.log(q_coarse)))
    return out


def dense_kl(student, teacher, lengths, *, reverse=False, temperature=1.0):
    """The dense KL per token with torch.nn.functional.kl_div, 0 at padding."""
    student_logp = torch.log_softmax(student.double() / temperature, dim=-1)
    teacher_logp = torch.log_softmax(teacher.double() / temperature, dim=-1)
    if reverse:
        student_logp, teacher_logp = teacher_logp, student_logp
    kl = torch.nn.functional.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
    real = torch.arange(kl.shape[1]) < lengths.unsqueeze(-1)
    return torch.where(real, kl, 0.0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_k_equal_to_v_is_the_dense_kl(reverse, temperature):
    """With the whole vocabulary as the top-k, the bucket rule is the dense KL, in every reduction."""
    student, teacher, lengths = make_inputs(1)
    values, indices = teacher_topk(teacher, V, temperature)  # sorted: not in vocabulary order
    dense = dense_kl(student, teacher, lengths, reverse=reverse, temperature=temperature)
    kwargs = dict(reverse=reverse, temperature=temperature)
    per_token = topk_kl_loss(student, values, indices, lengths, reduction="none", **kwargs)
    assert per_token.dtype == torch.float32
    np.testing.assert_allclose(per_token.double().numpy(), dense.numpy(), rtol=1e-6, atol=1e-6)
    real_tokens = sum(LENGTHS)
    mean = topk_kl_loss(student, values, indices, lengths, **kwargs)
    np.testing.assert_allclose(mean.item(), dense.sum().item() / real_tokens, rtol=1e-6, atol=1e-6)
    total = topk_kl_loss(student, values, indices, lengths, reduction="sum", **kwargs)
    np.testing.assert_allclose(total.item(), dense.sum().item(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k", [1, K, V - 1])
def test_k_below_v_follows_the_documented_rule(tail, reverse, k):
    student, teacher, lengths = make_inputs(2, k)
    values, indices = teacher_topk(teacher, k)
    kwargs = dict(reverse=reverse, temperature=2.0, tail=tail)
    expected = reference(student, values, indices, lengths, **kwargs)
    per_token = topk_kl_loss(student, values, indices.int(), lengths, reduction="none", **kwargs)
    np.testing.assert_allclose(per_token.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    mean = topk_kl_loss(student, values, indices, lengths, **kwargs)
    np.testing.assert_allclose(mean.item(), expected.sum() / sum(LENGTHS), rtol=1e-5, atol=1e-6)
    if k == 1 and tail == "renormalize":
        assert not per_token.any()  # one outcome left after conditioning: nothing to compare


def test_bucket_is_a_lower_bound_of_the_dense_kl_that_grows_with_k():
    """Coarse-graining never increases KL: the bucket loss rises towards the dense KL as K grows."""
    student, teacher, lengths = make_inputs(3)
    losses = [topk_kl_loss(student, *teacher_topk(teacher, k), lengths).item() for k in range(1, V + 1)]
    dense = dense_kl(student, teacher, lengths).sum().item() / sum(LENGTHS)
    assert all(a <= b + 1e-6 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(dense, rel=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_raw_teacher_logits_with_renormalize(reverse):
    """values="logits": the top-k raw logits, softened by the same temperature as the student, are
    the teacher's renormalized top-k distribution."""
    student, teacher, lengths = make_inputs(4)
    indices = teacher.topk(K, dim=-1).indices
    raw = teacher.gather(-1, indices)
    kwargs = dict(reverse=reverse, temperature=3.0, tail="renormalize")
    per_token = topk_kl_loss(student, raw, indices, lengths, values="logits", reduction="none", **kwargs)
    expected = reference(student, raw, indices, lengths, kind="logits", **kwargs)
    np.testing.assert_allclose(per_token.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # The same as log-probs at that temperature: renormalizing cancels the normalizer.
    logprobs, _ = teacher_topk(teacher, K, temperature=3.0)
    as_logprobs = topk_kl_loss(student, logprobs, indices, lengths, reduction="none", **kwargs)
    torch.testing.assert_close(per_token, as_logprobs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reverse", [False, True])
def test_padding_changes_nothing(tail, reverse):
    """Whatever padded positions hold (NaN, inf, repeated or out-of-range indices), the loss and
    its gradient are those of the real positions alone."""
    student, teacher, lengths = make_inputs(5)
    values, indices = teacher_topk(teacher, K)
    padded = torch.arange(L) >= lengths.unsqueeze(-1)

    def loss_and_grad(student, values, indices):
        student = student.clone().requires_grad_(True)
        loss = topk_kl_loss(student, values, indices, lengths, reverse=reverse, tail=tail)
        (grad,) = torch.autograd.grad(loss, student)
        return loss, grad

    loss, grad = loss_and_grad(student, values, indices)
    assert torch.isfinite(grad).all() and not grad[padded].any()
    junk_student = student.masked_fill(padded.unsqueeze(-1), float("nan"))
    junk_values = values.masked_fill(padded.unsqueeze(-1), float("inf"))
    junk_indices = indices.masked_fill(padded.unsqueeze(-1), V + 7)
    junk_loss, junk_grad = loss_and_grad(junk_student, junk_values, junk_indices)
    assert junk_loss.item() == loss.item()
    assert torch.equal(junk_grad, grad)
    pad = padded.unsqueeze(-1)
    zeros = topk_kl_loss(
        student, values.masked_fill(pad, 0.0), indices.masked_fill(pad, 0), lengths, reverse=reverse, tail=tail
    )
    assert zeros.item() == loss.item()  # what the reader pads with: index 0 repeated, log-prob 0


def test_lengths_none_counts_every_position_and_accepts_two_dims():
    student, teacher, _ = make_inputs(6)
    values, indices = teacher_topk(teacher, K)
    full = torch.full((N,), L)
    assert topk_kl_loss(student, values, indices).item() == topk_kl_loss(student, values, indices, full).item()
    flat = topk_kl_loss(student.reshape(-1, V), values.reshape(-1, K), indices.reshape(-1, K), reduction="none")
    torch.testing.assert_close(flat, topk_kl_loss(student, values, indices, full, reduction="none").reshape(-1))


def test_no_real_tokens_gives_zero():
    student, teacher, _ = make_inputs(7)
    values, indices = teacher_topk(teacher, K)
    assert topk_kl_loss(student, values, indices, torch.zeros(N, dtype=torch.int64)).item() == 0.0


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k", [2, 6])
def test_gradcheck(tail, reverse, k):
    g = torch.Generator().manual_seed(8)
    student = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    values, indices = teacher_topk(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), k)
    lengths = torch.tensor([3, 1])
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda s, reduction=reduction: topk_kl_loss(
                s, values, indices, lengths, reverse=reverse, tail=tail, temperature=1.7, reduction=reduction
            ),
            (student,),
        )


@pytest.mark.parametrize("reverse", [False, True])
def test_zero_probability_teacher_entries(reverse):
    """Teacher log-probs of -inf (a vocabulary entry ruled out) or very negative ones give a finite
    loss and gradient, equal to the rule with probabilities floored at float32's smallest normal."""
    student, teacher, lengths = make_inputs(9)
    teacher[..., :3] = float("-inf")  # ruled out everywhere: they land in the top-k when K > V - 3
    teacher[0, 0, 5] = -1e4
    for k in (K, V - 1, V):
        values, indices = teacher_topk(teacher, k)
        assert torch.isinf(values).any() or k == K
        s = student.clone().requires_grad_(True)
        per_token = topk_kl_loss(s, values, indices, lengths, reverse=reverse, reduction="none")
        (grad,) = torch.autograd.grad(per_token.sum(), s)
        assert torch.isfinite(per_token).all() and torch.isfinite(grad).all()
        expected = reference(student, values, indices, lengths, reverse=reverse)
        np.testing.assert_allclose(per_token.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_float16_inputs_are_computed_in_float32(reverse):
    student, teacher, lengths = make_inputs(10)
    values, indices = teacher_topk(teacher, K)
    student16, values16 = student.half(), values.half()
    loss16 = topk_kl_loss(student16, values16, indices, lengths, reverse=reverse, reduction="none")
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(
        loss16, topk_kl_loss(student16.float(), values16.float(), indices, lengths, reverse=reverse, reduction="none")
    )
    expected = reference(student16, values16, indices, lengths, reverse=reverse)
    np.testing.assert_allclose(loss16.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    s = student16.clone().requires_grad_(True)
    topk_kl_loss(s, values16, indices, lengths, reverse=reverse).backward()
    assert s.grad.dtype == torch.float16 and torch.isfinite(s.grad).all()


def test_a_student_trained_with_the_loss_matches_the_teacher():
    """Minimizing the forward bucket loss over a student's logits drives them to the teacher's
    distribution on the top-k entries and its rest mass."""
    student, teacher, lengths = make_inputs(11)
    values, indices = teacher_topk(teacher, K)
    logits = torch.zeros(N, L, V, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(500):
        optimizer.zero_grad()
        loss = topk_kl_loss(logits, values, indices, lengths)
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-4
    learned = torch.log_softmax(logits.detach(), dim=-1).gather(-1, indices)
    real = torch.arange(L) < lengths.unsqueeze(-1)
    torch.testing.assert_close(learned[real].exp(), values[real].exp(), atol=5e-3, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(values="probs"), "values must be one of"),
        (dict(tail="drop"), "tail must be one of"),
        (dict(reduction="max"), "reduction must be one of"),
        (dict(values="logits"), "pass tail='renormalize'"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(lengths=torch.tensor([6, 1, 0])), r"lengths must be in \[0, L = 5\]"),
        (dict(lengths=torch.tensor([1.0, 1.0, 1.0])), "lengths must be an integer tensor of shape"),
        (dict(lengths=torch.tensor([1, 1])), r"lengths must be an integer tensor of shape \(3,\)"),
        (dict(topk_indices=torch.full((N, L, K), V)), r"topk_indices must lie in \[0, V = 11\)"),
        (dict(topk_indices=torch.zeros(N, L, K, dtype=torch.int64)), "repeat an index"),
        (dict(topk_indices=torch.zeros(N, L, K, dtype=torch.int16)), "must be int32 or int64"),
        (dict(topk_values=torch.zeros(N, L, K + 1)), "must have the same shape"),
        (dict(topk_values=torch.zeros(N, L + 1, K), topk_indices=torch.zeros(N, L + 1, K).long()), "must match"),
        (dict(topk_values=torch.zeros(N, L, V + 1), topk_indices=torch.zeros(N, L, V + 1).long()), "K = 12"),
    ],
)
def test_bad_input_is_named(change, message):
    student, teacher, lengths = make_inputs(12)
    values, indices = teacher_topk(teacher, K)
    arguments = dict(student_logits=student, topk_values=values, topk_indices=indices, lengths=lengths)
    arguments.update(change)
    with pytest.raises(ConfigError, match=message):
        topk_kl_loss(**arguments)


# -- several teachers (teacher groups) --------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multi_teacher_loss_is_the_weighted_sum_of_each_teachers_kl(reduction):
    """A top-k teacher and a dense one (raw logits and log-probs), each weighted: the sum of each
    one's KL against the references above, times its weight."""
    student, teacher_a, lengths = make_inputs(7)
    _, teacher_b, _ = make_inputs(8)
    values, indices = teacher_topk(teacher_a, K)
    logprobs_b = torch.log_softmax(teacher_b, dim=-1)
    got = multi_teacher_loss(
        student, {"a": (values, indices), "b": logprobs_b}, {"a": 0.25, "b": 2.0}, lengths, reduction=reduction
    )
    per_token = (
        0.25 * reference(student, values, indices, lengths) + 2.0 * dense_kl(student, teacher_b, lengths).numpy()
    )
    want = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / sum(LENGTHS)}[reduction]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    # Raw logits of a dense teacher: its whole distribution, the same KL.
    raw = multi_teacher_loss(student, {"b": teacher_b}, {"b": 1.0}, lengths, values="logits", reduction="sum")
    np.testing.assert_allclose(raw.item(), dense_kl(student, teacher_b, lengths).sum().item(), rtol=1e-5)


def test_multi_teacher_loss_weights_default_to_the_mean_and_give_gradients():
    student, teacher_a, lengths = make_inputs(9)
    _, teacher_b, _ = make_inputs(10)
    student.requires_grad_(True)
    teachers = {"a": torch.log_softmax(teacher_a, -1), "b": torch.log_softmax(teacher_b, -1)}
    mean = multi_teacher_loss(student, teachers, lengths=lengths)
    halves = multi_teacher_loss(student, teachers, {"a": 0.5, "b": 0.5}, lengths)
    np.testing.assert_allclose(mean.item(), halves.item(), rtol=1e-6)
    mean.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("teachers", "weights", "message"),
    [
        ({}, None, "teachers is empty"),
        ({"a": "dense"}, {"b": 1.0}, "missing ['a'], unknown ['b']"),
        ({"a": "dense"}, {"a": -1.0}, "weights['a'] must be a number >= 0"),
        ({"a": "short"}, None, "teachers['a'] has shape (3, 5, 10)"),
    ],
)
def test_multi_teacher_loss_bad_input_is_named(teachers, weights, message):
    student, teacher, lengths = make_inputs(11)
    outputs = {"dense": teacher, "short": teacher[..., :-1]}
    with pytest.raises(ConfigError) as info:
        multi_teacher_loss(student, {name: outputs[kind] for name, kind in teachers.items()}, weights, lengths)
    assert message in str(info.value)
