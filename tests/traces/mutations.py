"""Deterministic corrupted traces with the verdict the verification rule demands.

``mutated_traces(seed, count)`` returns ``count`` tuples ``(text, nums, target, expected)``,
built from the fixture traces (SoS+ traces, APR roots' final calls, successful children's
final calls checked against the child's own state). The expected verdict follows from the
kind of mutation and from whether the base trace reached the goal (read off its text: its
last line other than empty and ``Exit Sub Search`` lines is ``T,T equal: Goal Reached``),
never from the verifier. Reusable by a token-level verifier's tests.

Why each kind has the verdict it has (the path = the lines after the second-to-last line
containing ``Goal Reached``; the prefix = the lines before it):
- a path valid but for one reused number (``reuse_last``) -> False; a checker blind to
  reuse accepts it (the other reuse kinds also break later lines).
- wrong result / wrong or dropped list value / reused or unavailable operand / swapped or
  reordered operations / deleted operation / non-canonical number / garbage in an
  Exploring or goal line / huge number in the path: the replay fails -> False. (Reordered
  operations fail because each operation's listed numbers shrink by one per step, so an
  operation moved earlier lists too few numbers.)
- truncation inside the path (before the end of the final ``Goal Reached``): either fewer
  than two goal lines remain or a non-exit line follows the new last goal line -> False.
- wrong target, changed or extra number in ``nums`` -> False; ``nums`` permuted -> unchanged.
- blank lines in the path, edits after the prefix of ``Current State``/``Generated Node``/
  ``Moving to Node`` lines, extra ``Exit`` or empty lines after the goal, any edit of the
  prefix that keeps its ``Goal Reached`` lines -> unchanged.
- anything after the final goal line other than empty/Exit lines -> False.
- edits of a trace with no ``Goal`` in it that cannot create one -> False.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import re

from envs.countdown.rules import OP_SYMBOLS, apply_op, moves

FIXTURES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "data", "apr_reference_traces.jsonl.gz"))
GOAL = "Goal Reached"
_EXPLORE = re.compile(r"Exploring Operation: (\d+)([-+*/])(\d+)=(\d+), Resulting Numbers: \[(.*)\]")
_GOAL_LINE = re.compile(r"(\d+),(\d+) equal: Goal Reached")
_CHILD_STATE = re.compile(r"Moving to Node #\S+\nCurrent State: (\d+):\[([^\]]*)\]")
_UNCHECKED = ("Current State: ", "Generated Node #", "Moving to Node #")
# Never part of a canonical line; no 'G', digits or newlines (cannot make "Goal Reached").
_POISON = ["@", "~", "\x00", "\x1b", "\x7f", "\ufffd", "§", "é", "\t", "$", "?", "!", "\u200b"]
_GARBAGE_ALPHABET = "abcdefhijklmnopqrstuvwxyzABCDEFHIJ !@#$%^&()_{}|;'<>?\t\x00\x01\x7f\u00e9\u4e2d\U0001f600"


def load_rows() -> list[dict]:
    with gzip.open(FIXTURES, "rt") as f:
        return [json.loads(line) for line in f]


def reached_goal(text: str) -> bool:
    """Independent of the verifier: the trace's last line, ignoring empty and Exit lines, is
    ``T,T equal: Goal Reached``."""
    lines = [l for l in text.split("\n") if l and not l.startswith("Exit Sub Search")]
    return bool(lines) and _GOAL_LINE.fullmatch(lines[-1]) is not None


@functools.cache
def base_traces() -> tuple[tuple[str, tuple[int, ...], int, bool], ...]:
    """(text, nums, target, reached_goal) for every fixture SoS+ trace, APR root final call
    and successful child final call (with the child's state numbers)."""
    out = []
    for row in load_rows():
        nums, target = tuple(row["nums"]), row["target"]
        for text in (row["sosp"]["trace"], row["apr"]["tree"]["main_calls"][-1]):
            out.append((text, nums, target, reached_goal(text)))
        for children in row["apr"]["tree"]["sub_calls"]:
            for child in children:
                text = child["main_calls"][-1]
                if reached_goal(text):
                    m = _CHILD_STATE.match(text)
                    out.append((text, tuple(int(x) for x in m.group(2).split(", ")), target, True))
    return tuple(out)


# ---------------------------------------------------------------------------------------
# helpers on a successful base
# ---------------------------------------------------------------------------------------
def _split(text):
    lines = text.split("\n")
    goals = [k for k, line in enumerate(lines) if GOAL in line]
    return lines, goals


def _path_explores(lines, goals):
    return [k for k in range(goals[-2] + 1, goals[-1]) if lines[k].startswith("Exploring Operation: ")]


def _explore_line(x, sym, y, z, listed):
    return f"Exploring Operation: {x}{sym}{y}={z}, Resulting Numbers: [{', '.join(map(str, listed))}]"


def _other_value(rng, v):
    w = v + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return w if w >= 0 and w != v else v + 1


def _join(lines):
    return "\n".join(lines)


def _canonical_numbers(line):
    return list(re.finditer(r"\d+", line))


# Each mutation takes (rng, text, nums, target, ok) and returns
# (text, nums, target, expected) or None when it does not apply to this base.
def m_wrong_result(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = rng.choice(_path_explores(lines, goals))
    x, s, y, z, lst = _EXPLORE.fullmatch(lines[k]).groups()
    lines[k] = f"Exploring Operation: {x}{s}{y}={_other_value(rng, int(z))}, Resulting Numbers: [{lst}]"
    return _join(lines), nums, target, False


def m_wrong_list_value(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = rng.choice(_path_explores(lines, goals))
    x, s, y, z, lst = _EXPLORE.fullmatch(lines[k]).groups()
    vals = [int(v) for v in lst.split(", ")]
    i = rng.randrange(len(vals))
    vals[i] = _other_value(rng, vals[i])
    lines[k] = _explore_line(x, s, y, z, vals)
    return _join(lines), nums, target, False


def m_drop_list_value(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = rng.choice(_path_explores(lines, goals))
    x, s, y, z, lst = _EXPLORE.fullmatch(lines[k]).groups()
    vals = lst.split(", ")
    vals.pop(rng.randrange(len(vals)))
    lines[k] = f"Exploring Operation: {x}{s}{y}={z}, Resulting Numbers: [{', '.join(vals)}]"
    return _join(lines), nums, target, False


def m_reorder_list(rng, text, nums, target, ok):
    """Listed numbers are a multiset: any order is fine."""
    lines, goals = _split(text)
    k = rng.choice(_path_explores(lines, goals))
    x, s, y, z, lst = _EXPLORE.fullmatch(lines[k]).groups()
    vals = lst.split(", ")
    rng.shuffle(vals)
    lines[k] = f"Exploring Operation: {x}{s}{y}={z}, Resulting Numbers: [{', '.join(vals)}]"
    return _join(lines), nums, target, ok


def m_reuse_number(rng, text, nums, target, ok):
    """First path operation x+x with x present once in nums; the list is what a checker that
    ignores reuse would expect (nums - x + 2x)."""
    lines, goals = _split(text)
    k = _path_explores(lines, goals)[0]
    singles = [v for v in nums if nums.count(v) == 1]
    if not singles:
        return None
    x = rng.choice(singles)
    rest = list(nums)
    rest.remove(x)
    lines[k] = _explore_line(x, "+", x, 2 * x, rest + [2 * x])
    return _join(lines), nums, target, False


def m_reuse_consumed(rng, text, nums, target, ok):
    """Second path operation uses an operand the first one consumed; everything else consistent."""
    lines, goals = _split(text)
    ks = _path_explores(lines, goals)
    if len(ks) < 2:
        return None
    x1, _, y1, _, lst = _EXPLORE.fullmatch(lines[ks[0]]).groups()
    after = [int(v) for v in lst.split(", ")]
    gone = [int(v) for v in (x1, y1) if int(v) not in after]
    if not gone:
        return None
    a, b = rng.choice(gone), rng.choice(after)
    rest = list(after)
    rest.remove(b)
    lines[ks[1]] = _explore_line(a, "+", b, a + b, rest + [a + b])
    return _join(lines), nums, target, False


@functools.cache
def _reuse_cheats(nums: tuple[int, ...], target: int) -> tuple[tuple[str, ...], ...]:
    """Paths whose only fault is a reused number: len(nums) - 1 legal moves down to [p],
    then ``p<op>c = target`` where c was consumed earlier or is p itself (present once).
    Each listed multiset is what a checker that skips absent operands would compute, so a
    reuse-blind checker accepts these paths. Only for up to 3 numbers (cheap to enumerate)."""
    if len(nums) > 3:
        return ()
    out = []

    def walk(state, consumed, lines):
        if len(state) > 1:
            for mv in moves(state):
                line = _explore_line(*re.fullmatch(r"(\d+)(.)(\d+)=(\d+)", mv.text).groups(), mv.numbers)
                used = [state[mv.i], state[mv.j]]
                walk(mv.numbers, consumed + used, lines + [line])
            return
        (p,) = state
        for c in sorted(set(consumed + [p])):
            for op, sym in enumerate(OP_SYMBOLS):
                x, y = (p, c) if op < 2 or p >= c else (c, p)
                if apply_op(x, y, op, max_value=None) == target and p != target:
                    out.append(tuple(lines + [_explore_line(x, sym, y, target, [target])]))

    walk(list(nums), [], [])
    return tuple(out)


def m_reuse_last(rng, text, nums, target, ok):
    """The restated path replaced by a path that is valid except for one reused number."""
    cheats = _reuse_cheats(tuple(nums), target)
    if not cheats:
        return None
    lines, goals = _split(text)
    body = list(rng.choice(cheats)) + [f"{target},{target} equal: Goal Reached", ""]
    return _join(lines[: goals[-2] + 1] + body), nums, target, False


def m_missing_operand(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = _path_explores(lines, goals)[0]
    y = rng.choice(nums)
    x = max(nums) + rng.randint(1, 50)
    rest = list(nums)
    rest.remove(y)
    lines[k] = _explore_line(x, "+", y, x + y, rest + [x + y])
    return _join(lines), nums, target, False


def m_delete_operation(rng, text, nums, target, ok):
    lines, goals = _split(text)
    del lines[rng.choice(_path_explores(lines, goals))]
    return _join(lines), nums, target, False


def m_swap_operations(rng, text, nums, target, ok):
    lines, goals = _split(text)
    ks = _path_explores(lines, goals) + [goals[-1]]
    i, j = sorted(rng.sample(range(len(ks)), 2))
    a, b = ks[i], ks[j]
    lines[a], lines[b] = lines[b], lines[a]
    return _join(lines), nums, target, False


def m_shuffle_path(rng, text, nums, target, ok):
    """Shuffle the path's lines before the goal: fails iff the operations' order changed."""
    lines, goals = _split(text)
    ks = list(range(goals[-2] + 1, goals[-1]))
    before = [lines[k] for k in ks if lines[k].startswith("Exploring")]
    block = [lines[k] for k in ks]
    rng.shuffle(block)
    for k, line in zip(ks, block):
        lines[k] = line
    after = [lines[k] for k in ks if lines[k].startswith("Exploring")]
    return _join(lines), nums, target, ok and before == after


def m_truncate_path(rng, text, nums, target, ok):
    lines, goals = _split(text)
    path_start = sum(len(l) + 1 for l in lines[: goals[-2] + 1])
    end = text.rfind(GOAL) + len(GOAL) - 1
    return text[: rng.randrange(path_start + 1, end + 1)], nums, target, False


def m_garbage_in_path(rng, text, nums, target, ok):
    """Poisoned text inserted into a path line: only the unchecked part of Current State /
    Generated Node / Moving to Node lines may take it."""
    lines, goals = _split(text)
    k = rng.choice([k for k in range(goals[-2] + 1, goals[-1] + 1) if lines[k]])
    line = lines[k]
    pos = rng.randrange(len(line) + 1)
    junk = rng.choice(_POISON) + "".join(rng.choice(_GARBAGE_ALPHABET) for _ in range(rng.randrange(4)))
    lines[k] = line[:pos] + junk + line[pos:]
    unchecked = any(line.startswith(p) and pos >= len(p) for p in _UNCHECKED)
    return _join(lines), nums, target, ok and unchecked


def m_garbage_line_in_path(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = rng.randrange(goals[-2] + 1, goals[-1] + 1)
    junk = rng.choice(_POISON) + "".join(rng.choice(_GARBAGE_ALPHABET) for _ in range(rng.randrange(1, 40)))
    lines.insert(k, junk)
    return _join(lines), nums, target, False


def m_huge_number(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = rng.choice(_path_explores(lines, goals) + [goals[-1]])
    spans = _canonical_numbers(lines[k])
    sp = rng.choice(spans)
    huge = rng.choice([str(10**400), str(2**64 + 1), str(10**20), str(2**31), "1" + "0" * 4999 + "7"])
    if k == goals[-1]:  # "T,T equal": both numbers must name the target
        lines[k] = f"{huge},{huge} equal: Goal Reached"
    else:
        lines[k] = lines[k][: sp.start()] + huge + lines[k][sp.end() :]
    return _join(lines), nums, target, False


def m_noncanonical(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = rng.choice(_path_explores(lines, goals) + [goals[-1]])
    sp = rng.choice(_canonical_numbers(lines[k]))
    v = sp.group()
    form = rng.choice(
        [
            "0" + v,
            "+" + v,
            "00" + v,
            v + ".0",
            " " + v,
            v + " ",
            "-" + v if v == "0" else "0" + v,
            "".join(chr(0x660 + int(c)) for c in v),
            "".join(chr(0xFF10 + int(c)) for c in v),
        ]
    )
    lines[k] = lines[k][: sp.start()] + form + lines[k][sp.end() :]
    return _join(lines), nums, target, False


def m_spacing(rng, text, nums, target, ok):
    lines, goals = _split(text)
    k = rng.choice(_path_explores(lines, goals) + [goals[-1]])
    spaces = [m.start() for m in re.finditer(" ", lines[k])]
    i = rng.choice(spaces)
    lines[k] = lines[k][:i] + rng.choice(["  ", "", "\t"]) + lines[k][i + 1 :]
    return _join(lines), nums, target, False


def m_wrong_target(rng, text, nums, target, ok):
    return text, nums, _other_value(rng, target), False


def m_wrong_nums(rng, text, nums, target, ok):
    nums = list(nums)
    i = rng.randrange(len(nums))
    nums[i] = _other_value(rng, nums[i])
    return text, tuple(nums), target, False


def m_extra_num(rng, text, nums, target, ok):
    return text, tuple(nums) + (rng.randint(0, 99),), target, False


def m_permute_nums(rng, text, nums, target, ok):
    nums = list(nums)
    rng.shuffle(nums)
    return text, tuple(nums), target, ok


def m_blank_lines_in_path(rng, text, nums, target, ok):
    lines, goals = _split(text)
    for _ in range(rng.randint(1, 3)):
        lines.insert(rng.randrange(goals[-2] + 1, goals[-1] + 1), "")
    return _join(lines), nums, target, ok


def m_edit_unchecked_in_path(rng, text, nums, target, ok):
    lines, goals = _split(text)
    ks = [k for k in range(goals[-2] + 1, goals[-1]) if lines[k].startswith(_UNCHECKED)]
    k = rng.choice(ks)
    p = next(p for p in _UNCHECKED if lines[k].startswith(p))
    lines[k] = p + rng.choice(["", "#9,9,9", "junk", lines[k][len(p) :][::-1].replace("Goal", "")])
    return _join(lines), nums, target, ok


def m_exit_in_path(rng, text, nums, target, ok):
    lines, goals = _split(text)
    lines.insert(rng.randrange(goals[-2] + 1, goals[-1] + 1), "Exit Sub Search at level 1")
    return _join(lines), nums, target, False


def m_after_goal_allowed(rng, text, nums, target, ok):
    extra = rng.choice(
        ["\n", "Exit Sub Search at level 1\n", "Exit Sub Search at level 3\n\n", "\n\nExit Sub Search at level 12\n"]
    )
    return text + extra, nums, target, ok


def m_after_goal_junk(rng, text, nums, target, ok):
    extra = rng.choice(
        [
            "No solution found.\n",
            "Exit Sub Search at level 01\n",
            "Exit Sub Search at level 1 \n",
            "Moving to Node #0\n",
            "x",
            "<End Sub Searches>\n",
            "Exploring Operation: 1+1=2, Resulting Numbers: [2]\n",
        ]
    )
    return text + extra, nums, target, False


def m_prefix_edit(rng, text, nums, target, ok):
    """Any edit before the second-to-last goal line that keeps its Goal Reached lines."""
    lines, goals = _split(text)
    ks = [k for k in range(goals[-2]) if "Goal" not in lines[k]]
    if not ks:
        return None
    k = rng.choice(ks)
    how = rng.randrange(4)
    if how == 0:
        del lines[k]
    elif how == 1:
        lines.insert(k, lines[k])
    elif how == 2:
        pos = rng.randrange(len(lines[k]) + 1)
        junk = "".join(rng.choice(_GARBAGE_ALPHABET) for _ in range(rng.randint(1, 20)))
        lines[k] = lines[k][:pos] + junk + lines[k][pos:]
    else:
        lines[k] = re.sub(r"\d+", lambda m: str(_other_value(rng, int(m.group()))), lines[k])
    return _join(lines), nums, target, ok


def m_failed_edit(rng, text, nums, target, ok):
    """Edits of a trace with no 'Goal' in it (cannot create 'Goal Reached')."""
    if "Goal" in text:
        return None
    how = rng.randrange(3)
    if how == 0:
        return text[: rng.randrange(len(text) + 1)], nums, target, False
    lines = text.split("\n")
    k = rng.randrange(len(lines))
    if how == 1:
        lines[k] = re.sub(r"\d+", lambda m: str(_other_value(rng, int(m.group()))), lines[k])
    else:
        pos = rng.randrange(len(lines[k]) + 1)
        lines[k] = (
            lines[k][:pos] + "".join(rng.choice(_GARBAGE_ALPHABET) for _ in range(rng.randint(1, 20))) + lines[k][pos:]
        )
    return _join(lines), nums, target, False


def m_random_garbage(rng, text, nums, target, ok):
    n = rng.choice([0, 1, 5, 50, 500])
    return "".join(rng.choice(_GARBAGE_ALPHABET + "\n0123456789") for _ in range(n)), nums, target, False


ON_SOLVED = [
    m_wrong_result,
    m_wrong_list_value,
    m_drop_list_value,
    m_reorder_list,
    m_reuse_number,
    m_reuse_consumed,
    m_reuse_last,
    m_missing_operand,
    m_delete_operation,
    m_swap_operations,
    m_shuffle_path,
    m_truncate_path,
    m_garbage_in_path,
    m_garbage_line_in_path,
    m_huge_number,
    m_noncanonical,
    m_spacing,
    m_wrong_target,
    m_wrong_nums,
    m_extra_num,
    m_blank_lines_in_path,
    m_edit_unchecked_in_path,
    m_exit_in_path,
    m_after_goal_allowed,
    m_after_goal_junk,
    m_prefix_edit,
]
ON_ANY = [m_permute_nums, m_failed_edit, m_random_garbage]
KINDS = {f.__name__[2:]: f for f in ON_SOLVED + ON_ANY}


def mutated_traces_with_kinds(seed: int, count: int) -> list[tuple[str, str, list[int], int, bool]]:
    """(kind, text, nums, target, expected), ``count`` of them, the same for the same seed."""
    rng = random.Random(seed)
    bases = base_traces()
    solved = [b for b in bases if b[3]]
    kinds = list(KINDS.items())
    out = []
    while len(out) < count:
        name, fn = kinds[len(out) % len(kinds)]
        pool = solved if fn in ON_SOLVED else bases
        for _ in range(100):
            text, nums, target, ok = rng.choice(pool)
            got = fn(rng, text, nums, target, ok)
            if got is not None:
                text, nums, target, expected = got
                out.append((name, text, list(nums), target, expected))
                break
        else:
            raise RuntimeError(f"mutation {name} applies to no base trace")
    return out


def mutated_traces(seed: int, count: int) -> list[tuple[str, list[int], int, bool]]:
    """(mutated text, nums, target, expected verdict), ``count`` of them, deterministic in seed."""
    return [t[1:] for t in mutated_traces_with_kinds(seed, count)]
