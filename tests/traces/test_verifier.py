"""traces.verify: fixture conformance, >= 5,000 mutated traces, hand-written rule cases, fuzzing."""

import collections
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.countdown.rules import OP_SYMBOLS, apply_op
from jaxapr import traces
from jaxapr.traces import Verdict, verify
from tests.traces import mutations


def _child_state(text):
    m = re.match(r"Moving to Node #\S+\nCurrent State: (\d+):\[([^\]]*)\]", text)
    return [int(x) for x in m.group(2).split(", ")]


# --------------------------------------------------------------------------------------
# Conformance on the fixtures
# --------------------------------------------------------------------------------------
def test_fixture_verdicts_match_whether_the_reference_reached_the_goal(fixture_rows):
    """Expected verdict read off the text (ends with a goal line, Exit lines aside); every
    trace that did not reach the goal ends with 'No solution found.'."""
    reached = collections.Counter()
    for row in fixture_rows:
        for kind, text in (("sosp", row["sosp"]["trace"]), ("apr", row["apr"]["tree"]["main_calls"][-1])):
            expected = mutations.reached_goal(text)
            if not expected:
                assert text.rstrip("\n").endswith("No solution found."), row["id"]
            v = verify(text, row["nums"], row["target"])
            assert v.success == expected, (row["id"], kind, v.reason)
            assert bool(v) == expected
            reached[kind] += expected
    # All 200 problems are solvable, yet the heuristic searches do not always reach the goal.
    assert all(row["num_solutions"] > 0 for row in fixture_rows)
    assert reached == {"sosp": 119, "apr": 154}, reached


def test_children_verify_against_their_own_state_not_the_roots(fixture_rows):
    counts = collections.Counter()
    for row in fixture_rows:
        for children in row["apr"]["tree"]["sub_calls"]:
            for child in children:
                text = child["main_calls"][-1]
                expected = mutations.reached_goal(text)
                assert verify(text, _child_state(text), row["target"]).success == expected
                assert not verify(text, row["nums"], row["target"]).success
                counts[expected] += 1
    assert counts[True] > 100 and counts[False] > 100, counts


# --------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------
def test_mutated_traces_get_the_verdict_the_rule_demands(fixture_rows):
    cases = mutations.mutated_traces_with_kinds(seed=0, count=6000)
    assert len(cases) == 6000
    wrong = []
    for kind, text, nums, target, expected in cases:
        v = verify(text, nums, target)
        assert isinstance(v, Verdict) and isinstance(v.reason, str) and v.reason
        assert not v.reason.startswith("internal error"), (kind, v.reason)
        if v.success != expected:
            wrong.append((kind, expected, v.reason))
    assert not wrong, f"{len(wrong)} wrong verdicts, e.g. {wrong[:5]}"
    by_kind = collections.Counter((k, e) for k, _, _, _, e in cases)
    assert {k for k, _ in by_kind} == set(mutations.KINDS)
    assert sum(n for (_, e), n in by_kind.items() if e) > 1000  # both verdicts well represented
    assert sum(n for (_, e), n in by_kind.items() if not e) > 3000


def test_mutations_are_deterministic_and_public_shape(fixture_rows):
    a = mutations.mutated_traces(seed=7, count=300)
    assert a == mutations.mutated_traces(seed=7, count=300)
    assert a != mutations.mutated_traces(seed=8, count=300)
    text, nums, target, expected = a[0]
    assert isinstance(text, str) and isinstance(nums, list) and isinstance(target, int) and isinstance(expected, bool)


