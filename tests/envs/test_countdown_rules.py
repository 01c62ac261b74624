"""The Countdown rules (jnp and Python forms), count_solutions and solve, against the oracle."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import countdown
from envs.countdown import rules
from tests import oracle


def random_problems(rng, count, n, max_number=20, max_target=60):
    """Small numbers (with zeros and repeats); half the targets come from random play, so
    that many problems are solvable, half are uniform."""
    numbers = rng.integers(0, max_number + 1, size=(count, n))
    targets = rng.integers(0, max_target + 1, size=count)
    for k in range(0, count, 2):
        nums = numbers[k].tolist()
        while len(nums) > 1:
            i, j = oracle.pair_list(len(nums))[rng.integers(len(nums) * (len(nums) - 1) // 2)]
            value = oracle.combine(nums[i], nums[j], int(rng.integers(3)))
            nums = [x for m, x in enumerate(nums) if m not in (i, j)] + [value]
        targets[k] = nums[0] if nums[0] <= 2**31 - 1 else 0
    return numbers.astype(np.int32), targets.astype(np.int32)


# Edge values: zero, equal operands, exact and inexact division, int32 overflow boundaries.
EDGE = [0, 1, 2, 3, 7, 12, 46340, 46341, 65535, 65536, 2**30, 2**31 - 2, 2**31 - 1, 1073741823, 1073741824]


def test_op_values_match_python_rules_and_oracle():
    rng = np.random.default_rng(0)
    pairs = list(itertools.product(EDGE, EDGE))
    pairs += [tuple(p) for p in rng.integers(0, 2**31 - 1, size=(3000, 2))]
    pairs += [tuple(p) for p in rng.integers(0, 200, size=(3000, 2))]
    small = rng.integers(1, 2000, size=2000)
    pairs += [(int(a * q), int(a)) for a, q in zip(small, rng.integers(0, 2**31 // 2000, size=2000))]
    a = jnp.array([p[0] for p in pairs], jnp.int32)
    b = jnp.array([p[1] for p in pairs], jnp.int32)
    values, legal = jax.jit(rules.op_values)(a, b)
    values, legal = np.asarray(values), np.asarray(legal)
    for k, (x, y) in enumerate(pairs):
        for op in range(4):
            expect = oracle.combine(int(x), int(y), op)
            assert rules.apply_op(int(x), int(y), op) == expect, (x, y, op)
            assert legal[k, op] == (expect is not None), (x, y, op)
            if expect is not None:
                assert values[k, op] == expect, (x, y, op)


def test_python_moves_follow_canonical_order():
    nums = [4, 23, 59, 44]
    got = [(m.i, m.j, m.op) for m in rules.moves(nums)]
    expect = [
        (i, j, op)
        for i, j in itertools.combinations(range(4), 2)
        for op in range(4)
        if oracle.combine(nums[i], nums[j], op) is not None
    ]
    assert got == expect
    texts = {(m.i, m.j, m.op): m.text for m in rules.moves(nums)}
    assert texts[(0, 1, 0)] == "4+23=27"
    assert texts[(0, 2, 2)] == "59-4=55"
    assert texts[(1, 3, 1)] == "23*44=1012"
    assert rules.apply_move([22, 26, 31, 53], 1, 3, 2) == [22, 31, 27]
    assert rules.apply_move([3, 7], 0, 1, 3) is None
    assert rules.apply_move([3, 7], 1, 0, 0) is None


def test_encode_decode_roundtrip_and_errors():
    for n in range(2, 7):
        for a in range(rules.num_actions(n)):
            i, j, op = countdown.decode_action(a, n)
            assert countdown.encode_action(i, j, op, n) == a
            assert (i, j) == list(itertools.combinations(range(n), 2))[a // 4]
        ii, _jj, _ops = countdown.decode_action(jnp.arange(rules.num_actions(n)), n)
        assert np.asarray(ii).tolist() == [countdown.decode_action(a, n)[0] for a in range(rules.num_actions(n))]
    assert rules.num_actions(4) == 24
    with pytest.raises(ValueError, match="action=24"):
        countdown.decode_action(24, 4)
    with pytest.raises(ValueError, match=r"\(i, j\)=\(2, 1\)"):
        countdown.encode_action(2, 1, 0)
    with pytest.raises(ValueError, match="op=4"):
        countdown.encode_action(0, 1, 4)
    with pytest.raises(ValueError, match="num_numbers=1"):
        rules.num_actions(1)


@pytest.mark.parametrize("n,count", [(2, 400), (3, 1000), (4, 2000), (5, 60)])
def test_count_solutions_matches_oracle(n, count):
    rng = np.random.default_rng(n)
    numbers, targets = random_problems(rng, count, n)
    got = np.asarray(jax.jit(jax.vmap(countdown.count_solutions))(numbers, targets))
    expect = np.array([oracle.num_solutions(list(map(int, x)), int(t)) for x, t in zip(numbers, targets)])
    np.testing.assert_array_equal(got, expect)
    assert (expect > 0).mean() > 0.2  # the sample really exercises solvable problems
    solvable = np.asarray(jax.jit(countdown.is_solvable)(numbers, targets))
    np.testing.assert_array_equal(solvable, expect > 0)


def test_count_solutions_on_every_fixture(fixture_rows):
    rows = fixture_rows
    assert len(rows) == 200
    count = jax.jit(countdown.count_solutions)
    for row in rows:
        assert int(count(jnp.array(row["nums"]), row["target"])) == row["num_solutions"], row["id"]


def _first_solution(nums, target):
    """Depth-first in canonical order: the first action sequence that solves it."""
    n = len(nums)
    if n == 1:
        return [] if nums[0] == target else None
    for _p, (i, j) in enumerate(oracle.pair_list(n)):
        for op in range(4):
            value = oracle.combine(nums[i], nums[j], op)
            if value is None:
                continue
            tail = _first_solution([x for k, x in enumerate(nums) if k not in (i, j)] + [value], target)
            if tail is not None:
                return [(i, j, op)] + tail
    return None


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_solve_returns_first_sequence_that_the_env_accepts(n):
    rng = np.random.default_rng(10 + n)
    numbers, targets = random_problems(rng, 300 if n < 5 else 40, n)
    solvable, actions = jax.jit(jax.vmap(countdown.solve))(numbers, targets)
    solvable, actions = np.asarray(solvable), np.asarray(actions)
    assert actions.shape == (len(targets), n - 1) and actions.dtype == np.int32
    for nums, t, ok, acts in zip(numbers.tolist(), targets.tolist(), solvable, actions):
        first = _first_solution(nums, t)
        assert ok == (first is not None)
        if not ok:
            assert (acts == -1).all()
            continue
        env = oracle.PyCountdown(n)
        env.reset(nums, t)
        rewards = []
        for k, a in enumerate(acts):
            # Env actions index slots of the full N-slot list.
            i, j, op = countdown.decode_action(int(a), n)
            assert (i, j, op) == first[k]
            _, r, done, illegal = env.step(int(a))
            assert not illegal
            rewards.append(r)
        assert done and rewards[-1] == 1.0


def test_solve_and_count_are_jittable_vmappable_and_eager_equal():
    numbers = jnp.array([[4, 23, 59, 44], [1, 1, 1, 1], [25, 2, 4, 3]], jnp.int32)
    targets = jnp.array([47, 99, 29], jnp.int32)
    eager = [countdown.count_solutions(x, t) for x, t in zip(numbers, targets)]
    np.testing.assert_array_equal(jax.vmap(countdown.count_solutions)(numbers, targets), eager)
    np.testing.assert_array_equal(jax.jit(jax.vmap(countdown.count_solutions))(numbers, targets), eager)
    s, a = countdown.solve(numbers[0], targets[0])
    s2, a2 = jax.jit(countdown.solve)(numbers[0], targets[0])
    assert bool(s) and bool(s2) and np.array_equal(a, a2)
    with pytest.raises(ValueError, match="use jax.vmap"):
        countdown.count_solutions(numbers, targets)


def test_count_solutions_handles_overflow_exactly():
    # 65536 * 65536 = 2**32 wraps to 0 in int32; it must not count as reaching target 0.
    assert int(countdown.count_solutions(jnp.array([65536, 65536]), 0)) == 1  # only 65536-65536
    assert oracle.num_solutions([65536, 65536], 0) == 1
    big = [2**31 - 1, 1, 2]
    assert int(countdown.count_solutions(jnp.array(big), 3)) == oracle.num_solutions(big, 3)
