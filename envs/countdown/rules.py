"""The Countdown rules, defined once (see docs/trace_format.md).

A problem is a list of N integers and a target T. A move takes the numbers at positions
i < j of the current list and one of four operations:

    op 0  add  a+b             (written in list order, a = nums[i])
    op 1  mul  a*b             (written in list order)
    op 2  sub  hi-lo           (larger minus smaller; the result may be 0)
    op 3  div  hi/lo           (only when lo != 0 and the quotient is exact)

The two operands leave the list, the result is appended at the end and the order of the
others is kept. The problem is solved iff the list is exactly [T].

Candidate moves are enumerated pair by pair in ``itertools.combinations`` order and, per
pair, in the order add, mul, sub, div. An action id is ``pair * 4 + op`` where ``pair`` is
the index of (i, j) in ``itertools.combinations(range(N), 2)``.

Values are int32 on device. A move whose exact result exceeds ``MAX_VALUE`` (2**31 - 1) is
illegal everywhere (env, solver, Python helpers) so that the device and host agree
bit for bit; with the paper's ranges (N <= 4, numbers <= 99) no result comes near it.

This module holds both forms of the rules: plain Python (for the trace solvers and
verifier, one problem at a time) and ``jnp`` (vectorised, jittable). Tests check that the
two agree with each other and with an independent oracle.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MIN_NUMBERS = 2
MAX_NUMBERS = 6
NUM_OPS = 4
ADD, MUL, SUB, DIV = 0, 1, 2, 3
OP_SYMBOLS = ("+", "*", "-", "/")
MAX_VALUE = 2**31 - 1


def check_num_numbers(num_numbers) -> int:
    """Returns ``num_numbers`` as an int, or raises a one-line ValueError."""
    if (
        isinstance(num_numbers, bool)
        or not isinstance(num_numbers, (int, np.integer))
        or not (MIN_NUMBERS <= int(num_numbers) <= MAX_NUMBERS)
    ):
        raise ValueError(
            f"num_numbers={num_numbers!r} is out of range: expected an int from {MIN_NUMBERS} to {MAX_NUMBERS}"
        )
    return int(num_numbers)


@functools.cache
def pairs(num_numbers: int) -> tuple[tuple[int, int], ...]:
    """The position pairs (i, j), i < j, in ``itertools.combinations`` order."""
    return tuple(itertools.combinations(range(num_numbers), 2))


def num_actions(num_numbers: int) -> int:
    """A = C(N, 2) * 4."""
    return len(pairs(check_num_numbers(num_numbers))) * NUM_OPS


@functools.cache
def _pair_index(num_numbers: int) -> dict[tuple[int, int], int]:
    return {p: k for k, p in enumerate(pairs(num_numbers))}


@functools.cache
def _pair_arrays(num_numbers: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.array(pairs(num_numbers), dtype=np.int32).reshape(-1, 2)
    return p[:, 0].copy(), p[:, 1].copy()


def encode_action(i: int, j: int, op: int, num_numbers: int = 4) -> int:
    """The action id of the move (i, j, op) for lists of ``num_numbers`` slots."""
    n = check_num_numbers(num_numbers)
    if not (0 <= int(op) < NUM_OPS):
        raise ValueError(f"op={op!r} is out of range: expected 0 (add), 1 (mul), 2 (sub) or 3 (div)")
    key = (int(i), int(j))
    if key not in _pair_index(n):
        raise ValueError(f"(i, j)=({i!r}, {j!r}) is not a pair of positions with 0 <= i < j < {n}")
    return _pair_index(n)[key] * NUM_OPS + int(op)


def decode_action(action, num_numbers: int = 4):
    """(i, j, op) of an action id. Python ints give ints; arrays give arrays (jittable)."""
    n = check_num_numbers(num_numbers)
    a_count = num_actions(n)
    if isinstance(action, (int, np.integer)) and not isinstance(action, bool):
        if not (0 <= int(action) < a_count):
            raise ValueError(f"action={action!r} is out of range: expected 0 <= action < {a_count}")
        i, j = pairs(n)[int(action) // NUM_OPS]
        return i, j, int(action) % NUM_OPS
    action = jnp.asarray(action, jnp.int32)
    ii, jj = _pair_arrays(n)
    pair = jnp.clip(action // NUM_OPS, 0, len(ii) - 1)
    return jnp.asarray(ii)[pair], jnp.asarray(jj)[pair], action % NUM_OPS


# --------------------------------------------------------------------------------------
# Plain Python (one problem at a time; used by the trace solvers and the verifier).
# --------------------------------------------------------------------------------------
def apply_op(a: int, b: int, op: int, max_value: int | None = MAX_VALUE) -> int | None:
    """The result of op on (a, b) = (nums[i], nums[j]), or None if the move is illegal.

    ``max_value=None`` applies exact big-integer arithmetic with no bound (the verifier
    checks arithmetic written in a trace, whatever its size).
    """
    if op == ADD:
        r = a + b
    elif op == MUL:
        r = a * b
    elif op == SUB:
        r = a - b if a >= b else b - a
    elif op == DIV:
        hi, lo = (a, b) if a >= b else (b, a)
        if lo == 0 or hi % lo:
            return None
        r = hi // lo
    else:
        raise ValueError(f"op={op!r} is out of range: expected 0 (add), 1 (mul), 2 (sub) or 3 (div)")
    if max_value is not None and r > max_value:
        return None
    return r


def op_text(a: int, b: int, op: int, result: int) -> str:
    """The operation as traces write it: ``a+b=r``/``a*b=r`` in list order, ``hi-lo=r``, ``hi/lo=r``."""
    if op in (ADD, MUL):
        return f"{a}{OP_SYMBOLS[op]}{b}={result}"
    hi, lo = (a, b) if a >= b else (b, a)
    return f"{hi}{OP_SYMBOLS[op]}{lo}={result}"


class Move(NamedTuple):
    i: int
    j: int
    op: int
    result: int
    numbers: list  # the list after the move
    text: str  # e.g. "53-26=27"


def moves(nums: list[int]) -> Iterator[Move]:
    """The legal moves of a list, in the canonical enumeration order."""
    n = len(nums)
    for i, j in itertools.combinations(range(n), 2):
        a, b = nums[i], nums[j]
        rest = [nums[k] for k in range(n) if k != i and k != j]
        for op in range(NUM_OPS):
            r = apply_op(a, b, op)
            if r is not None:
                yield Move(i, j, op, r, rest + [r], op_text(a, b, op, r))


def apply_move(nums: list[int], i: int, j: int, op: int) -> list[int] | None:
    """The list after move (i, j, op), or None if it is illegal."""
    if not (0 <= i < j < len(nums)):
        return None
    r = apply_op(nums[i], nums[j], op)
    if r is None:
        return None
    return [nums[k] for k in range(len(nums)) if k != i and k != j] + [r]


# --------------------------------------------------------------------------------------
# jnp (vectorised, jittable).
# --------------------------------------------------------------------------------------
def exact_div(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(quotient, exact) of int32 hi >= lo >= 0, with no integer division.

    Integer division does not vectorise on CPUs; two float32 steps are exact here. The
    first quotient is within about hi * 2**-22 + 1 of the truth, so the remainder it leaves
    fits int32 and its own float32 quotient rounds to the exact correction whenever lo
    divides hi. If lo does not divide hi, no quotient leaves remainder 0.
    """
    f32 = jnp.float32
    safe_lo = jnp.where(lo == 0, 1, lo)
    flo = safe_lo.astype(f32)
    q = (hi.astype(f32) / flo).astype(jnp.int32)
    q = q + jnp.round((hi - q * safe_lo).astype(f32) / flo).astype(jnp.int32)
    return q, (lo != 0) & (hi - q * safe_lo == 0)


