"""Aligning two tokenizations of one text (``distill_reader.alignment``) and the ULD loss.

The alignment is tested on hand-made offsets (a character covered by several tokens on each side,
a multi-byte character split across tokens, whitespace that one side's offsets leave out, special
tokens) and on tokenizers trained here with ``tokenizers`` (byte-level BPE of 300 and 1,000
tokens with other merges, a WordPiece; a byte-fallback SentencePiece-style BPE built by hand),
with a property test: paired positions have seen the same bytes of the text and predict tokens
that start at the same byte, every position both sides can compare is paired, and the pairs are
strictly increasing. The loss (``uld_loss``) is tested
against a position-by-position float64 computation of Boizard et al.'s sorted-probability
distance.
"""

from __future__ import annotations

import inspect
import random
import string
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from distill_reader import ConfigError  # noqa: E402
from distill_reader.alignment import (  # noqa: E402
    _BYTE_ALPHABET,
    align,
    align_text,
    context_ends,
    load_tokenizer,
    tokenize,
    utf8_offsets,
)
from distill_reader.torch import uld_loss  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# --- Tokenizers trained here ---------------------------------------------------------------------

WORDS = ["café", "naïve", "€5", "größe", "日本語", "😀", "über", "déjà", "coöperate", "Ω", "x²", "fiancé"]


def corpus() -> list[str]:
    """Local text: two stdlib modules' sources and generated sentences with non-ASCII words."""
    rng = random.Random(0)
    lines = inspect.getsource(textwrap).splitlines() + inspect.getsource(string).splitlines()
    for _ in range(400):
        words = [rng.choice(WORDS) if rng.random() < 0.3 else rng.choice(lines[:300]).strip()[:12] for _ in range(8)]
        lines.append(" ".join(words))
    return lines


