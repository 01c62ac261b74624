"""experiments.compare: two evaluate outputs' conditions, paired over the same problems."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import compare
from jaxapr import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _condition(run, mode, prefix, context, success, children):
    n = len(success)
    return {
        "run": run,
        "analysis": "context",
        "mode": mode,
        "prefix": prefix,
        "context": context,
        "problems": n,
        "records": {"success": success, "children": children, "total_tokens": [100.0 + c for c in children]},
    }


def _write(directory, conditions, numbers, targets):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "records.json"), "w") as f:
        json.dump({"problems": {"numbers": numbers, "targets": targets}, "conditions": conditions}, f)
    return str(directory)


@pytest.fixture
def two(tmp_path):
    rng = np.random.default_rng(0)
    numbers = rng.integers(1, 10, (40, 4)).tolist()
    targets = rng.integers(5, 50, 40).tolist()
    sa, sb = (rng.random(40) < p for p in (0.6, 0.3))
    ca, cb = rng.integers(2, 9, 40), rng.integers(2, 9, 40)
    a = _write(
        tmp_path / "a",
        [
            _condition("apr", "apr", "", 1024, sa.astype(float).tolist(), ca.tolist()),
            _condition("apr", "apr", "", 768, [0.0] * 40, [0] * 40),
            _condition("apr", "apr", "Sub Call Budget: 4 ", 1024, [1.0] * 40, [4] * 40),
        ],
        numbers,
        targets,
    )
    # B evaluated 30 of the same problems (its first 30), and SoS+ too
    b = _write(
        tmp_path / "b",
        [
            _condition("apr", "apr", "", 1024, sb[:30].astype(float).tolist(), cb[:30].tolist()),
            _condition("sosp", "sosp", "", 1024, [1.0] * 30, [0] * 30),
        ],
        numbers[:30],
        targets[:30],
    )
    return a, b, (sa, sb, ca, cb)


def test_paired_on_the_common_problems_against_numpy(two):
    a, b, (sa, sb, ca, cb) = two
    r = compare.compare(f"{a}:apr", f"{b}:apr")
    assert r["context"] == 1024 and r["n"] == 30  # the largest common window, the common problems
    assert r["accuracy"]["a"]["accuracy"] == sa[:30].mean()
    assert (r["accuracy"]["a"]["low"], r["accuracy"]["a"]["high"]) == stats.wilson_interval(int(sa[:30].sum()), 30)
    assert r["paired"]["success"]["diff"] == pytest.approx(sa[:30].mean() - sb[:30].mean())
    assert r["paired"]["children"]["diff"] == pytest.approx(ca[:30].mean() - cb[:30].mean())
    assert r["paired"]["success"] == stats.paired_bootstrap(sa[:30].astype(float), sb[:30].astype(float))
    # the budget shorthand and the run's greedy mode
    r = compare.compare(f"{a}:apr#4", f"{b}:sosp")
    assert r["accuracy"]["a"]["accuracy"] == 1.0 and r["paired"]["children"]["diff"] == 4.0
    assert "A - B success: +0.00 points" in compare.format_comparison(r)


def test_bad_conditions_are_one_line_errors(two, tmp_path):
    a, b, _ = two
    for spec_a, spec_b, context, message in (
        (f"{a}:apr#9", f"{b}:apr", 0, r"apr#9' is not in its records.json: it has \['apr/apr', 'apr/apr#4'\]"),
        (f"{a}:apr", f"{b}:apr", 512, r"has no context 512 in its records.json: it has \[768, 1024\]"),
        (f"{a}:apr", f"{b}:sosp_rl", 0, "is not in its records.json"),
        (f"{a}:policy", f"{b}:apr", 0, "run 'policy', expected sosp, apr, sosp_rl or apr_rl"),
        (f"{a}:apr#x", f"{b}:apr", 0, "budget 'x', expected an integer"),
        ("nocolon", f"{b}:apr", 0, "expected <evaluate out dir>:<run>"),
        (f"{tmp_path}/none:apr", f"{b}:apr", 0, "records.json' does not exist"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            compare.compare(spec_a, spec_b, context)
    with open(os.path.join(b, "records.json")) as f:
        other = json.load(f)
    other["problems"]["targets"][3] += 1
    c = _write(tmp_path / "c", other["conditions"], other["problems"]["numbers"], other["problems"]["targets"])
    with pytest.raises(ValueError, match="evaluated on different problems"):
        compare.compare(f"{a}:apr", f"{c}:apr")


def test_command_line(two, tmp_path):
    a, b, _ = two
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "cmp.json"
    cmd = [sys.executable, "-m", "experiments.compare", f"--a={a}:apr", f"--b={b}:apr", f"--json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "30 problems, per-call window 1024" in proc.stdout and "A - B success:" in proc.stdout
    assert json.load(open(out))["n"] == 30
    proc = subprocess.run(cmd[:3] + [f"--a={a}:apr"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"compare: error: --a and --b are required: expected {compare.SPEC}"
    )


def test_a_grpo_runs_validation_at_a_step(tmp_path):
    """``<train_rl workdir>@<step>``: the run's validation records at that step, on the first
    problems of its data's validation split, paired with another step or an evaluate output."""
    from envs import countdown

    splits = countdown.make_splits(0, {"train": 5, "val": 12}, num_numbers=3, min_target=1, max_target=30)
    splits.save(str(tmp_path / "data" / "problems"))
    run = tmp_path / "rl"
    run.mkdir()
    config = {"data_dir": str(tmp_path / "data"), "eval_split": "val", "kind": "apr", "max_context": 256}
    (run / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(1)
    steps = {s: (rng.random(10) < 0.5).astype(int).tolist() for s in (0, 5)}
    with open(run / "val_records.jsonl", "w") as f:
        for s, success in steps.items():
            row = {"success": success, "children": [s] * 10, "total_tokens": [7] * 10, "sequential_tokens": [3] * 10}
            f.write(json.dumps({"step": s, **row}) + "\n")
    r = compare.compare(f"{run}@5", f"{run}@0")
    assert r["n"] == 10 and r["context"] == 256
    assert r["paired"]["success"] == stats.paired_bootstrap(np.array(steps[5], float), np.array(steps[0], float))
    assert r["paired"]["children"]["diff"] == 5.0
    numbers, targets = splits["val"]
    ev = _write(
        tmp_path / "ev",
        [_condition("apr", "apr", "", 256, [float(x) for x in steps[0]], [0] * 10)],
        numbers[:10].tolist(),
        targets[:10].tolist(),
    )
    assert compare.compare(f"{run}@0", f"{ev}:apr")["paired"]["success"]["diff"] == 0.0
    with pytest.raises(ValueError, match=r"no validation records at RL step 3: it has \[0, 5\]"):
        compare.compare(f"{run}@3", f"{run}@0")
    other = _write(
        tmp_path / "other", [_condition("apr", "apr", "", 256, [0.0] * 10, [0] * 10)], [[1, 2, 3]] * 10, [6] * 10
    )
    with pytest.raises(ValueError, match="evaluated on different problems"):
        compare.compare(f"{run}@0", f"{other}:apr")