def test_mutation_suite_catches_a_checker_that_ignores_reuse(fixture_rows):
    """The suite can fail: a replay that skips operands absent from the multiset (blind to a
    number used twice, like the original SoS+ checker) accepts every reuse_last trace."""

    def lax(text, nums, target):
        lines = text.split("\n")
        goals = [k for k, line in enumerate(lines) if "Goal Reached" in line]
        state = list(nums)
        for line in lines[goals[-2] + 1 : goals[-1]]:
            m = re.fullmatch(r"Exploring Operation: (\d+)([-+*/])(\d+)=(\d+), Resulting Numbers: \[(.*)\]", line)
            if m:
                x, y, z = int(m.group(1)), int(m.group(3)), int(m.group(4))
                if apply_op(x, y, OP_SYMBOLS.index(m.group(2)), None) != z:
                    return False
                for v in (x, y):
                    if v in state:
                        state.remove(v)
                state.append(z)
                if sorted(state) != sorted(int(v) for v in m.group(5).split(", ")):
                    return False
        return state == [target] and lines[goals[-1]] == f"{target},{target} equal: Goal Reached"

    cases = [c for c in mutations.mutated_traces_with_kinds(seed=1, count=3000) if c[0] == "reuse_last"]
    assert len(cases) > 50
    for _kind, text, nums, target, expected in cases:
        assert lax(text, nums, target) and not expected
        v = verify(text, nums, target)
        assert not v.success and ("used twice" in v.reason or "is not available" in v.reason), v.reason


# --------------------------------------------------------------------------------------
# The rule, case by case
# --------------------------------------------------------------------------------------
HEAD = "Goal Reached\n"  # any line containing "Goal Reached" opens the path that follows


def path(*ops, target):
    return HEAD + "".join(op + "\n" for op in ops) + f"{target},{target} equal: Goal Reached\n"


def test_a_valid_path_passes():
    text = path(
        "Exploring Operation: 53-26=27, Resulting Numbers: [22, 31, 27]",
        "Exploring Operation: 31-22=9, Resulting Numbers: [27, 9]",
        "Exploring Operation: 27/9=3, Resulting Numbers: [3]",
        target=3,
    )
    assert verify(text, [22, 26, 31, 53], 3) == (True, "solved")
    assert verify(text, np.array([53, 31, 26, 22]), np.int32(3)).success  # numpy ints, any order


@pytest.mark.parametrize(
    "ops, nums, target, reason",
    [
        (["Exploring Operation: 4+4=8, Resulting Numbers: [8]"], [4, 7], 8, "4 used twice"),
        (["Exploring Operation: 4+4=8, Resulting Numbers: [7, 8]"], [4, 7], 8, "4 used twice"),
        (
            [
                "Exploring Operation: 2+3=5, Resulting Numbers: [5, 5]",
                "Exploring Operation: 5*2=10, Resulting Numbers: [5, 10]",
            ],
            [2, 3, 5],
            10,
            "2 is not available",
        ),
        (["Exploring Operation: 9+1=10, Resulting Numbers: [10]"], [2, 9], 10, "1 is not available"),
        (["Exploring Operation: 3-5=2, Resulting Numbers: [2]"], [3, 5], 2, "needs x >= y"),
        (["Exploring Operation: 3/6=2, Resulting Numbers: [2]"], [3, 6], 2, "needs x >= y"),
        (["Exploring Operation: 7/2=3, Resulting Numbers: [3]"], [2, 7], 3, "not an exact division"),
        (["Exploring Operation: 7/0=0, Resulting Numbers: [0]"], [0, 7], 0, "not an exact division"),
        (["Exploring Operation: 7+2=10, Resulting Numbers: [10]"], [2, 7], 10, "7+2 is 9, not 10"),
        (["Exploring Operation: 7+2=9, Resulting Numbers: [8]"], [2, 7], 9, "resulting numbers should be [9]"),
        (
            ["Exploring Operation: 7+2=9, Resulting Numbers: [1, 9]"],
            [1, 2, 7],
            9,
            "goal claimed with numbers [1, 9] left",
        ),
        (["Exploring Operation: 07+2=9, Resulting Numbers: [9]"], [2, 7], 9, "malformed operation"),
        (["Exploring Operation: 7+2=9, Resulting Numbers: [+9]"], [2, 7], 9, "malformed operation"),
        (["Exploring Operation: 7+2=9, Resulting Numbers: [9 ]"], [2, 7], 9, "malformed operation"),
        (["Exploring Operation: 7+2=9,  Resulting Numbers: [9]"], [2, 7], 9, "malformed operation"),
        (["Exploring Operation: 7+2=\u0669, Resulting Numbers: [9]"], [2, 7], 9, "malformed operation"),
        (["7+2=9"], [2, 7], 9, "unexpected line in the path"),
        (
            ["Exit Sub Search at level 1", "Exploring Operation: 7+2=9, Resulting Numbers: [9]"],
            [2, 7],
            9,
            "unexpected line",
        ),
        (["Exploring Operation: 7+2=9, Resulting Numbers: [9]", " "], [2, 7], 9, "unexpected line"),  # blank = empty
    ],
)
def test_invalid_paths_fail_with_a_specific_reason(ops, nums, target, reason):
    v = verify(path(*ops, target=target), nums, target)
    assert not v.success and reason in v.reason, v.reason
    assert "\n" not in v.reason and len(v.reason) < 120