def byte_level_bpe(vocab_size: int, lines: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def wordpiece(lines: list[str]) -> Tokenizer:
    """Whitespace dropped from the offsets, '##' pieces, an NFKC normalizer ('ﬁ' -> 'fi')."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    lines = corpus()
    return {
        "small": byte_level_bpe(300, lines[::2]),  # other vocabularies, other merges: other halves
        "large": byte_level_bpe(1000, lines[1::2]),
        "wordpiece": wordpiece(lines),
    }


def token_bytes(tokenizer: Tokenizer, ids: np.ndarray) -> list[bytes]:
    """A byte-level token's bytes, from GPT-2's alphabet."""
    return [bytes(_BYTE_ALPHABET[c] for c in tokenizer.id_to_token(i)) for i in ids.tolist()]


# --- Hand-made offsets ---------------------------------------------------------------------------


def test_a_character_covered_by_several_tokens_on_each_side() -> None:
    # "a€b": '€' is three UTF-8 bytes. Character offsets as byte-level BPE reports them: every token
    # holding a byte of '€' gets the character (1, 2).
    student = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]  # a | E2 | 82 | AC | b
    teacher = [(0, 2), (1, 2), (2, 3)]  # a E2 | 82 AC | b
    # Student: position 0 has seen "a"; 1 and 2 end inside '€'; 3 has seen "a€"; 4 all of it.
    assert context_ends(student).tolist() == [1, -1, -1, 2, 3]
    # Teacher: position 0 ends inside '€' ("a" and a byte of it); 1 has seen "a€"; 2 all of it.
    assert context_ends(teacher).tolist() == [-1, 2, 3]
    assert align(student, teacher).tolist() == [-1, -1, -1, 1, 2]


def test_a_split_character_aligns_in_bytes_where_the_splits_agree() -> None:
    text = "a€b"  # bytes: a=0, € = 1..4, b = 4
    student = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]  # a | E2 | 82 | AC | b
    teacher = [(0, 2), (1, 2), (2, 3)]  # a E2 | 82 AC | b
    student_bytes = utf8_offsets(text, student, [1, 1, 1, 1, 1])
    teacher_bytes = utf8_offsets(text, teacher, [2, 2, 1])
    assert student_bytes.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    assert teacher_bytes.tolist() == [[0, 2], [2, 4], [4, 5]]
    # Both contexts end after byte 2 (a, E2) at student 1 / teacher 0: comparable now.
    assert align(student_bytes, teacher_bytes).tolist() == [-1, 0, -1, 1, 2]
    # Lengths unknown, or not adding up to the character's bytes (a normalizer's 'ﬁ' -> 'f' 'i'):
    # the tokens keep the whole character's bytes, and the positions inside it stay out.
    unknown = utf8_offsets(text, student, [1, -1, -1, -1, 1])
    assert unknown.tolist() == [[0, 1], [1, 4], [1, 4], [1, 4], [4, 5]]
    assert context_ends(unknown).tolist() == [1, -1, -1, 4, 5]
    assert utf8_offsets(text, student, [1, 1, 1, 2, 1])[1:4].tolist() == [[1, 4]] * 3


def test_an_emoji_split_on_both_sides() -> None:
    text = "x😀y"  # 😀 is four bytes: 1..5
    student = [(0, 2), (1, 2), (1, 2), (2, 3)]  # x F0 | 9F | 98 80 | y
    teacher = [(0, 1), (1, 2), (1, 2), (2, 3)]  # x | F0 9F 98 | 80 | y
    assert align(student, teacher).tolist() == [-1, -1, 2, 3]  # in characters: only after the emoji
    student_bytes = utf8_offsets(text, student, [2, 1, 2, 1])
    teacher_bytes = utf8_offsets(text, teacher, [1, 3, 1, 1])
    assert student_bytes[:, 1].tolist() == [2, 3, 5, 6]
    assert teacher_bytes[:, 1].tolist() == [1, 4, 5, 6]
    assert align(student_bytes, teacher_bytes).tolist() == [-1, -1, 2, 3]  # no common inner byte


def test_whitespace_that_offsets_leave_out_counts_with_the_next_token() -> None:
    # "Hello world": the student's " world" holds its space (GPT-2 style); a WordPiece teacher drops
    # it; a teacher with trim_offsets reports "Ġworld" from 6; another makes the space a token.
    student = [(0, 5), (5, 11)]
    assert context_ends(student).tolist() == [5, 11]
    assert align(student, [(0, 5), (6, 11)]).tolist() == [0, 1]
    assert align(student, [(0, 3), (3, 5), (6, 11)]).tolist() == [1, 2]
    # A whitespace token whose offsets were trimmed to nothing, (6, 6) for "Hello  world".
    assert context_ends([(0, 5), (6, 6), (7, 12)]).tolist() == [5, -1, 12]
    # A separate space token: the teacher's position after "Hello " has no student counterpart.
    teacher = [(0, 5), (5, 6), (6, 11)]
    assert context_ends(teacher).tolist() == [5, 6, 11]
    assert align(student, teacher).tolist() == [0, 2]
    assert align(teacher, student).tolist() == [0, -1, 1]


def test_special_tokens_carry_no_text() -> None:
    # A teacher with BOS and EOS (offsets (0, 0), as tokenizers' post-processors give them).
    teacher = [(0, 0), (0, 5), (5, 11), (0, 0)]
    assert context_ends(teacher).tolist() == [0, 5, 11, -1]
    student = [(0, 5), (5, 11)]
    assert align(student, teacher).tolist() == [1, 2]
    student_with_bos = [(0, 0), (0, 2), (2, 5), (5, 11)]
    assert align(student_with_bos, teacher).tolist() == [0, -1, 1, 2]


def test_identical_offsets_give_the_identity() -> None:
    offsets = [(0, 3), (3, 4), (4, 9), (9, 10)]
    assert align(offsets, offsets).tolist() == [0, 1, 2, 3]
    assert align([], offsets).tolist() == []
    assert align(offsets, []).tolist() == [-1, -1, -1, -1]
    assert align(np.zeros((0, 2)), np.zeros((0, 2))).tolist() == []


@pytest.mark.parametrize(
    ("offsets", "match"),
    [([(0, 1, 2)], r"\[N, 2\]"), ([(2, 1)], "start <= end"), ([(3, 4), (0, 2)], "text order"), ([(-1, 0)], "start")],
)
def test_malformed_offsets_are_refused(offsets, match) -> None:
    with pytest.raises(ValueError, match=match):
        context_ends(offsets)


def test_utf8_offsets_refuse_offsets_past_the_text() -> None:
    with pytest.raises(ValueError, match="past the text"):
        utf8_offsets("ab", [(0, 3)])


# --- Trained tokenizers --------------------------------------------------------------------------

TEXTS = [
    "Hello world, the café's €5 naïve größe: 日本語 😀!",
    "  leading spaces,\ttabs\nand newlines  ",
    "ﬃ ㎏ Ⅻ fiancé x² Ω über déjà-vu 😀😀",
    "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)",
]


@pytest.mark.parametrize("name", ["small", "large"])
@pytest.mark.parametrize("text", TEXTS)
def test_byte_offsets_of_byte_level_tokens_tile_the_text(trained, name, text) -> None:
    tokenizer = trained[name]
    ids, offsets = tokenize(tokenizer, text)
    data = text.encode()
    assert offsets[0, 0] == 0 and offsets[-1, 1] == len(data)
    assert (offsets[1:, 0] == offsets[:-1, 1]).all()
    assert [data[a:b] for a, b in offsets.tolist()] == token_bytes(tokenizer, ids)
    # Character offsets: the tokens' own, and the same ids.
    char_ids, char_offsets = tokenize(tokenizer, text, unit="char")
    assert char_ids.tolist() == ids.tolist()
    assert char_offsets.tolist() == [list(o) for o in tokenizer.encode(text).offsets]


def test_the_tokenizers_differ_where_it_matters(trained) -> None:
    """The test cases exist: split multi-byte characters, and different segmentations."""
    text = TEXTS[0]
    small = tokenize(trained["small"], text, unit="char")[1]
    large = tokenize(trained["large"], text, unit="char")[1]
    assert (context_ends(small) == -1).sum() > 0  # the small vocabulary splits characters
    assert len(small) > len(large)
    assert not np.array_equal(align(small, large), np.arange(len(small)))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("name", ["small", "large", "wordpiece"])
def test_identical_tokenizers_give_the_identity_alignment(trained, name, text) -> None:
    tokenizer = trained[name]
    student_ids, teacher_ids, alignment = align_text(text, tokenizer, tokenizer)
    assert student_ids.tolist() == teacher_ids.tolist()
    if name == "wordpiece" and "ﬃ" in text:  # NFKC: 'ﬃ' -> 'f' '##f' '##i', three tokens in one character
        expected = np.where(context_ends(tokenize(tokenizer, text)[1]) >= 0, np.arange(len(student_ids)), -1)
        assert (expected == -1).sum() >= 1
    else:
        expected = np.arange(len(student_ids))
    assert alignment.tolist() == expected.tolist()
    # In characters, the positions inside split characters stay out, the others are the identity.
    _, offsets = tokenize(tokenizer, text, unit="char")
    ends = context_ends(offsets)
    assert align(offsets, offsets).tolist() == np.where(ends >= 0, np.arange(len(ends)), -1).tolist()


def check_alignment(text: str, student: Tokenizer, teacher: Tokenizer, unit: str) -> np.ndarray:
    """The properties of an alignment between two byte-level tokenizations of ``text``."""
    student_ids, student_offsets = tokenize(student, text, unit=unit)
    teacher_ids, teacher_offsets = tokenize(teacher, text, unit=unit)
    alignment = align(student_offsets, teacher_offsets)
    assert alignment.shape == (len(student_ids),) and alignment.dtype == np.int64
    paired = np.flatnonzero(alignment >= 0)
    # Strictly increasing, within the teacher's positions.
    assert (np.diff(alignment[paired]) > 0).all()
    assert ((alignment >= -1) & (alignment < len(teacher_ids))).all()
    student_bytes, teacher_bytes = token_bytes(student, student_ids), token_bytes(teacher, teacher_ids)
    for s in paired.tolist():
        t = int(alignment[s])
        # Both have seen the same bytes of the text ...
        assert b"".join(student_bytes[: s + 1]) == b"".join(teacher_bytes[: t + 1])
        # ... and predict tokens that start at the same place (or both predict past the text).
        assert (s + 1 < len(student_ids)) == (t + 1 < len(teacher_ids))
        if s + 1 < len(student_ids):
            assert student_offsets[s + 1, 0] == teacher_offsets[t + 1, 0]
    # Every position whose context ends where some teacher position's does is paired.
    student_ends, teacher_ends = context_ends(student_offsets), context_ends(teacher_offsets)
    common = set(student_ends[student_ends >= 0].tolist()) & set(teacher_ends[teacher_ends >= 0].tolist())
    assert len(paired) == len(common)
    return alignment


@pytest.mark.parametrize("unit", ["byte", "char"])
@pytest.mark.parametrize(("student", "teacher"), [("small", "large"), ("large", "small")])
@pytest.mark.parametrize("text", TEXTS)
def test_alignment_between_trained_tokenizers(trained, student, teacher, unit, text) -> None:
    alignment = check_alignment(text, trained[student], trained[teacher], unit)
    # Word boundaries are common to both (same pre-tokenizer), so many positions pair up.
    assert (alignment >= 0).mean() > 0.3


TEXT_CHARS = st.sampled_from(list(" \n\teaéèoö€😀日本xyz,.!") + [string.ascii_letters[i] for i in range(10)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(TEXT_CHARS | st.text(max_size=3), max_size=40).map("".join))
def test_alignment_property(trained, text) -> None:
    for unit in ("byte", "char"):
        check_alignment(text, trained["small"], trained["large"], unit)
        check_alignment(text, trained["large"], trained["small"], unit)
    # The identity, in bytes, for identical tokenizers.
    assert align_text(text, trained["small"], trained["small"])[2].tolist() == list(
        range(len(tokenize(trained["small"], text)[0]))
    )


def test_wordpiece_against_byte_level(trained) -> None:
    """WordPiece drops whitespace from its tokens (and its offsets): contexts still compare."""
    text = "Hello world, the café's €5"
    student_ids, student_offsets = tokenize(trained["large"], text)
    teacher_ids, teacher_offsets = tokenize(trained["wordpiece"], text)
    alignment = align(student_offsets, teacher_offsets)
    data = text.encode()
    for s in np.flatnonzero(alignment >= 0).tolist():
        t = alignment[s]
        # Same text seen, up to whitespace the WordPiece tokens leave out.
        assert data[: student_offsets[s, 1]].rstrip() == data[: teacher_offsets[t, 1]].rstrip()
    # Before " world": the byte-level student's position 'Hello' ↔ the WordPiece teacher's 'Hello'.
    hello = [i for i, (a, b) in enumerate(student_offsets.tolist()) if data[a:b] == b"Hello"]
    if hello:
        assert alignment[hello[0]] >= 0
    assert (alignment >= 0).mean() > 0.3


def byte_fallback_sentencepiece() -> Tokenizer:
    """A SentencePiece-style BPE ('▁' for spaces) whose unknown characters fall back to <0xHH> tokens."""
    pieces = ["<unk>", "▁", "a", "b", "▁a"] + [f"<0x{b:02X}>" for b in range(256)]
    model = models.BPE(
        vocab={p: i for i, p in enumerate(pieces)}, merges=[("▁", "a")], byte_fallback=True, unk_token="<unk>"
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def test_byte_fallback_tokens_align_inside_a_character(trained) -> None:
    text = "a b€b"
    ids, char_offsets = tokenize(byte_fallback_sentencepiece(), text, unit="char")
    assert char_offsets.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [3, 4], [3, 4], [4, 5]]  # ▁a ▁ b E2 82 AC b
    _, offsets = tokenize(byte_fallback_sentencepiece(), text)
    assert offsets.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7]]
    # Against a byte-level tokenizer that also splits '€' into its three bytes: all pair up.
    small_ids, small_offsets = tokenize(trained["small"], text)
    assert [small_offsets[i].tolist() for i in range(len(small_ids)) if small_offsets[i, 0] >= 3][:3] == [
        [3, 4],
        [4, 5],
        [5, 6],
    ]
    alignment = align(offsets, small_offsets)
    ends = context_ends(offsets)
    assert all(context_ends(small_offsets)[alignment[s]] == ends[s] for s in np.flatnonzero(alignment >= 0))
    assert alignment[3:6].tolist() == [i for i in range(len(small_ids)) if 4 <= small_offsets[i, 1] <= 6]


def test_special_tokens_from_a_post_processor(trained) -> None:
    teacher = Tokenizer.from_str(trained["large"].to_str())
    teacher.add_special_tokens(["<s>", "</s>"])
    teacher.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", teacher.token_to_id("<s>")), ("</s>", teacher.token_to_id("</s>"))],
    )
    text = TEXTS[0]
    _, plain = tokenize(trained["large"], text)
    ids, offsets = tokenize(teacher, text, add_special_tokens=True)
    assert len(ids) == len(plain) + 2 and offsets[0].tolist() == [0, 0]
    # The student without them: shifted by one (the BOS), the teacher's EOS position unused.
    assert align(plain, offsets).tolist() == list(range(1, len(plain) + 1))
    student_ids, teacher_ids, alignment = align_text(text, trained["large"], teacher, teacher_special_tokens=True)
    assert teacher_ids.tolist() == ids.tolist() and alignment.tolist() == list(range(1, len(plain) + 1))
    # Both with them: BOS pairs with BOS (nothing seen yet), the EOS positions stay out.
    _, _, both = align_text(text, teacher, teacher, student_special_tokens=True, teacher_special_tokens=True)
    assert both.tolist() == list(range(len(plain) + 1)) + [-1]


@pytest.mark.parametrize("text", TEXTS)
def test_trimmed_offsets_pair_like_untrimmed_ones(trained, text) -> None:
    """``trim_offsets`` moves "Ġworld"'s start past its space and makes whitespace-only tokens
    zero-width: the same tokens pair one to one, except at those whitespace tokens (their positions
    have seen a space that the trimmed offsets do not show)."""
    trimmed = Tokenizer.from_str(trained["large"].to_str())
    trimmed.post_processor = processors.ByteLevel(trim_offsets=True)
    ids, offsets = tokenize(trained["large"], text)
    trimmed_ids, trimmed_offsets = tokenize(trimmed, text)
    assert trimmed_ids.tolist() == ids.tolist()
    blank = trimmed_offsets[:, 0] == trimmed_offsets[:, 1]
    assert (trimmed_offsets[:, 0] > offsets[:, 0]).any()  # "Ġword" starts after its space
    assert blank[0] == text.startswith(" ")
    assert align(offsets, trimmed_offsets).tolist() == np.where(blank, -1, np.arange(len(ids))).tolist()


def test_load_tokenizer_and_transformers_fast_tokenizers(trained, tmp_path) -> None:
    trained["large"].save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path / "tokenizer.json").to_str() == loaded.to_str()
    text = TEXTS[0]
    ids, offsets = tokenize(loaded, text)
    assert ids.tolist() == tokenize(trained["large"], text)[0].tolist()
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=loaded)
    fast_ids, fast_offsets = tokenize(fast, text)
    assert fast_ids.tolist() == ids.tolist() and fast_offsets.tolist() == offsets.tolist()


def test_tokenize_refuses_an_unknown_unit(trained) -> None:
    with pytest.raises(ValueError, match="unit"):
        tokenize(trained["small"], "x", unit="word")


# --- The ULD loss --------------------------------------------------------------------------------


def reference_uld(student_logits, teacher_logprobs, alignment, student_lengths, teacher_lengths, temperature, tail):
    """Per position in float64: sorted probability vectors and their L1 distance (Boizard et al.)."""
    student_logits = student_logits.double().numpy()
    teacher_logprobs = teacher_logprobs.double().numpy()
    n, length, vocab = student_logits.shape
    k = teacher_logprobs.shape[-1]
    out = np.zeros((n, length))
    for i in range(n):
        for s in range(int(student_lengths[i])):
            t = int(alignment[i, s])
            if t < 0 or t >= int(teacher_lengths[i]):
                continue
            z = student_logits[i, s] / temperature
            q = np.sort(np.exp(z - z.max()) / np.exp(z - z.max()).sum())[::-1]
            p = np.sort(np.exp(teacher_logprobs[i, t]))[::-1]
            size = max(vocab, k)
            q, p_padded = np.pad(q, (0, size - vocab)), np.pad(p, (0, size - k))
            head = np.abs(q[:k] - p_padded[:k]).sum()
            rest = q[k:].sum()
            out[i, s] = head + (abs(rest - max(1 - p.sum(), 0.0)) if tail == "bucket" else rest)
    return out


def random_case(seed: int, n: int = 3, length: int = 6, teacher_length: int = 7, vocab: int = 9, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, length, vocab, generator=g)
    teacher_full = torch.log_softmax(3 * torch.randn(n, teacher_length, 13, generator=g), dim=-1)
    values = teacher_full.topk(min(k, 13), dim=-1).values
    alignment = torch.randint(-1, teacher_length + 1, (n, length), generator=g)
    alignment[0, :4] = torch.tensor([0, 2, 3, teacher_length - 1])  # surely aligned somewhere
    student_lengths = torch.tensor([length, length // 2, 0][:n])
    teacher_lengths = torch.tensor([teacher_length, teacher_length - 2, teacher_length][:n])
    return student, values, alignment, student_lengths, teacher_lengths


@pytest.mark.parametrize("tail", ["bucket", "zeros"])
@pytest.mark.parametrize(("vocab", "k"), [(9, 4), (9, 9), (5, 8), (9, 13)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_a_direct_computation(tail, vocab, k, temperature) -> None:
    student, values, alignment, student_lengths, teacher_lengths = random_case(vocab * k, vocab=vocab, k=k)
    expected = reference_uld(student, values, alignment, student_lengths, teacher_lengths, temperature, tail)
    got = uld_loss(
        student,
        values,
        alignment,
        student_lengths,
        teacher_lengths,
        temperature=temperature,
        tail=tail,
        reduction="none",
    )
    np.testing.assert_allclose(got.double().numpy(), expected, atol=2e-6)
    aligned = (expected != 0).sum()
    assert aligned > 3
    mean = uld_loss(student, values, alignment, student_lengths, teacher_lengths, temperature=temperature, tail=tail)
    total = uld_loss(
        student,
        values,
        alignment,
        student_lengths,
        teacher_lengths,
        temperature=temperature,
        tail=tail,
        reduction="sum",
    )
    np.testing.assert_allclose(float(total), expected.sum(), atol=1e-5)
    mask = np.zeros(expected.shape, dtype=bool)
    for i in range(len(student_lengths)):
        for s in range(int(student_lengths[i])):
            mask[i, s] = 0 <= int(alignment[i, s]) < int(teacher_lengths[i])
    np.testing.assert_allclose(float(mean), expected.sum() / mask.sum(), atol=1e-6)


def test_uld_by_hand() -> None:
    # Student over 3 tokens: softmax(log [0.5, 0.3, 0.2]); teacher top-2 of its own vocabulary:
    # [0.6, 0.1] (0.3 elsewhere). Sorted: q = [0.5, 0.3 | 0.2], p = [0.6, 0.1 | r = 0.3].
    student = torch.log(torch.tensor([[[0.2, 0.5, 0.3]]]))
    teacher = torch.log(torch.tensor([[[0.1, 0.6]]]))  # order does not matter: sorted
    alignment = torch.tensor([[0]])
    # |0.5 - 0.6| + |0.3 - 0.1| = 0.3; bucket: + |0.2 - 0.3| = 0.4; zeros: + 0.2 = 0.5.
    assert float(uld_loss(student, teacher, alignment)) == pytest.approx(0.4, abs=1e-6)
    assert float(uld_loss(student, teacher, alignment, tail="zeros")) == pytest.approx(0.5, abs=1e-6)
    # Full teacher vocabulary [0.6, 0.1, 0.2, 0.1]: the paper's loss, 0.1 + 0.2 + 0 + 0.1 = 0.4.
    full = torch.log(torch.tensor([[[0.6, 0.1, 0.2, 0.1]]]))
    for tail in ("bucket", "zeros"):
        assert float(uld_loss(student, full, alignment, tail=tail)) == pytest.approx(0.4, abs=1e-6)


def test_uld_is_zero_when_the_student_is_the_teacher_up_to_relabelling() -> None:
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 5, 11, generator=g)
    identity = torch.arange(5).expand(2, 5)
    full = torch.log_softmax(logits, dim=-1)
    for tail in ("bucket", "zeros"):
        assert float(uld_loss(logits, full, identity, tail=tail)) == pytest.approx(0.0, abs=1e-6)
    # A student whose vocabulary is the teacher's in another order: the same distance, 0.
    permuted = logits[..., torch.randperm(11, generator=g)]
    assert float(uld_loss(permuted, full, identity)) == pytest.approx(0.0, abs=1e-6)
    # The teacher's top-4 only: still 0 with the bucket, and the zeros tail charges the missing mass.
    top = full.topk(4, dim=-1).values
    assert float(uld_loss(logits, top, identity)) == pytest.approx(0.0, abs=1e-6)
    missing = 1 - top.exp().sum(-1)
    assert float(uld_loss(logits, top, identity, tail="zeros")) == pytest.approx(float(missing.mean()), abs=1e-5)


def test_uld_top_k_is_within_the_missing_mass_of_the_full_distance() -> None:
    g = torch.Generator().manual_seed(2)
    student = 2 * torch.randn(4, 8, 17, generator=g)
    full = torch.log_softmax(2 * torch.randn(4, 8, 23, generator=g), dim=-1)
    identity = torch.arange(8).expand(4, 8)
    exact = uld_loss(student, full, identity, reduction="none")
    for k in (1, 3, 8):
        top = full.topk(k, dim=-1).values
        missing = 1 - top.exp().sum(-1)
        bucket = uld_loss(student, top, identity, reduction="none")
        zeros = uld_loss(student, top, identity, tail="zeros", reduction="none")
        assert (bucket <= exact + 1e-6).all() and (exact <= bucket + 2 * missing + 1e-6).all()
        assert ((zeros - exact).abs() <= missing + 1e-6).all()


def test_uld_gradients_flow_and_masked_positions_get_none() -> None:
    student, values, alignment, student_lengths, teacher_lengths = random_case(3)
    values[2] = float("nan")  # a row with no real positions may hold anything
    values[1, teacher_lengths[1] :] = float("nan")  # so may the teacher's padding
    student[1, student_lengths[1] :] = float("nan")  # and the student's
    student = student.clone().requires_grad_(True)
    loss = uld_loss(student, values, alignment, student_lengths, teacher_lengths)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    aligned = torch.zeros(alignment.shape, dtype=torch.bool)
    for i in range(3):
        for s in range(int(student_lengths[i])):
            aligned[i, s] = 0 <= int(alignment[i, s]) < int(teacher_lengths[i])
    assert (student.grad[~aligned] == 0).all()
    assert (student.grad[aligned].abs().sum(-1) > 0).all()
    # Against finite differences, in float64 (the sort is locally constant: random logits tie nowhere).
    student64 = student.detach().nan_to_num().double().requires_grad_(True)
    torch.autograd.gradcheck(
        lambda x: uld_loss(x, values.double(), alignment, student_lengths, teacher_lengths),
        (student64,),
    )


def test_uld_masking() -> None:
    student, values, alignment, student_lengths, teacher_lengths = random_case(4)
    loss = uld_loss(student, values, alignment, student_lengths, teacher_lengths, reduction="none")
    # Positions past the student's length, aligned nowhere or past the teacher's length: 0.
    assert (loss[1, student_lengths[1] :] == 0).all() and (loss[2] == 0).all()
    assert (loss[alignment < 0] == 0).all()
    assert (loss[0][alignment[0] >= teacher_lengths[0]] == 0).all()
    # Without lengths, everything aligned within the teacher's array counts; an empty batch is 0.
    unmasked = uld_loss(student, values, alignment, reduction="none")
    assert ((unmasked > 0) == ((alignment >= 0) & (alignment < values.shape[1]))).all()
    nothing = torch.full_like(alignment, -1)
    assert float(uld_loss(student, values, nothing)) == 0.0
    # Changing a masked position's logits changes nothing.
    changed = student.clone()
    changed[1, student_lengths[1] :] = 100.0
    assert torch.equal(uld_loss(changed, values, alignment, student_lengths, teacher_lengths, reduction="none"), loss)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"student_logits": torch.zeros(2, 3)}, r"\[n, S, V\]"),
        ({"teacher_topk_values": torch.zeros(2, 3)}, r"\[n = 2, T, K\]"),
        ({"teacher_topk_values": torch.zeros(2, 4, 3, dtype=torch.int64)}, "floating point"),
        ({"alignment": torch.zeros(2, 4, dtype=torch.int64)}, "alignment"),
        ({"alignment": torch.zeros(2, 3)}, "alignment"),
        ({"student_lengths": torch.tensor([1, 4])}, "student_lengths"),
        ({"teacher_lengths": torch.tensor([1.0, 2.0])}, "teacher_lengths"),
        ({"tail": "renormalize"}, "tail"),
        ({"reduction": "max"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_uld_refuses_bad_arguments(change, match) -> None:
    arguments = {
        "student_logits": torch.zeros(2, 3, 5),
        "teacher_topk_values": torch.zeros(2, 4, 3),
        "alignment": torch.zeros(2, 3, dtype=torch.int64),
        "student_lengths": torch.tensor([1, 3]),
        "teacher_lengths": torch.tensor([1, 4]),
    }
    arguments.update(change)
    with pytest.raises(ConfigError, match=match):
        uld_loss(**arguments)


def test_uld_on_an_aligned_batch_of_texts(trained) -> None:
    """Both tokenizations and the alignment as a reader batch would carry them (padded with 0)."""
    rows = [align_text(text, trained["small"], trained["large"]) for text in TEXTS[:3]]
    n = len(rows)
    length = max(len(r[0]) for r in rows)
    teacher_length = max(len(r[1]) for r in rows)
    alignment = torch.zeros(n, length, dtype=torch.int64)
    student_lengths = torch.tensor([len(r[0]) for r in rows])
    teacher_lengths = torch.tensor([len(r[1]) for r in rows])
    for i, (_, _, a) in enumerate(rows):
        alignment[i, : len(a)] = torch.from_numpy(a)
    g = torch.Generator().manual_seed(5)
    teacher = torch.log_softmax(torch.randn(n, teacher_length, 1000, generator=g), dim=-1).topk(16, dim=-1).values
    student = torch.randn(n, length, 300, generator=g, requires_grad=True)
    loss = uld_loss(student, teacher, alignment, student_lengths, teacher_lengths)
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    # Only the aligned positions of each row got a gradient.
    touched = student.grad.abs().sum(-1) > 0
    for i, (_, _, a) in enumerate(rows):
        assert touched[i, : len(a)].tolist() == (a >= 0).tolist()
        assert not touched[i, len(a) :].any()


def test_uld_trains_a_student_towards_the_teachers_shape() -> None:
    """Gradient descent on the loss alone brings a student of another vocabulary size to the
    teacher's sorted distribution (whatever tokens carry it)."""
    g = torch.Generator().manual_seed(6)
    teacher = torch.log_softmax(2 * torch.randn(2, 5, 40, generator=g), dim=-1).topk(8, dim=-1).values
    student = torch.zeros(2, 4, 25, requires_grad=True)
    alignment = torch.tensor([[0, 2, 3, -1], [1, 2, 3, 4]])
    optimizer = torch.optim.Adam([student], lr=0.1)
    first = float(uld_loss(student, teacher, alignment).detach())
    for _ in range(300):
        optimizer.zero_grad()
        loss = uld_loss(student, teacher, alignment)
        loss.backward()
        optimizer.step()
    assert first > 0.5 and float(loss.detach()) < 0.05
    assert (student.grad[0, 3] == 0).all()  # the unaligned position never moved
    assert (student[0, 3] == 0).all()
