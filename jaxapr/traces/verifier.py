"""The Countdown trace verifier: does a trace solve (nums, target)? (docs/trace_format.md, "Verification")

The rule, as implemented here:

1. The trace needs at least two lines containing ``Goal Reached`` (the join's
   ``<Goal Reached in Sub Search ...>`` lines count). The lines after the second-to-last
   such line are the *restated path*; everything before it is never looked at.
2. The path replays from the multiset ``nums``. In it may stand only
   - empty lines,
   - ``Current State: ...``, ``Generated Node #...``, ``Moving to Node #...`` lines (their
     content after that prefix is not checked),
   - ``Exploring Operation: x<op>y=z, Resulting Numbers: [a, b, ...]`` lines, where x and y
     are in the current multiset (a number present once cannot be used twice), z is the true
     result (``x-y`` and ``x/y`` need x >= y, ``x/y`` needs y != 0 and an exact quotient,
     ``+`` and ``*`` may be written in either order; as everywhere in the Countdown rules,
     a result above ``MAX_VALUE`` = 2**31 - 1 is an illegal move), and the
     listed numbers equal the new multiset (order free: it is a multiset),
   - and, last, the final goal line ``T,T equal: Goal Reached``, valid only when the
     multiset is exactly ``[T]``.
3. After the goal line only empty lines and ``Exit Sub Search at level L`` lines may follow.

``Exploring``, goal and ``Exit`` lines must match their format exactly: numbers in canonical
decimal ASCII (no sign, no leading zeros, ``0`` allowed), lists as Python prints them,
single spaces. A line is the text between ``\\n`` characters; a blank line is an empty one.

Starting multiset. The path is always replayed from ``nums``, never from a ``Current State``
line (those are not checked, so trusting them would let a trace claim any start). A root
trace restates its path from ``Moving to Node #0`` (every fixture does), so the root's final
call is checked with ``verify(text, nums, target)``. A child's restated path starts at its
own node (e.g. ``Moving to Node #0,3,2`` / ``Current State: 68:[8, 60], ...``), so a child's
final call is checked against the child's own state:
``verify(child_text, [8, 60], 68)``; checked against the root's ``nums`` it fails (its
first operation's list has one number too few). Both are tested on the fixtures.

``verify`` never raises: any input (non-str text, garbage, truncation, huge numbers, bad
``nums``) gives ``Verdict(False, reason)`` with a short reason such as
``"line 7: 31 used twice"``. Numbers too long for Python's int() (over ~4300 digits) are
rejected as "too long"; other sizes are checked exactly.
"""

from __future__ import annotations

import operator
import re
from typing import NamedTuple

from envs.countdown.rules import MAX_VALUE, OP_SYMBOLS, apply_op

GOAL = "Goal Reached"
_NUM = r"(?:0|[1-9][0-9]*)"
_EXPLORE_RE = re.compile(
    rf"Exploring Operation: ({_NUM})([-+*/])({_NUM})=({_NUM}), "
    rf"Resulting Numbers: \[((?:{_NUM}(?:, {_NUM})*)?)\]"
)
_GOAL_RE = re.compile(rf"({_NUM}),({_NUM}) equal: Goal Reached")
_EXIT_RE = re.compile(r"Exit Sub Search at level [1-9][0-9]*")
_UNCHECKED_PREFIXES = ("Current State: ", "Generated Node #", "Moving to Node #")
_OP_OF_SYMBOL = {s: k for k, s in enumerate(OP_SYMBOLS)}
_SUB, _DIV = _OP_OF_SYMBOL["-"], _OP_OF_SYMBOL["/"]


class Verdict(NamedTuple):
    """The verifier's answer. ``bool(verdict)`` is ``verdict.success`` (not tuple truthiness)."""

    success: bool
    reason: str

    def __bool__(self) -> bool:
        return bool(self.success)


class _Fail(Exception):
    """Internal: carries a failure reason out of the replay."""


def _short(x) -> str:
    s = str(x)
    return s if len(s) <= 24 else f"{s[:10]}...({len(s)} digits)"


def _int(token: str, lineno: int) -> int:
    try:
        return int(token)
    except ValueError:  # beyond sys.get_int_max_str_digits()
        raise _Fail(f"line {lineno}: number too long ({len(token)} digits)") from None


