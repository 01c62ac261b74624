"""verify_tokens (jittable, on token ids) agrees with verify (text) everywhere."""

import chex
import jax
import numpy as np
import pytest

from jaxapr import traces
from jaxapr.tokenizer import CountdownTokenizer
from tests.traces import mutations

TOK = CountdownTokenizer()
BATCH = 128


def _batches(cases):
    """Groups (text, nums, target) by N and padded length bucket (powers of two)."""
    groups = {}
    for text, nums, target in cases:
        ids = TOK.encode(text)
        bucket = max(64, 1 << int(np.ceil(np.log2(len(ids) + 1))))
        groups.setdefault((len(nums), bucket), []).append((ids, nums, target, text))
    for (n, width), items in sorted(groups.items()):
        for i in range(0, len(items), BATCH):
            chunk = items[i : i + BATCH]
            ids = np.zeros((BATCH, width), np.int32)
            lens = np.zeros(BATCH, np.int32)
            nums = np.ones((BATCH, n), np.int32)
            targets = np.zeros(BATCH, np.int32)
            for k, (row, nm, t, _) in enumerate(chunk):
                ids[k, : len(row)] = row
                lens[k] = len(row)
                nums[k] = nm
                targets[k] = t
            yield chunk, ids, lens, nums, targets


def _check_agreement(cases):
    fn = jax.jit(traces.verify_tokens)
    mismatches, count, solved = [], 0, 0
    for chunk, ids, lens, nums, targets in _batches(cases):
        got = np.asarray(fn(ids, lens, nums, targets))
        for k, (_, nm, t, text) in enumerate(chunk):
            want = traces.verify(text, nm, t).success
            count += 1
            solved += want
            if bool(got[k]) != want:
                mismatches.append((text[-300:], nm, t, want))
    assert not mismatches, f"{len(mismatches)} of {count} disagree, e.g. {mismatches[0]}"
    return count, solved


def clean_cases():
    """Every fixture trace: SoS+ traces, APR roots' final calls, children's final calls (against
    the child's own state, and against the root's numbers, where they must fail)."""
    cases = []
    for row in mutations.load_rows():
        cases.append((row["sosp"]["trace"], row["nums"], row["target"]))
        tree = traces.CallTree.from_dict(row["apr"]["tree"])
        cases.append((tree.final_text, row["nums"], row["target"]))
        for children in tree.sub_calls:
            for child in children:
                lines = child.main_calls[0].split("\n")
                state = [int(x) for x in lines[1].split(":[")[1].split("]")[0].split(", ")]
                cases.append((child.final_text, state, row["target"]))
                cases.append((child.final_text, row["nums"], row["target"]))
    return cases


def test_agrees_with_verify_on_every_fixture_trace():
    count, solved = _check_agreement(clean_cases())
    assert count > 1000 and 0 < solved < count


@pytest.mark.slow
def test_agrees_with_verify_on_5000_mutations():
    cases = [(text, nums, target) for text, nums, target, _ in mutations.mutated_traces(1, 5000)]
    count, solved = _check_agreement(cases)
    assert count == 5000 and 0 < solved < count


HAND = [
    # (text, nums, target, solved)
    (
        "5,5 equal: Goal Reached\nExploring Operation: 2+3=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached",
        [2, 3],
        5,
        True,
    ),
    (
        "x Goal Reached\nExploring Operation: 3+2=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached\n\nExit Sub Search at level 12\n",
        [2, 3],
        5,
        True,
    ),
    ("Goal Reached\nExploring Operation: 2-3=1, Resulting Numbers: [1]\n1,1 equal: Goal Reached", [2, 3], 1, False),
    ("Goal Reached\nExploring Operation: 3-2=1, Resulting Numbers: [1]\n1,1 equal: Goal Reached", [2, 3], 1, True),
    ("Goal Reached\nExploring Operation: 3+3=6, Resulting Numbers: [6]\n6,6 equal: Goal Reached", [3, 1], 6, False),
    ("Goal Reached\nExploring Operation: 6/4=1, Resulting Numbers: [1]\n1,1 equal: Goal Reached", [6, 4], 1, False),
    ("Goal Reached\nExploring Operation: 03+2=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached", [3, 2], 5, False),
    (
        "Goal Reached\nExploring Operation: 3+2=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached\nmore",
        [3, 2],
        5,
        False,
    ),
    (
        "Goal Reached\nExploring Operation: 3+2=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached\nExit Sub Search at level 01",
        [3, 2],
        5,
        False,
    ),
    (
        "Goal Reached\nCurrent State: whatever Goal\nExploring Operation: 3+2=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached",
        [3, 2],
        5,
        True,
    ),
    (
        "Goal Reached\nExploring Operation: 99999999999+2=5, Resulting Numbers: [5]\n5,5 equal: Goal Reached",
        [3, 2],
        5,
        False,
    ),
    (
        "Goal Reached\nExploring Operation: 65536*65536=0, Resulting Numbers: [0]\n0,0 equal: Goal Reached",
        [65536, 65536],
        0,
        False,
    ),
    ("Goal Reached\nExploring Operation: 7*0=0, Resulting Numbers: [0]\n0,0 equal: Goal Reached", [7, 0], 0, True),
    ("Goal Reached Goal Reached\n", [1], 1, False),
    ("", [1, 2], 3, False),
]


def test_hand_made_cases_and_specials_are_ignored():
    for text, nums, target, solved in HAND:
        assert traces.verify(text, nums, target).success == solved, text
    _check_agreement([(t, n, g) for t, n, g, _ in HAND if len(n) == 2])
    # bos/eos/pad anywhere are ignored, as decode ignores them.
    text, nums, target, _ = HAND[0]
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    ids = np.insert(ids, 5, TOK.pad_id)
    padded = np.concatenate([ids, np.full(7, 17, np.int32)])  # junk past the length
    got = traces.verify_tokens(padded[None], np.array([len(ids)]), np.array([nums]), np.array([target]))
    assert bool(got[0])


def test_jit_vmap_no_retrace_and_bad_shapes():
    text, nums, target, _ = HAND[0]
    ids, lens = TOK.encode_batch([text] * 4, max_len=64)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(ids, lens, nums, targets):
        return traces.verify_tokens(ids, lens, nums, targets)

    nums4 = np.array([nums] * 4, np.int32)
    for t in range(3):
        out = fn(ids, lens, nums4, np.array([target, target + t, target, 0], np.int32))
    assert out.tolist() == [True, False, True, False]
    eager = traces.verify_tokens(ids, lens, nums4, np.array([target] * 4))
    assert eager.tolist() == [True] * 4
    chex.clear_trace_counter()
    # Sequences shorter than the 12-token spelled "Goal Reached" pattern work too.
    short = traces.verify_tokens(np.zeros((2, 3), np.int32), np.array([3, 0]), np.ones((2, 2), np.int32), np.ones(2))
    assert short.tolist() == [False, False]
    with pytest.raises(ValueError, match="expected int32\\[B, L\\]"):
        traces.verify_tokens(ids[0], lens, nums4, np.zeros(4))
    with pytest.raises(ValueError, match="expected int32\\[B, N\\]"):
        traces.verify_tokens(ids, lens, nums4[:2], np.zeros(4))