def op_values(a: jax.Array, b: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Results and legality of the four ops on int32 operands >= 0 (any matching shapes).

    Returns (values int32, legal bool), each with a new axis of size 4 at ``axis``, in the
    order add, mul, sub, div. Overflow past MAX_VALUE is detected exactly: int32 sums and
    products of operands below 2**31 wrap to negative values iff the true result lies in
    [2**31, 2**32); a float32 estimate rules out products of 2**32 and more.
    """
    a = jnp.asarray(a, jnp.int32)
    b = jnp.asarray(b, jnp.int32)
    hi = jnp.maximum(a, b)
    lo = jnp.minimum(a, b)
    add = a + b
    mul = a * b
    quo, div_ok = exact_div(hi, lo)
    add_ok = add >= 0
    mul_ok = (mul >= 0) & (a.astype(jnp.float32) * b.astype(jnp.float32) < 3.0e9)
    values = jnp.stack([add, mul, hi - lo, quo], axis=axis)
    legal = jnp.stack([add_ok, mul_ok, jnp.ones_like(add_ok), div_ok], axis=axis)
    return values, legal


def legal_mask(numbers: jax.Array, count: jax.Array) -> jax.Array:
    """bool[A]: the legal actions of a list held as ``numbers[:count]`` (int32[N], 0-padded)."""
    n = numbers.shape[-1]
    ii, jj = _pair_arrays(n)
    values, legal = op_values(numbers[ii], numbers[jj])
    del values
    legal = legal & (jnp.asarray(jj) < count)[:, None]
    return legal.reshape(-1)


def pick(values: jax.Array, index: jax.Array) -> jax.Array:
    """values[..., index] for a small static last axis, as a one-hot select (vectorises
    far better on CPU than a per-row gather under vmap)."""
    hot = jnp.arange(values.shape[-1], dtype=jnp.int32) == index[..., None]
    if values.dtype == jnp.bool_:
        return jnp.any(hot & values, axis=-1)
    return jnp.sum(jnp.where(hot, values, 0), axis=-1, dtype=values.dtype)


def step_numbers(numbers: jax.Array, count: jax.Array, action: jax.Array):
    """Applies an action to a 0-padded list. Returns (numbers', count', legal).

    When the action is illegal (or out of range) ``numbers'`` and ``count'`` are the inputs.
    Written with selects and static shifts only (no gathers), so it vectorises under vmap.
    """
    n = numbers.shape[-1]
    ii, jj = _pair_arrays(n)
    a_count = len(ii) * NUM_OPS
    action = jnp.asarray(action, jnp.int32)
    in_range = (action >= 0) & (action < a_count)
    safe = jnp.where(in_range, action, 0)
    pair, op = safe // NUM_OPS, safe % NUM_OPS
    i, j = pick(jnp.asarray(ii), pair), pick(jnp.asarray(jj), pair)
    values, legal = op_values(pick(numbers, i), pick(numbers, j))
    ok = in_range & (j < count) & pick(legal, op)
    zero = jnp.zeros((2,), jnp.int32)
    shift1 = jnp.concatenate([numbers[1:], zero[:1]])
    shift2 = jnp.concatenate([numbers[2:], zero])
    m = jnp.arange(n, dtype=jnp.int32)
    kept = jnp.where(m < i, numbers, jnp.where(m < j - 1, shift1, shift2))
    new = jnp.where(m == count - 2, pick(values, op), jnp.where(m < count - 2, kept, 0))
    return jnp.where(ok, new, numbers), jnp.where(ok, count - 1, count), ok


@functools.cache
def _rest_indices(k: int) -> np.ndarray:
    """int32[C(k,2), k-2]: for each pair, the positions that stay, in order."""
    return np.array([[m for m in range(k) if m not in p] for p in pairs(k)], dtype=np.int32).reshape(
        len(pairs(k)), k - 2
    )


def _final_hits(a: jax.Array, b: jax.Array, target: jax.Array, axis: int) -> jax.Array:
    """bool: which op turns the last pair (a, b) into exactly the target (ops at ``axis``).

    Same results as ``op_values(a, b)[0] == target`` where legal, but with no integer
    division: ``hi / lo == T`` is checked as ``hi == T * lo`` (overflow-checked).
    """
    hi = jnp.maximum(a, b)
    lo = jnp.minimum(a, b)
    add = a + b
    mul = a * b
    tlo = target * lo
    f32 = jnp.float32
    add_hit = (add >= 0) & (add == target)
    mul_hit = (mul >= 0) & (a.astype(f32) * b.astype(f32) < 3.0e9) & (mul == target)
    sub_hit = hi - lo == target
    div_hit = (lo != 0) & (tlo >= 0) & (target.astype(f32) * lo.astype(f32) < 3.0e9) & (tlo == hi)
    return jnp.stack([add_hit, mul_hit, sub_hit, div_hit], axis=axis)


def solved_sequences(numbers_t: jax.Array, target: jax.Array) -> jax.Array:
    """bool[L, *batch]: which of the L = A_N * ... * A_2 move sequences solve each problem.

    ``numbers_t`` is int32[N, *batch] (numbers first, so that batch dimensions are the minor
    ones and the enumeration vectorises over problems), ``target`` int32[*batch]. Sequences
    are in lexicographic order of their moves, each move in canonical order.
    """
    nums = jnp.asarray(numbers_t, jnp.int32)[None]  # [S=1, k, *batch]
    target = jnp.asarray(target, jnp.int32)
    batch = nums.shape[2:]
    ok = jnp.ones((1,) + batch, bool)
    while nums.shape[1] > 2:
        k = nums.shape[1]
        ii, jj = _pair_arrays(k)
        values, legal = op_values(nums[:, ii], nums[:, jj], axis=2)  # [S, C, 4, *batch]
        rest = nums[:, _rest_indices(k)]  # [S, C, k-2, *batch]
        rest = jnp.broadcast_to(rest[:, :, None], rest.shape[:2] + (NUM_OPS,) + rest.shape[2:])
        nums = jnp.concatenate([rest, values[:, :, :, None]], axis=3)  # [S, C, 4, k-1, *batch]
        nums = nums.reshape((-1, k - 1) + batch)
        ok = (ok[:, None, None] & legal).reshape((-1,) + batch)
    hits = ok[:, None] & _final_hits(nums[:, 0], nums[:, 1], target, axis=1)  # [S, 4, *batch]
    return hits.reshape((-1,) + batch)


def count_solutions(numbers: jax.Array, target: jax.Array) -> jax.Array:
    """int32: the number of move sequences that turn ``numbers`` (int32[N]) into [target].

    Exhaustive and exact (N=4: 1152 sequences); static shapes, jittable and vmappable.
    """
    numbers = jnp.asarray(numbers, jnp.int32)
    check_num_numbers(numbers.shape[-1])
    if numbers.ndim != 1:
        raise ValueError(f"numbers has shape {numbers.shape}: expected int32[N]; use jax.vmap for batches")
    return jnp.sum(solved_sequences(numbers, target), dtype=jnp.int32)


def _radices(n: int) -> list[int]:
    return [num_actions(k) for k in range(n, 1, -1)]


@functools.cache
def _local_to_env_actions(n: int) -> tuple[np.ndarray, ...]:
    """Per level (k = n..2): the env action id of each local action on a k-number list."""
    out = []
    for k in range(n, 1, -1):
        out.append(
            np.array(
                [_pair_index(n)[p] * NUM_OPS + op for p in pairs(k) for op in range(NUM_OPS)],
                dtype=np.int32,
            )
        )
    return tuple(out)


def solve(numbers: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(solvable bool, actions int32[N-1]): the first solving move sequence, as env actions.

    "First" is the canonical enumeration order (the order a depth-first search that tries
    moves in action order would find). When no sequence exists ``actions`` is all -1.
    Actions index the env's 0-padded list, so they can be fed to ``Countdown-v0`` in order.
    """
    numbers = jnp.asarray(numbers, jnp.int32)
    n = check_num_numbers(numbers.shape[-1])
    if numbers.ndim != 1:
        raise ValueError(f"numbers has shape {numbers.shape}: expected int32[N]; use jax.vmap for batches")
    solved = solved_sequences(numbers, target)
    leaf = jnp.argmax(solved).astype(jnp.int32)
    solvable = solved[leaf]
    radices = _radices(n)
    strides = np.cumprod([1] + radices[::-1])[:-1][::-1]
    tables = _local_to_env_actions(n)
    actions = jnp.stack([jnp.asarray(tables[lvl])[(leaf // int(strides[lvl])) % radices[lvl]] for lvl in range(n - 1)])
    return solvable, jnp.where(solvable, actions, -1)


_UNROLL_MAX_NUMBERS = 4


def is_solvable(numbers: jax.Array, targets: jax.Array) -> jax.Array:
    """bool[*batch]: whether any move sequence solves each problem (numbers int32[*batch, N]).

    The batched form that problem generation uses. For N <= 4 the move tree is unrolled
    into one elementwise expression over the batch (about 1.5k comparisons), which XLA
    fuses into a single vectorised loop with no intermediate arrays; this is several times
    faster than reducing ``solved_sequences``, which is what larger N use.
    """
    numbers = jnp.asarray(numbers, jnp.int32)
    targets = jnp.asarray(targets, jnp.int32)
    n = check_num_numbers(numbers.shape[-1])
    if n > _UNROLL_MAX_NUMBERS:
        return jnp.any(solved_sequences(jnp.moveaxis(numbers, -1, 0), targets), axis=0)
    frontier = [([numbers[..., c] for c in range(n)], jnp.ones(targets.shape, bool))]
    while len(frontier[0][0]) > 2:
        expanded = []
        for nums, ok in frontier:
            for i, j in pairs(len(nums)):
                rest = [x for m, x in enumerate(nums) if m != i and m != j]
                values, legal = op_values(nums[i], nums[j], axis=0)
                for op in range(NUM_OPS):
                    expanded.append((rest + [values[op]], ok & legal[op]))
        frontier = expanded
    found = jnp.zeros(targets.shape, bool)
    for (a, b), ok in frontier:
        found = found | (ok & jnp.any(_final_hits(a, b, targets, axis=0), axis=0))
    return found