def goal_line_spans(text: str) -> tuple[int, int] | None:
    """Start offsets of the second-to-last and last lines containing GOAL, or None."""
    last = text.rfind(GOAL)
    if last < 0:
        return None
    last_line = text.rfind("\n", 0, last) + 1
    prev = text.rfind(GOAL, 0, last_line)
    if prev < 0:
        return None
    return text.rfind("\n", 0, prev) + 1, last_line


def _check_problem(nums, target) -> tuple[list[int], int]:
    try:
        target = operator.index(target)
        nums = [operator.index(x) for x in nums]
    except TypeError:
        raise _Fail(
            f"bad problem: nums={nums!r:.60} target={target!r:.30}; expected a list of ints and an int"
        ) from None
    return nums, target


def _replay(text: str, nums: list[int], target: int) -> str:
    spans = goal_line_spans(text)
    if spans is None:
        raise _Fail(f"fewer than two lines containing '{GOAL}'")
    path_start = text.find("\n", spans[0])
    if path_start < 0:  # cannot happen: the last goal line follows
        raise _Fail("no restated path")
    lineno = text.count("\n", 0, path_start) + 1  # number of the line before the path
    state = list(nums)
    done = False
    for line in text[path_start + 1 :].split("\n"):
        lineno += 1
        if not line:
            continue
        if done:
            if _EXIT_RE.fullmatch(line):
                continue
            raise _Fail(f"line {lineno}: unexpected line after the final goal: {line[:40]!r}")
        if GOAL in line:
            m = _GOAL_RE.fullmatch(line)
            if m is None:
                raise _Fail(f"line {lineno}: malformed goal line {line[:40]!r}")
            a, b = _int(m.group(1), lineno), _int(m.group(2), lineno)
            if a != target or b != target:
                raise _Fail(f"line {lineno}: goal line names {_short(a)},{_short(b)}, target is {_short(target)}")
            if state != [target]:
                raise _Fail(f"line {lineno}: goal claimed with numbers {_short(sorted(state))} left")
            done = True
            continue
        if line.startswith(_UNCHECKED_PREFIXES):
            continue
        m = _EXPLORE_RE.fullmatch(line)
        if m is None:
            what = "malformed operation" if line.startswith("Exploring") else "unexpected line in the path"
            raise _Fail(f"line {lineno}: {what}: {line[:40]!r}")
        x, y, z = (_int(m.group(k), lineno) for k in (1, 3, 4))
        op = _OP_OF_SYMBOL[m.group(2)]
        for operand in (x, y) if x != y else (x,):
            if operand not in state:
                raise _Fail(f"line {lineno}: {_short(operand)} is not available")
        state.remove(x)
        if y not in state:
            raise _Fail(f"line {lineno}: {_short(y)} used twice")
        state.remove(y)
        if op in (_SUB, _DIV) and x < y:
            raise _Fail(f"line {lineno}: {_short(x)}{m.group(2)}{_short(y)} needs x >= y")
        result = apply_op(x, y, op)
        if result is None:
            what = "is not an exact division" if op == _DIV else f"exceeds {MAX_VALUE}"
            raise _Fail(f"line {lineno}: {_short(x)}{m.group(2)}{_short(y)} {what}")
        if result != z:
            raise _Fail(f"line {lineno}: {_short(x)}{m.group(2)}{_short(y)} is {_short(result)}, not {_short(z)}")
        state.append(z)
        listed = [_int(t, lineno) for t in m.group(5).split(", ")] if m.group(5) else []
        if sorted(listed) != sorted(state):
            raise _Fail(f"line {lineno}: resulting numbers should be {_short(sorted(state))}")
    if not done:
        raise _Fail("the path does not end with a goal line")
    return "solved"


def verify(text, nums, target) -> Verdict:
    """Whether ``text`` solves (nums, target) under the rule in this module's docstring.

    ``nums`` is the multiset the restated path starts from: the problem's numbers for a root
    trace, the child's own state numbers for a child's final call. Never raises.
    """
    if not isinstance(text, str):
        return Verdict(False, f"text is {type(text).__name__}, expected str")
    try:
        nums, target = _check_problem(nums, target)
        return Verdict(True, _replay(text, nums, target))
    except _Fail as e:
        return Verdict(False, str(e))
    except Exception as e:  # a safety net: the reward must never crash a rollout
        return Verdict(False, f"internal error: {type(e).__name__}")
