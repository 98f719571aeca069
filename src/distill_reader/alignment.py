"""Aligning a student's and a teacher's tokens of the same text (students with another tokenizer).

A causal language model's position ``t`` holds its distribution of the token after
``tokens[:t+1]``. When the student and the teacher tokenize the same text differently, the
teacher's distribution at position ``t`` can supervise the student's at position ``s`` only if
both have seen the same text: **the student's and the teacher's contexts end at the same place of
the text**, which is where the token each of them predicts starts. :func:`align` pairs exactly
those positions; a student position whose context ends where no teacher position's does (inside a
teacher token, or inside a character) gets ``-1`` and is masked by the loss
(:func:`distill_reader.torch.uld_loss`).

Offsets are ``[N, 2]`` ``(start, end)`` per token, what ``tokenizers``' ``Encoding.offsets`` (and
transformers' ``return_offsets_mapping``) give, in characters of the text; :func:`tokenize` turns
them into byte offsets (the default) so that byte-level tokens splitting a multi-byte character
align too. Both sides must use the same unit. The rules, for offsets from any tokenizer:

- **The context of position t ends** at the largest ``end`` of tokens ``0..t``: whitespace that a
  tokenizer's offsets leave out (dropped by a WordPiece pre-tokenizer, trimmed by
  ``trim_offsets``) counts with the token after it, as in GPT-2 and SentencePiece vocabularies
  (``"Ġworld"``, ``"▁world"``).
- **Zero-width tokens** (``start == end``: special tokens such as BOS and EOS, which carry no text,
  and whitespace tokens whose offsets were trimmed) do not move the context's end. Several
  positions whose contexts end at the same place keep only the first (a BOS-less student's last
  position aligns with the teacher's last text position, not its EOS).
- **A context that ends inside a character** (the next token starts before the context's end:
  byte-level BPE gives every token holding a byte of a split multi-byte character, like ``'€'``'s
  three bytes, the same character offsets; a normalizer that expands ``'ﬁ'`` into ``'f' 'i'``
  does the same) is not comparable and gets no counterpart. In byte offsets from :func:`tokenize`,
  the byte boundaries inside such a character are recovered for byte-level and byte-fallback
  tokenizers (each token's bytes are known), so those positions align like any other.
- Positions are matched one to one, so the alignment is strictly increasing where it is not -1.

Which side tokenizes the teacher's tokens: the reader (with the teacher's tokenizer), not the
teacher; see docs/llm-tokenizers.md.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

__all__ = ["align", "align_text", "context_ends", "load_tokenizer", "tokenize", "utf8_offsets"]

_UNITS = ("byte", "char")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet (as ``tokenizers``' ``ByteLevel`` uses it): character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_ALPHABET = _bytes_to_unicode()


def _check_offsets(offsets: Any, name: str = "offsets") -> np.ndarray:
    array = np.asarray(offsets, dtype=np.int64)
    if array.size == 0:
        return array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must be [N, 2] (start, end) per token, got shape {array.shape}")
    start, end = array[:, 0], array[:, 1]
    if (start < 0).any() or (end < start).any():
        raise ValueError(f"{name}: every token needs 0 <= start <= end")
    text = end > start
    if (np.diff(start[text]) < 0).any():
        raise ValueError(f"{name}: tokens carrying text must start in text order")
    return array


def context_ends(offsets: Any) -> np.ndarray:
    """For each position t, where the text seen by ``tokens[:t+1]`` ends, or -1.

    That is where the token position t predicts starts (gaps in the offsets closed). -1 where the
    context ends inside a character (the next token starts before it) and where an earlier position
    already ends at the same place (zero-width tokens). Non-negative values are strictly increasing.
    ``offsets``: ``[N, 2]`` ``(start, end)`` per token; returns int64 ``[N]``.
    """
    offsets = _check_offsets(offsets)
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    start, end = offsets[:, 0], offsets[:, 1]
    text = end > start
    cursor = np.maximum.accumulate(np.where(text, end, 0))
    # The start of the first text-carrying token after each position (none: the text's end).
    following = np.where(text, np.arange(n), n)
    following = np.minimum.accumulate(following[::-1])[::-1]  # first text token at or after i
    after = np.append(following[1:], n)
    next_start = np.where(after < n, start[np.minimum(after, n - 1)], np.iinfo(np.int64).max)
    ends = np.where(next_start >= cursor, cursor, -1)
    # Keep the first of several positions ending at the same place (ends are non-decreasing).
    valid = ends >= 0
    positions = np.flatnonzero(valid)
    repeat = np.zeros(n, dtype=bool)
    repeat[positions[1:]] = ends[positions[1:]] == ends[positions[:-1]]
    return np.where(repeat, -1, ends)


def align(student_offsets: Any, teacher_offsets: Any) -> np.ndarray:
    """For each student position, the teacher position whose context ends at the same place, or -1.

    Both ``[N, 2]`` offsets of the same text in the same unit (characters or bytes). Returns int64
    ``[S]``: a batch field, ready for :func:`distill_reader.torch.uld_loss`. Where it is not -1,
    it is strictly increasing, and student position s and teacher position ``alignment[s]`` predict
    tokens that start at the same offset, having seen the same text.
    """
    student = context_ends(student_offsets)
    teacher = context_ends(teacher_offsets)
    teacher_positions = np.flatnonzero(teacher >= 0)
    teacher_ends = teacher[teacher_positions]  # strictly increasing
    if len(teacher_ends) == 0:
        return np.full(len(student), -1, dtype=np.int64)
    found = np.minimum(np.searchsorted(teacher_ends, student), len(teacher_ends) - 1)
    match = (student >= 0) & (teacher_ends[found] == student)
    return np.where(match, teacher_positions[found], -1).astype(np.int64)


def utf8_offsets(text: str, offsets: Any, byte_lengths: Any = None) -> np.ndarray:
    """Character offsets of ``text`` as UTF-8 byte offsets.

    Tokens sharing a character (the bytes of a multi-byte character split across byte-level tokens)
    first get the bytes of the whole characters they touch, overlapping; ``byte_lengths`` (int
    ``[N]``, each token's length in bytes, -1 unknown) then places the boundaries between them:
    from the end of each run of tokens sharing characters backwards, when the run's lengths are all
    known and add up to its bytes. Other runs stay overlapping, and :func:`context_ends` leaves the
    positions inside them out.
    """
    offsets = _check_offsets(offsets)
    units = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    sizes = 1 + (units >= 0x80) + (units >= 0x800) + (units >= 0x10000)
    char_to_byte = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if len(offsets) and offsets[:, 1].max() > len(text):
        raise ValueError(f"offsets reach past the text's {len(text)} characters")
    result = char_to_byte[offsets]
    if byte_lengths is None or len(offsets) == 0:
        return result
    lengths = np.asarray(byte_lengths, dtype=np.int64)
    if lengths.shape != (len(offsets),):
        raise ValueError(f"byte_lengths must be [{len(offsets)}], got shape {lengths.shape}")
    members, first = _shared_runs(offsets)
    if len(members) == 0:
        return result
    # Each run's byte span, and whether its lengths place its inner boundaries: all known, adding
    # up to the span, the last token ending where the run does.
    heads = np.flatnonzero(first)
    known = lengths[members]
    span_start = result[members[heads], 0]
    span_end = np.maximum.reduceat(result[members, 1], heads)
    last = np.append(heads[1:], len(members)) - 1
    ok = (np.minimum.reduceat(known, heads) > 0) & (np.add.reduceat(known, heads) == span_end - span_start)
    ok &= result[members[last], 1] == span_end
    # Backwards from each run's end: a token starts where the lengths of the tokens after it end.
    run = np.cumsum(first) - 1
    total = np.cumsum(known)
    after = total[last][run] - total  # bytes of the run's tokens after each token
    use = ok[run]
    result[members[use], 1] = (span_end[run] - after)[use]
    result[members[use], 0] = (span_end[run] - after - known)[use]
    return result


def _shared_runs(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tokens in runs of text-carrying tokens that share characters, in order, and which of
    them start a run: a token that starts before the end of the tokens before it, with those."""
    start, end = offsets[:, 0], offsets[:, 1]
    text_positions = np.flatnonzero(end > start)
    if len(text_positions) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    cursor = np.maximum.accumulate(end[text_positions])
    inside = np.append(False, start[text_positions[1:]] < cursor[:-1])  # starts in a shared character
    member = inside | np.append(inside[1:], False)
    first = member & ~inside
    return text_positions[member], first[member]


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a directory holding one."""
    from tokenizers import Tokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer, or the tokenizer itself."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _is_byte_level(backend: Any) -> bool:
    parts = (getattr(backend, "pre_tokenizer", None), getattr(backend, "decoder", None))
    return any("ByteLevel(" in repr(part) for part in parts if part is not None)


def _byte_lengths(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    """Each token's length in bytes where its vocabulary entry tells it, else -1.

    Tokens of a byte-level vocabulary (GPT-2's alphabet, one character a byte) and byte-fallback
    tokens (``<0xE2>``, SentencePiece) have known lengths; others (WordPiece, Unigram pieces,
    special tokens) -1.
    """
    backend = _backend(tokenizer)
    byte_level = _is_byte_level(backend)
    lengths = np.full(len(ids), -1, dtype=np.int64)
    for i, token_id in enumerate(ids.tolist()):
        piece = backend.id_to_token(token_id)
        if piece is None:
            continue
        if _BYTE_FALLBACK.fullmatch(piece):
            lengths[i] = 1
        elif byte_level and all(c in _BYTE_ALPHABET for c in piece):
            lengths[i] = len(piece)
    return lengths


def tokenize(
    tokenizer: Any, text: str, *, add_special_tokens: bool = False, unit: str = "byte"
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int64 [N], offsets int64 [N, 2])`` of ``text``.

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its
    ``backend_tokenizer`` encodes: transformers' own call options do not apply).
    ``unit="byte"`` (default): UTF-8 byte offsets, with the boundaries inside multi-byte
    characters placed from the tokens' own bytes where the vocabulary tells them (see
    :func:`utf8_offsets`); ``unit="char"``: the tokenizer's character offsets as they are.
    ``add_special_tokens``: whether the post-processor adds BOS/EOS and the like (zero-width
    tokens; :func:`context_ends` handles them).
    """
    if unit not in _UNITS:
        raise ValueError(f"tokenize: unit must be one of {_UNITS}, got {unit!r}")
    encoding = _backend(tokenizer).encode(text, add_special_tokens=add_special_tokens)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    if unit == "byte":
        # Byte lengths matter only where tokens share a character: look up those tokens only.
        lengths = np.full(len(ids), -1, dtype=np.int64)
        members, _ = _shared_runs(_check_offsets(offsets))
        lengths[members] = _byte_lengths(tokenizer, ids[members])
        offsets = utf8_offsets(text, offsets, lengths)
    return ids, offsets


def align_text(
    text: str,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    student_special_tokens: bool = False,
    teacher_special_tokens: bool = False,
    unit: str = "byte",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(student_ids [S], teacher_ids [T], alignment [S])`` of one text: what a row carries.

    ``*_special_tokens``: whether that side's post-processor adds its special tokens (a teacher
    trained with a BOS should get it; a student that had none needs none to be aligned).
    """
    student_ids, student_offsets = tokenize(
        student_tokenizer, text, add_special_tokens=student_special_tokens, unit=unit
    )
    teacher_ids, teacher_offsets = tokenize(
        teacher_tokenizer, text, add_special_tokens=teacher_special_tokens, unit=unit
    )
    return student_ids, teacher_ids, align(student_offsets, teacher_offsets)
