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
   are broken by student id, by a fixed hash of a teacher's endpoint and load (which teacher of
   equally loaded ones a student takes), and by endpoint.

Loads are compared exactly, in integers: each weight is the exact fraction ``p / q`` of its float
(``float.as_integer_ratio``), all are brought to one denominator, and a student on teacher ``t``
costs ``L / W_t`` where ``L`` is the least common multiple of those integer weights. A load is then
``n_t * (L / W_t)``, an integer, so no float rounding ever decides a move, and heaps of plain
``(int, str)`` tuples order the teachers at C speed (about 40 ms from scratch for 1,000 teachers
and 10,000 students wanting 2, on one core; far less when only a few students change).
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections.abc import Mapping, Sequence

Assignment = dict[str, tuple[str, ...]]


def _check(teachers: Mapping[str, float], students: Mapping[str, int]) -> dict[str, int]:
    """Validate, then the cost of one student on each teacher: an integer inversely proportional to
    its weight (``L / W_t`` above)."""
    ratios: dict[str, tuple[int, int]] = {}
    for endpoint, weight in teachers.items():
        w = float(weight)
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"teacher {endpoint!r}: weight must be a positive number, got {weight!r}")
        ratios[endpoint] = w.as_integer_ratio()
    for student, require_num in students.items():
        if int(require_num) != require_num or require_num <= 0:
            raise ValueError(f"student {student!r}: require_num must be a positive integer, got {require_num!r}")
    if not ratios:
        return {}
    # Denominators are powers of two: their maximum is a common denominator.
    den = max(q for _, q in ratios.values())
    ints = {t: p * (den // q) for t, (p, q) in ratios.items()}
    lcm = math.lcm(*set(ints.values()))
    return {t: lcm // w for t, w in ints.items()}


def _seed(endpoint: str) -> int:
    return zlib.crc32(endpoint.encode())


def _tie(seed: int, n: int) -> int:
    """Among equally loaded teachers, the order in which students take them: a fixed hash of the
    endpoint and its load, so that it differs from one round of picks to the next. (Ties broken by
    name would give every student of a teacher the same partner, and when that teacher leaves, its
    students could then only be rebalanced by moving students that did not hold it.)"""
    return ((seed ^ (n * 0x9E3779B1)) * 0x85EBCA6B) & 0xFFFFFFFF


class _Loads:
    """Teacher loads with two lazily updated heaps: the most loaded teacher (a donor) and the one
    least loaded after taking one more student (a taker). Entries carry the count they were pushed
    with; an entry whose count is stale is skipped."""

    def __init__(self, cost: dict[str, int], load: dict[str, int], takers: list[tuple[int, int, str, int]]) -> None:
        self.cost, self.load = cost, load
        self.seeds = {t: _seed(t) for t in cost}
        self.donors = [(-n * cost[t], t, n) for t, n in load.items()]
        self.takers = takers
        heapq.heapify(self.donors)

    def add(self, t: str, delta: int) -> None:
        n = self.load[t] + delta
        self.load[t] = n
        heapq.heappush(self.donors, (-n * self.cost[t], t, n))
        heapq.heappush(self.takers, ((n + 1) * self.cost[t], _tie(self.seeds[t], n), t, n))

    @staticmethod
    def _top(heap: list[tuple], load: dict[str, int]) -> tuple:
        while heap[0][-1] != load[heap[0][-2]]:
            heapq.heappop(heap)
        return heap[0]

    def donor(self) -> tuple[int, str]:
        """(load, endpoint) of the most loaded teacher (ties: the smallest endpoint)."""
        key, t, _ = self._top(self.donors, self.load)
        return -key, t

    def taker(self) -> tuple[int, str]:
        """(load after one more student, endpoint) of the teacher that would be least loaded."""
        key, _, t, _ = self._top(self.takers, self.load)
        return key, t


def _fill(short: list[tuple[int, str]], held: dict[str, list[str]], cost: dict[str, int], load: dict[str, int]):
    """Give each short student (``(-k, id)``, in that order) the teachers that would be least loaded
    after taking it, one at a time; returns the takers' heap for the rebalance."""
    seeds = {t: _seed(t) for t in cost}
    takers = [((n + 1) * cost[t], _tie(seeds[t], n), t, n) for t, n in load.items()]
    heapq.heapify(takers)
    pop, push = heapq.heappop, heapq.heappush
    for minus_k, s in short:
        ts = held[s]
        need = -minus_k - len(ts)
        skipped = []
        chosen = []
        while need:
            entry = pop(takers)
            t = entry[2]
            if entry[3] != load[t]:
                continue  # stale
            if t in ts:
                skipped.append(entry)
                continue
            chosen.append(t)
            need -= 1
        for entry in skipped:
            push(takers, entry)
        for t in chosen:
            n = load[t] + 1
            load[t] = n
            push(takers, ((n + 1) * cost[t], _tie(seeds[t], n), t, n))
        ts.extend(chosen)
    return takers


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
    cost = _check(teachers, students)
    previous = previous or {}
    n_teachers = len(cost)
    held: dict[str, list[str]] = {}
    load: dict[str, int] = dict.fromkeys(cost, 0)
    want: dict[str, int] = {}
    for s, r in students.items():
        want[s] = min(int(r), n_teachers)
        kept = [t for t in previous.get(s, ()) if t in cost]
        if len(kept) > 1 and len(set(kept)) < len(kept):
            kept = list(dict.fromkeys(kept))
        held[s] = kept
        for t in kept:
            load[t] += 1
    # Students holding more than they want (require_num dropped) give up their most loaded teachers.
    for s in sorted(s for s, ts in held.items() if len(ts) > want[s]):
        kept = held[s]
        while len(kept) > want[s]:
            t = max(kept, key=lambda t: (load[t] * cost[t], t))
            kept.remove(t)
            load[t] -= 1
    short = [(-k, s) for s, k in want.items() if len(held[s]) < k]
    # Students holding fewer take the teacher that would be least loaded after taking them. Those
    # wanting the most go first: they have the least choice, so later picks cannot crowd them out.
    short.sort()
    takers = _fill(short, held, cost, load)
    if n_teachers > 1:
        # Students whose set changes anyway (they are sent a message regardless) move first.
        touched = {s for _, s in short} | {s for s, ts in held.items() if len(ts) < len(previous.get(s, ()))}
        _rebalance(_Loads(cost, load, takers), held, cost, touched)
    return {s: tuple(sorted(ts)) for s, ts in held.items()}


def _rebalance(loads: _Loads, held: dict[str, list[str]], cost: dict[str, int], touched: set[str]) -> None:
    """Move one link at a time from a most loaded teacher to a least loaded one that a student of
    the first lacks, until no such move would balance the pair better. Each move lowers
    ``sum(n * (n + 1) * cost / 2)``, so this terminates."""
    holders: dict[str, set[str]] | None = None  # built on the first move: most calls make none
    while True:
        la, a = loads.donor()
        lb, b = loads.taker()
        if lb >= la:
            return  # the most loaded teacher is no heavier than the lightest one plus a student
        if holders is None:
            holders = {t: set() for t in cost}
            for s, ts in held.items():
                for t in ts:
                    holders[t].add(s)
        move = _best_move(loads, holders, held, (la, a), (lb, b), touched)
        if move is None:
            return
        s, a, b = move
        touched.add(s)
        held[s][held[s].index(a)] = b
        holders[a].discard(s)
        holders[b].add(s)
        loads.add(a, -1)
        loads.add(b, 1)


def _best_move(
    loads: _Loads,
    holders: dict[str, set[str]],
    held: dict[str, list[str]],
    donor: tuple[int, str],
    taker: tuple[int, str],
    touched: set[str],
) -> tuple[str, str, str] | None:
    """The (student, from, to) move that fixes the worst imbalance, or None when balanced.

    Usually the most loaded teacher has a student lacking the least loaded one (a link move between
    the heaps' tops). Only when every student of the donor already holds the taker (few teachers,
    large require_num) are all pairs scanned in order, heaviest donor and lightest taker first.
    Among the students that could move, one whose set changes anyway (``touched``) is preferred,
    so that a teacher's death changes no more students than it must; then the smallest id."""
    (la, a), (_, b) = donor, taker
    candidates = [s for s in holders[a] if b not in held[s]]
    if candidates:
        return _pick(candidates, touched), a, b
    cost, load = loads.cost, loads.load
    donors = sorted(load, key=lambda t: (-load[t] * cost[t], t))
    takers = sorted(load, key=lambda t: ((load[t] + 1) * cost[t], t))
    for a in donors:
        la = load[a] * cost[a]
        for b in takers:
            if (load[b] + 1) * cost[b] >= la:
                break  # no taker after this one is lighter either
            candidates = [s for s in holders[a] if b not in held[s]]
            if candidates:
                return _pick(candidates, touched), a, b
    return None


def _pick(candidates: list[str], touched: set[str]) -> str:
    preferred = [s for s in candidates if s in touched]
    return min(preferred or candidates)


def loads(teachers: Mapping[str, float], assignment: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Number of students per teacher (every teacher in ``teachers`` appears, possibly with 0)."""
    counts = dict.fromkeys(teachers, 0)
    for ts in assignment.values():
        for t in ts:
            if t in counts:
                counts[t] += 1
    return counts
