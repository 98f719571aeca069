"""Property tests for the pure balancing function (discovery/balance.py)."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_reader.discovery import balance as balance_module
from distill_reader.discovery.balance import balance, loads

pytestmark = pytest.mark.timeout(120)

teacher_names = st.sampled_from([f"10.0.0.{i}:8001" for i in range(12)])
unit_fleets = st.dictionaries(teacher_names, st.just(1.0), max_size=10)
weighted_fleets = st.dictionaries(teacher_names, st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0]), max_size=10)
student_sets = st.dictionaries(st.sampled_from([f"s{i}" for i in range(20)]), st.integers(1, 6), max_size=15)


def check_invariants(teachers, students, result) -> None:
    assert set(result) == set(students)
    for s, ts in result.items():
        assert len(ts) == min(students[s], len(teachers)), (s, ts)
        assert len(set(ts)) == len(ts)
        assert set(ts) <= set(teachers)
    n = loads(teachers, result)
    w = {t: Fraction(x) for t, x in teachers.items()}
    for ts in result.values():
        for a in ts:
            for b in teachers:
                if b not in ts:
                    assert Fraction(n[a]) / w[a] <= Fraction(n[b] + 1) / w[b], (a, b, n)


def check_unit_balance(teachers, result) -> None:
    n = loads(teachers, result)
    if n:
        assert max(n.values()) - min(n.values()) <= 1, n


@settings(max_examples=300, deadline=None)
@given(unit_fleets, student_sets)
def test_unit_weights_balanced(teachers, students):
    result = balance(teachers, students)
    check_invariants(teachers, students, result)
    check_unit_balance(teachers, result)


@settings(max_examples=300, deadline=None)
@given(weighted_fleets, student_sets)
def test_weighted_invariants(teachers, students):
    check_invariants(teachers, students, balance(teachers, students))


@settings(max_examples=100, deadline=None)
@given(weighted_fleets, student_sets, st.randoms(use_true_random=False))
def test_deterministic_and_order_independent(teachers, students, rnd):
    first = balance(teachers, students)
    t_items, s_items = list(teachers.items()), list(students.items())
    rnd.shuffle(t_items)
    rnd.shuffle(s_items)
    assert balance(dict(t_items), dict(s_items)) == first
    # Fixpoint: feeding the result back changes nothing.
    assert balance(teachers, students, first) == first


def min_new_links(teachers, students, previous) -> int:
    """A lower bound on the links any valid balanced assignment must add to ``previous``."""
    kept = {s: [t for t in dict.fromkeys(previous.get(s, ())) if t in teachers] for s in students}
    p = loads(teachers, kept)
    total = sum(min(r, len(teachers)) for r in students.values())
    if not teachers:
        return 0
    q, r = divmod(total, len(teachers))
    # Balanced count vectors: r teachers at q+1, the rest at q. Give q+1 to those holding most.
    order = sorted(teachers, key=lambda t: -p[t])
    target = {t: q + (1 if i < r else 0) for i, t in enumerate(order)}
    return sum(max(0, target[t] - p[t]) for t in teachers)


changes = st.lists(
    st.one_of(
        st.tuples(st.just("add_teacher"), teacher_names),
        st.tuples(st.just("kill_teacher"), teacher_names),
        st.tuples(st.just("add_student"), st.sampled_from([f"s{i}" for i in range(20)]), st.integers(1, 6)),
        st.tuples(st.just("drop_student"), st.sampled_from([f"s{i}" for i in range(20)])),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(unit_fleets, student_sets, changes)
def test_change_sequences_are_sticky(teachers, students, steps):
    teachers, students = dict(teachers), dict(students)
    current = balance(teachers, students)
    for step in steps:
        if step[0] == "add_teacher":
            teachers[step[1]] = 1.0
        elif step[0] == "kill_teacher":
            teachers.pop(step[1], None)
        elif step[0] == "add_student":
            students[step[1]] = step[2]
        else:
            students.pop(step[1], None)
        new = balance(teachers, students, current)
        check_invariants(teachers, students, new)
        check_unit_balance(teachers, new)
        added = sum(len(set(new[s]) - set(current.get(s, ()))) for s in new)
        forced = sum(
            max(0, min(students[s], len(teachers)) - len(set(current.get(s, ())) & set(teachers))) for s in students
        )
        bound = min_new_links(teachers, students, current)
        shrunk = step[0] == "add_student" and len(current.get(step[1], ())) > min(step[2], len(teachers))
        if forced == 0 and not shrunk:
            # Nobody must take a new teacher (a teacher joined, a student left): exactly as few new
            # links as any balanced assignment needs, i.e. only moves onto the under-loaded teachers.
            assert added == bound, (step, current, new)
        elif not shrunk:
            # Each forced link may displace at most one other; nothing else moves.
            assert added <= forced + bound, (step, current, new)
        current = new


def test_issue_example():
    teachers = {f"t{i}:1": 1.0 for i in range(4)}
    students = {"a": 2, "b": 2}
    first = balance(teachers, students)
    assert sorted(loads(teachers, first).values()) == [1, 1, 1, 1]
    dead = first["a"][0]
    del teachers[dead]
    second = balance(teachers, students, first)
    assert all(len(ts) == 2 for ts in second.values())
    assert sorted(loads(teachers, second).values()) == [1, 1, 2]
    assert second["b"] == first["b"]  # b lost nothing, so b does not move
    assert set(first["a"]) - {dead} <= set(second["a"])


def test_more_students_than_teachers_and_fewer_teachers_than_wanted():
    result = balance({"a:1": 1, "b:1": 1}, {f"s{i}": 3 for i in range(5)})
    assert all(ts == ("a:1", "b:1") for ts in result.values())
    result = balance({"a:1": 1, "b:1": 1, "c:1": 1}, {f"s{i}": 1 for i in range(7)})
    assert sorted(loads({"a:1": 1, "b:1": 1, "c:1": 1}, result).values()) == [2, 2, 3]
    assert balance({}, {"s": 2}) == {"s": ()}


def test_weights_share_proportionally():
    teachers = {"big:1": 3.0, "small:1": 1.0}
    result = balance(teachers, {f"s{i}": 1 for i in range(8)})
    assert loads(teachers, result) == {"big:1": 6, "small:1": 2}


def test_bad_input():
    with pytest.raises(ValueError, match="require_num"):
        balance({"a:1": 1}, {"s": 0})
    with pytest.raises(ValueError, match="weight"):
        balance({"a:1": 0}, {"s": 1})
    with pytest.raises(ValueError, match="weight"):
        balance({"a:1": float("nan")}, {"s": 1})


def test_large_fleet_teacher_death_replaces_only_its_links(monkeypatch):
    """64 weighted teachers, 256 students: a valid balanced assignment; when a teacher dies, exactly
    its links are replaced and the rebalancing makes no more moves than that (the work is
    proportional to the change, not to the fleet)."""
    moves = []
    best_move = balance_module._best_move

    def counted(*args):
        move = best_move(*args)
        if move is not None:
            moves.append(move)
        return move

    monkeypatch.setattr(balance_module, "_best_move", counted)
    rnd = random.Random(0)
    teachers = {f"10.1.{i // 250}.{i % 250}:8001": rnd.choice([1.0, 2.0]) for i in range(64)}
    students = {f"s{i}": rnd.randint(1, 8) for i in range(256)}
    first = balance(teachers, students)
    check_invariants(teachers, students, first)
    dead = next(iter(teachers))
    lost = sum(dead in ts for ts in first.values())
    assert lost > 0
    del teachers[dead]
    moves.clear()
    second = balance(teachers, students, first)
    check_invariants(teachers, students, second)
    added = sum(len(set(second[s]) - set(first[s])) for s in students)
    assert added == lost
    assert len(moves) <= lost
