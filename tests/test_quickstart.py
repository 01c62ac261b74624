"""The main job (experiments.quickstart) and its notebook at a seconds-long size: every stage,
the table, the JSON and the plots; its verdict logic by hand; bad flags fail fast. The notebook:
tests/test_notebook.py."""

import json
import os
import subprocess
import sys

import pytest

from experiments import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
SMALL = [
    "--problems=6",
    "--contexts=96,128",
    "--rl_steps=1",
    "--rl_problems=2",
    "--rl_group=2",
    "--rl_eval",
    "--scratch_steps=2",
    "--num_slots=16",
    "--progress=False",
]


def _check_output(out: dict, workdir: str, contexts, rl_eval: bool = True):
    rows = out["rows"]
    runs = ("sosp", "apr", "apr_rl") if rl_eval else ("sosp", "apr")
    assert {(r["run"], r["context"]) for r in rows} >= {(run, c) for run in runs for c in contexts}
    assert ("scratch", max(contexts)) in {(r["run"], r["context"]) for r in rows}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0 < r["sequential_tokens"] <= r["total_tokens"]
        assert r["children"] == 0 or r["run"] in ("apr", "apr_rl")
    assert set(out["comparison"]) == {str(c) for c in contexts}
    assert [p["step"] for p in out["curves"]["grpo"]] == [1] and out["curves"]["sft"]
    assert len(out["plots"]) == 2 and all(os.path.getsize(p) > 1000 for p in out["plots"])
    assert os.path.isfile(os.path.join(workdir, "quickstart.json"))
    for r in rows:  # every accuracy carries its interval; the verdicts behind it are kept
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] and len(r["solved"]) == out["problems"]
    for c in out["comparison"].values():
        assert c["apr_lead_low"] <= c["apr_lead_points"] <= c["apr_lead_high"]
    if "example" in out:  # APR solved a problem: its tree is drawn
        assert os.path.isfile(out["example"]["html"]) and out["example"]["text"].startswith("problem ")
    assert {"data", "evaluate", "total"} <= set(out["times"])


@pytest.mark.slow
def test_quickstart_command_end_to_end(tmp_path):
    workdir = str(tmp_path / "qs")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", f"--workdir={workdir}", *SMALL],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.load(open(os.path.join(workdir, "quickstart.json")))
    _check_output(out, workdir, [96, 128])
    assert (
        out["preset"] == "mini" and out["policies"]["sosp"] == quickstart.shipped_policies("mini")["sosp"]
    )  # the default
    for line in ("[5/5] results", "APR (", "APR + GRPO (demo)", "SoS+ from scratch", "Target (APR >= 10 points"):
        assert line in proc.stdout


def _row(run, ctx, acc, n=200):
    solved = [1] * round(acc * n) + [0] * (n - round(acc * n))
    return {
        "run": run,
        "label": quickstart.NAMES[run],
        "context": ctx,
        "accuracy": acc,
        "accuracy_low": acc - 0.05,
        "accuracy_high": acc + 0.05,
        "solved": solved,
        "total_tokens": 1.0,
        "sequential_tokens": 1.0,
        "children": 0.0,
        "seconds": 0.0,
    }


def test_comparison_and_verdict_by_hand():
    rows = [
        _row("sosp", 256, 0.10),
        _row("apr", 256, 0.15),
        _row("apr_rl", 256, 0.25),
        _row("sosp", 512, 0.50),
        _row("apr", 512, 0.55),
        _row("apr_rl", 512, 0.45),
        _row("scratch", 512, 0.0),
    ]
    comp = quickstart.comparison(rows)
    assert set(comp) == {"256", "512"}
    assert comp["256"]["apr_lead_points"] == pytest.approx(15.0)  # the better APR (after GRPO) vs SoS+
    assert comp["512"]["apr_lead_points"] == pytest.approx(5.0)
    # Nested verdicts (every problem SoS+ solves, APR solves too): the paired interval is one-sided.
    assert 0 <= comp["512"]["apr_lead_low"] < 5.0 < comp["512"]["apr_lead_high"]
    v = quickstart.verdict(comp)
    assert "not met" in v and "+15.0 at context 256: at least 10; the better solves 25.0%" in v  # but < 40%
    comp = quickstart.comparison([_row("sosp", 512, 0.35), _row("apr", 512, 0.46)])
    assert "Target (APR >= 10 points ahead, the better >= 40%): met" in quickstart.verdict(comp)
    # Equal leads: the context where the better policy solves more is reported.
    comp = quickstart.comparison(
        [_row("sosp", 768, 0.15), _row("apr", 768, 0.335), _row("sosp", 1024, 0.205), _row("apr", 1024, 0.39)]
    )
    assert "+18.5 at context 1024: at least 10; the better solves 39.0%" in quickstart.verdict(comp)
    # A context that meets both halves is found even where the lead is not the largest.
    comp = quickstart.comparison(
        [_row("sosp", 768, 0.10), _row("apr", 768, 0.35), _row("sosp", 1024, 0.30), _row("apr", 1024, 0.42)]
    )
    v = quickstart.verdict(comp)
    assert "40%): met (lead +12.0 at context 1024" in v
    table = quickstart.table(rows)
    assert "APR + GRPO" in table and "25.0%" in table and len(table.splitlines()) == len(rows) + 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--contexts=abc"], "--contexts=abc: expected comma-separated integers"),
        (["--contexts=8"], "expected at least one window of >= 32 tokens"),
        (["--rl_group=1"], "--rl_group=1: expected >= 2"),
        (["--apr=/nonexistent/policy.npz"], "--apr='/nonexistent/policy.npz': expected an exported policy .npz"),
        (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
        (["--preset=huge"], "--preset=huge: value should be one of"),
        (
            ["--preset=mini", f"--apr={quickstart.shipped_policies('tiny')['apr']}"],
            "was trained on the 'tiny' distribution: the quickstart evaluates on the 'mini' one",
        ),
    ],
)
def test_quickstart_bad_flags_fail_fast(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", f"--workdir={tmp_path / 'w'}", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # nothing was written


def test_example_is_the_evaluations_own_rollout(tmp_path):
    # The drawn search is the evaluation's rollout of that problem, not a second run: it is
    # the same tree a fresh greedy rollout of the problem gives.
    import numpy as np

    from jaxapr import policy_io, runtime
    from jaxapr.trace_view import render_text

    policy, _ = policy_io.load_exported(quickstart.shipped_policies("tiny")["apr"])
    numbers = np.array([[2, 3, 4], [1, 5, 6], [4, 7, 3], [10, 2, 8], [9, 3, 12], [6, 6, 5]], np.int32)
    problems = (numbers, np.array([24, 11, 25, 20, 15, 17], np.int32))  # solvable, the tiny preset's ranges
    kept = {}
    rows = quickstart.evaluate_policies(
        {"apr": policy}, problems, [512], num_slots=16, log=lambda *_: None, progress=False, keep=kept
    )
    assert list(kept) == [512] and len(kept[512]) == 6
    example = quickstart.example_trace(rows, kept, str(tmp_path))
    assert example is not None, "the tiny APR policy solved none of 6 problems"
    i = example["problem"]
    assert rows[0]["solved"][i] and example["numbers"] == problems[0][i].tolist()
    (fresh,) = runtime.rollout(
        policy, (problems[0][i : i + 1], problems[1][i : i + 1]), mode="apr", max_context=512, num_slots=16
    )
    assert example["text"] == render_text(fresh) and os.path.isfile(example["html"])
