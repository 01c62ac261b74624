"""generate_problems and the train/val/test splits."""

import json

import jax
import numpy as np
import pytest

from envs import countdown
from tests import oracle


@pytest.fixture(scope="module")
def paper_problems():
    return jax.tree.map(np.asarray, countdown.generate_problems(jax.random.PRNGKey(0), 20_000))


def test_all_solvable_and_in_range(paper_problems):
    numbers, targets = paper_problems
    assert numbers.shape == (20_000, 4) and targets.shape == (20_000,)
    assert numbers.dtype == np.int32 and targets.dtype == np.int32
    assert numbers.min() >= 1 and numbers.max() <= 99
    assert targets.min() >= 10 and targets.max() <= 100
    counts = np.asarray(jax.jit(jax.vmap(countdown.count_solutions))(numbers, targets))
    assert (counts > 0).all()
    # The oracle agrees on a sample.
    for x, t in zip(numbers[:200].tolist(), targets[:200].tolist()):
        assert oracle.num_solutions(x, t) > 0


def test_covers_the_whole_range(paper_problems):
    numbers, targets = paper_problems
    assert set(np.unique(targets).tolist()) == set(range(10, 101))
    assert set(np.unique(numbers).tolist()) == set(range(1, 100))


def test_same_key_same_problems_and_prefix_stability(paper_problems):
    key = jax.random.PRNGKey(0)
    small = jax.tree.map(np.asarray, countdown.generate_problems(key, 777))
    np.testing.assert_array_equal(small[0], paper_problems[0][:777])
    np.testing.assert_array_equal(small[1], paper_problems[1][:777])
    other = jax.tree.map(np.asarray, countdown.generate_problems(jax.random.PRNGKey(1), 777))
    assert not np.array_equal(other[0], small[0])


def test_same_problems_on_one_and_eight_devices():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (fake) devices")
    key = jax.random.PRNGKey(42)
    one = countdown.generate_problems(key, 3000, num_numbers=3, devices=devices[:1])
    eight = countdown.generate_problems(key, 3000, num_numbers=3, devices=devices[:8])
    two = countdown.generate_problems(key, 3000, num_numbers=3, devices=devices[2:4])
    for other in (eight, two):
        np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(other[0]))
        np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(other[1]))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_other_sizes(n):
    numbers, targets = countdown.generate_problems(
        jax.random.PRNGKey(n), 50, num_numbers=n, min_target=1, max_target=30, max_number=12
    )
    assert numbers.shape == (50, n)
    counts = jax.vmap(countdown.count_solutions)(numbers, targets)
    assert bool((counts > 0).all())


def test_bad_ranges_fail_with_one_line_errors():
    key = jax.random.PRNGKey(0)
    cases = [
        (dict(min_target=50, max_target=10), "min_target=50 is above max_target=10"),
        (dict(max_number=0), "max_number=0 is out of range"),
        (dict(min_target=-1), "min_target=-1 is out of range"),
        (dict(num_numbers=9), "num_numbers=9 is out of range"),
        (dict(max_target=2**31), "max_target=2147483648 is out of range"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            countdown.generate_problems(key, 10, **kwargs)
    with pytest.raises(ValueError, match="num_problems=-3 is out of range"):
        countdown.generate_problems(key, -3)
    with pytest.raises(ValueError, match="no solvable problem"):
        countdown.generate_problems(key, 10, num_numbers=2, min_target=1000, max_target=1000, max_number=3)
    empty = countdown.generate_problems(key, 0)
    assert empty[0].shape == (0, 4)


def test_splits_are_disjoint_and_hold_out_targets(tmp_path):
    splits = countdown.make_splits(
        3,
        {"train": 4000, "val": 300, "test": 300, "test_unseen": 200},
        holdout_target_fraction=0.1,
        heldout_splits=["test_unseen"],
    )
    held = set(splits.heldout_targets)
    assert len(held) == 9  # round(0.1 * 91)
    keys = {}
    for name, (numbers, targets) in splits.splits.items():
        assert len(targets) == {"train": 4000, "val": 300, "test": 300, "test_unseen": 200}[name]
        k = countdown.problem_keys(numbers, targets)
        assert len(set(k)) == len(k), name  # unique within a split
        keys[name] = set(k)
        in_held = np.isin(targets, list(held))
        assert in_held.all() if name == "test_unseen" else not in_held.any()
    names = list(keys)
    for a in names:
        for b in names:
            if a < b:
                assert not keys[a] & keys[b], (a, b)
    # Same seed, same splits.
    again = countdown.make_splits(
        3,
        {"train": 4000, "val": 300, "test": 300, "test_unseen": 200},
        holdout_target_fraction=0.1,
        heldout_splits=["test_unseen"],
    )
    for name in names:
        np.testing.assert_array_equal(again[name][0], splits[name][0])
    # Save / load round trip with a manifest.
    manifest = splits.save(tmp_path)
    assert manifest["splits"]["train"]["size"] == 4000 and len(manifest["splits"]["val"]["sha256"]) == 64
    assert json.load(open(tmp_path / "manifest.json"))["config"]["seed"] == 3
    loaded = countdown.ProblemSplits.load(tmp_path)
    for name in names:
        np.testing.assert_array_equal(loaded[name][1], splits[name][1])
    assert loaded.heldout_targets == splits.heldout_targets
    # Corruption and absence are detected.
    with open(tmp_path / "val.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="checksum of .*val.npz"):
        countdown.ProblemSplits.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        countdown.ProblemSplits.load(tmp_path / "nowhere")
    with pytest.raises(KeyError, match="split 'dev' not found"):
        loaded["dev"]


def test_split_errors():
    with pytest.raises(ValueError, match="heldout_splits names \\['x'\\] not in sizes"):
        countdown.make_splits(0, {"train": 10}, holdout_target_fraction=0.1, heldout_splits=["x"])
    with pytest.raises(ValueError, match="holdout_target_fraction=1.5 is out of range"):
        countdown.make_splits(0, {"train": 10}, holdout_target_fraction=1.5)
    with pytest.raises(ValueError, match="unique problems found"):
        # Two numbers in 1..3 and targets 1..3: only a handful of distinct problems exist.
        countdown.make_splits(0, {"train": 50}, num_numbers=2, min_target=1, max_target=3, max_number=3)
