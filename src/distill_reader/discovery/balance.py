"""Assigning teachers to students: a pure, deterministic function.

``balance(teachers, students, previous)`` maps plain data to plain data and has no other input, so
every discovery server that reads the same store state computes the same assignment.

Invariants (checked by the property tests in ``tests/test_balance.py``):

1. **Coverage.** Every student gets exactly ``k = min(require_num, number of teachers)`` teachers,
   never the same teacher twice, and only teachers that are in ``teachers``. (With ``k <= T`` a
   valid assignment always exists, so there is no case where a student is short-changed.)
2. **Balance.** A teacher's *load* is ``students / weight``. No single student can move from one
   teacher to another and leave the pair better balanced: for every pair of teachers ``a, b`` and
   every student that holds ``a`` but not ``b``, ``n_a / w_a <= (n_b + 1) / w_b``. With equal
   weights this is exactly "student counts differ by at most one" (if ``n_a >= n_b + 2`` some
   student of ``a`` lacks ``b``, since ``b`` has fewer students than ``a``). With unequal weights it
   is the natural weighted generalisation: the most loaded teacher is no more loaded than the
   least loaded one would be with one more student, wherever a student could make that move.
3. **Stickiness.** Given the ``previous`` assignment, a student keeps its live teachers; a student
   changes only when a teacher it held went away (or became unhealthy), its ``require_num`` or the
   number of teachers changed what it should hold, or balance (2) cannot be restored otherwise.
   Rebalancing moves one link at a time from the most loaded teacher to the least loaded one, so
   it makes no move that the balance does not need. ``balance(x, balance(x, p)) == balance(x, p)``.
4. **Determinism.** The result depends only on the arguments' contents, not on dict order; ties
   are broken by endpoint and student id.

Weights are compared exactly (as fractions), so a float rounding never decides a move.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

Assignment = dict[str, tuple[str, ...]]


def _check(teachers: Mapping[str, float], students: Mapping[str, int]) -> dict[str, Fraction]:
    weights: dict[str, Fraction] = {}
    for endpoint, weight in teachers.items():
        w = float(weight)
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"teacher {endpoint!r}: weight must be a positive number, got {weight!r}")
        weights[endpoint] = Fraction(w)
    for student, require_num in students.items():
        if int(require_num) != require_num or require_num <= 0:
            raise ValueError(f"student {student!r}: require_num must be a positive integer, got {require_num!r}")
    return weights


def balance(
    teachers: Mapping[str, float],
    students: Mapping[str, int],
    previous: Mapping[str, Sequence[str]] | None = None,
) -> Assignment:
    """Assign teachers to students; see the module docstring for the invariants.

    ``teachers`` maps a healthy teacher's endpoint to its capacity weight (> 0); ``students`` maps a
    student id to its ``require_num`` (>= 1); ``previous`` is the last assignment (student id ->
    endpoints), whose entries for unknown students or teachers are ignored. Returns student id ->
    sorted tuple of endpoints, for every student in ``students``.
    """
    weights = _check(teachers, students)
    names = sorted(weights)
    previous = previous or {}
    want = {s: min(int(students[s]), len(names)) for s in sorted(students)}
    held: dict[str, list[str]] = {}
    load: dict[str, int] = dict.fromkeys(names, 0)
    for s in want:
        kept: list[str] = []
        for t in previous.get(s, ()):
            if t in weights and t not in kept:
                kept.append(t)
        held[s] = kept
        for t in kept:
            load[t] += 1

    def key(t: str, extra: int = 0) -> tuple[Fraction, str]:
        return (Fraction(load[t] + extra) / weights[t], t)

    # Students holding more than they want (require_num dropped) give up their most loaded teachers.
    for s, k in want.items():
        while len(held[s]) > k:
            t = max(held[s], key=key)
            held[s].remove(t)
            load[t] -= 1
    # Students holding fewer take the teacher that would be least loaded after taking them. Those
    # wanting the most go first: they have the least choice, so later picks cannot crowd them out.
    for s, k in sorted(want.items(), key=lambda item: (-item[1], item[0])):
        while len(held[s]) < k:
            t = min((t for t in names if t not in held[s]), key=lambda t: key(t, 1))
            held[s].append(t)
            load[t] += 1
    # Rebalance: move one link at a time from a most loaded teacher to a least loaded one that a
    # student of the first lacks. Each move lowers sum(n * (n + 1) / (2 * w)), so this terminates.
    holders: dict[str, set[str]] = {t: set() for t in names}
    for s, ts in held.items():
        for t in ts:
            holders[t].add(s)
    while True:
        move = _best_move(names, weights, load, holders, held)
        if move is None:
            break
        s, a, b = move
        held[s][held[s].index(a)] = b
        holders[a].discard(s)
        holders[b].add(s)
        load[a] -= 1
        load[b] += 1
    return {s: tuple(sorted(ts)) for s, ts in held.items()}


def _best_move(
    names: list[str],
    weights: dict[str, Fraction],
    load: dict[str, int],
    holders: dict[str, set[str]],
    held: dict[str, list[str]],
) -> tuple[str, str, str] | None:
    """The (student, from, to) move that fixes the worst imbalance, or None when balanced."""
    donors = sorted(names, key=lambda t: (-Fraction(load[t]) / weights[t], t))
    takers = sorted(names, key=lambda t: (Fraction(load[t] + 1) / weights[t], t))
    for a in donors:
        la = Fraction(load[a]) / weights[a]
        for b in takers:
            if Fraction(load[b] + 1) / weights[b] >= la:
                break  # no taker after this one is lighter either
            for s in sorted(holders[a]):
                if b not in held[s]:
                    return s, a, b
    return None


def loads(teachers: Mapping[str, float], assignment: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Number of students per teacher (every teacher in ``teachers`` appears, possibly with 0)."""
    counts = dict.fromkeys(teachers, 0)
    for ts in assignment.values():
        for t in ts:
            if t in counts:
                counts[t] += 1
    return counts