def test_goal_line_must_name_the_target():
    v = verify(path("Exploring Operation: 7+2=9, Resulting Numbers: [9]", target=9), [2, 7], 8)
    assert not v.success and "goal line names 9,9, target is 8" in v.reason
    v = verify(HEAD + "Exploring Operation: 7+2=9, Resulting Numbers: [9]\n9,8 equal: Goal Reached\n", [2, 7], 9)
    assert not v.success and "goal line names 9,8" in v.reason


def test_either_order_for_add_and_mul_and_zero():
    assert verify(path("Exploring Operation: 2+7=9, Resulting Numbers: [9]", target=9), [7, 2], 9).success
    assert verify(path("Exploring Operation: 2*7=14, Resulting Numbers: [14]", target=14), [7, 2], 14).success
    assert verify(
        path(
            "Exploring Operation: 7-7=0, Resulting Numbers: [5, 0]",
            "Exploring Operation: 5*0=0, Resulting Numbers: [0]",
            target=0,
        ),
        [7, 7, 5],
        0,
    ).success
    assert verify(path("Exploring Operation: 0/7=0, Resulting Numbers: [0]", target=0), [0, 7], 0).reason.endswith(
        "needs x >= y"
    )


def test_unchecked_lines_blank_lines_and_exits():
    text = (
        HEAD + "Moving to Node #anything\nCurrent State: whatever\n\nGenerated Node #0: x\n"
        "Exploring Operation: 7+2=9, Resulting Numbers: [9]\n\n9,9 equal: Goal Reached\n\nExit Sub Search at level 2\nExit Sub Search at level 1"
    )
    assert verify(text, [2, 7], 9).success
    assert not verify(text + "\nNo solution found.", [2, 7], 9).success
    assert not verify(text.replace("level 1", "level 01"), [2, 7], 9).success
    assert verify(
        text.replace("Goal Reached\n", "<Goal Reached in Sub Search 0 at level 1 at Node #0>\n", 1), [2, 7], 9
    ).success


@pytest.mark.parametrize(
    "line, ok",
    [
        ("Generated Node #0,0: garbage", True),
        ("Generated Node #", True),
        ("Current State: ???", True),
        ("Moving to Node #", True),
        ("Generated Node 0,0: 9:[9] Operation: 7+2=9", False),
        ("Generated Nod #0", False),
        ("Current State 9:[9]", False),
        ("Moving to Node 0,1", False),
        ("generated node #0", False),
    ],
)
def test_unchecked_prefixes_exactly_as_the_spec_says(line, ok):
    """docs/trace_format.md: only the exact prefixes are unchecked; a garbled prefix fails, in
    both verifiers."""
    from jaxapr import traces
    from jaxapr.tokenizer import CountdownTokenizer

    text = path(line, "Exploring Operation: 7+2=9, Resulting Numbers: [9]", target=9)
    assert verify(text, [2, 7], 9).success is ok
    ids = CountdownTokenizer().encode(text)
    assert bool(traces.verify_tokens(ids[None], np.array([len(ids)]), np.array([[2, 7]]), np.array([9]))[0]) is ok


def test_only_the_last_two_goal_lines_matter():
    ok = path("Exploring Operation: 7+2=9, Resulting Numbers: [9]", target=9)
    assert verify("garbage \x00 Goal Reached\n" + "1,1 equal: Goal Reached\n" + ok, [2, 7], 9).success
    assert not verify(ok + "Goal Reached\n", [2, 7], 9).success
    assert verify("9,9 equal: Goal Reached\n9,9 equal: Goal Reached", [9], 9).success  # nothing to do


def test_huge_numbers_follow_the_rules_bound_and_never_crash():
    # As everywhere in the rules (envs/countdown/rules.py), a result above 2**31 - 1 is an
    # illegal move; below it arithmetic is exact. (verify_tokens relies on this bound.)
    top = 2**31 - 1
    ok = path(f"Exploring Operation: {top - 1}+1={top}, Resulting Numbers: [{top}]", target=top)
    assert verify(ok, [top - 1, 1], top).success
    over = path(f"Exploring Operation: {top}+1={top + 1}, Resulting Numbers: [{top + 1}]", target=top + 1)
    v = verify(over, [top, 1], top + 1)
    assert not v.success and "exceeds 2147483647" in v.reason
    big = 10**400
    text = path(f"Exploring Operation: {big}*{big}={big * big}, Resulting Numbers: [{big * big}]", target=big * big)
    assert not verify(text, [big, big], big * big).success
    huge = "9" * 5000
    v = verify(path(f"Exploring Operation: {huge}+1=2, Resulting Numbers: [2]", target=2), [1, 1], 2)
    assert not v.success and "too long" in v.reason


@pytest.mark.parametrize(
    "text, nums, target",
    [
        ("", [1, 2], 3),
        (None, [1, 2], 3),
        (b"Goal Reached\nGoal Reached", [1], 1),
        (5, [1], 1),
        ("Goal Reached\n3,3 equal: Goal Reached", None, 3),
        ("Goal Reached\n3,3 equal: Goal Reached", [1, "a"], 3),
        ("Goal Reached\n3,3 equal: Goal Reached", [1.5], 3),
        ("Goal Reached\n3,3 equal: Goal Reached", [3], "3"),
        ("Goal Reached", [1], 1),
        ("\n\n\n", [], 0),
    ],
)
def test_bad_input_is_not_solved_and_never_raises(text, nums, target):
    v = verify(text, nums, target)
    assert isinstance(v, Verdict) and not v.success and v.reason and not v.reason.startswith("internal")


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(
            list("0123456789 ,:[]+-*/=\nGoal Reached Exploring Operation Resulting Numbers\x00\u0669")
        ),
        max_size=300,
    ),
    st.lists(st.integers(0, 10**30), max_size=5),
    st.integers(-5, 10**30),
)
def test_fuzz_never_raises(text, nums, target):
    v = verify(text, nums, target)
    assert isinstance(v, Verdict) and isinstance(v.success, bool) and v.reason


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_cut_and_spliced_fixture_traces(data):
    bases = mutations.base_traces()
    text, nums, target, _ok = bases[data.draw(st.integers(0, len(bases) - 1))]
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(i, len(text)))
    junk = data.draw(st.text(max_size=20))
    v = verify(text[:i] + junk + text[j:], list(nums), target)
    assert isinstance(v, Verdict) and not v.reason.startswith("internal")


def test_public_names():
    for name in ("Verdict", "verify", "child_prompts", "child_result", "join", "CallTree", "parse_spawn_block"):
        assert hasattr(traces, name)
