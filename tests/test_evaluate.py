"""experiments.evaluate on two very small trained runs: every analysis, JSON and plots."""

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from envs import countdown
from jaxapr import data
from jaxapr.train import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A reproduce-like work directory: data/, sft_sosp/, sft_apr/ (a few SFT steps each)."""
    from tests.train.test_runs import sft_config

    root = tmp_path_factory.mktemp("eval")
    splits = countdown.make_splits(
        0, {"train": 60, "test": 6}, num_numbers=3, min_target=1, max_target=30, max_number=20
    )
    splits.save(str(root / "data" / "problems"))
    for kind in ("sosp", "apr"):
        data.build_dataset(
            str(root / "data" / kind),
            splits.splits,
            data.TraceConfig(kind=kind, max_beam_size=2, sub_call_budget=0.5 if kind == "apr" else 0.0),
            seed=0,
            num_workers=0,
        )
        c = sft_config(
            str(root / "data"),
            kind=kind,
            num_steps=2,
            eval_every=0,
            checkpoint_every=2,
            eval_problems=0,
            eval_batches=0,
        )
        c.optim.warmup_steps = 1
        sft.train(c, str(root / f"sft_{kind}"), log=lambda *_: None)
    return str(root)


@pytest.mark.slow
def test_evaluate_writes_every_analysis(workdir, tmp_path):
    out = str(tmp_path / "out")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            f"--workdir={workdir}",
            f"--out={out}",
            "--num_problems=3",
            "--contexts=64,128",
            "--n_max=2",
            "--budgets=1,2",
            "--num_slots=8",
            "--spawn_problems=6",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.load(open(os.path.join(out, "evaluate.json")))
    conds = result["conditions"]
    assert {(c["run"], c["context"]) for c in conds if c["analysis"] == "context"} == {
        ("sosp", 64),
        ("sosp", 128),
        ("apr", 64),
        ("apr", 128),
    }
    assert sorted(c["mode"] for c in conds if c["run"] == "sosp" and c["analysis"] == "tokens") == [
        "cons@1",
        "cons@2",
        "pass@1",
        "pass@2",
    ]
    # pass@n / cons@n come from one rollout of n_max samples: each n judged on the first n
    sampled = {c["mode"]: c for c in conds if c["run"] == "sosp" and c["analysis"] == "tokens"}
    assert all(c["samples_drawn"] == 2 for c in sampled.values())
    assert sampled["pass@1"]["total_tokens"] == sampled["cons@1"]["total_tokens"]  # the same first sample
    assert sampled["pass@2"]["total_tokens"] == sampled["cons@2"]["total_tokens"] > sampled["pass@1"]["total_tokens"]
    assert sampled["pass@2"]["accuracy"] >= sampled["pass@1"]["accuracy"]
    # a work directory has no store: the tokens analysis's unconditioned APR row (every problem,
    # the main window) is the context row's rollout, reused in the call (its timing, not a rerun)
    (ctx_row,) = [c for c in conds if c["run"] == "apr" and c["analysis"] == "context" and c["context"] == 128]
    (tok_row,) = [c for c in conds if c["run"] == "apr" and c["analysis"] == "tokens" and not c["prefix"]]
    assert tok_row["seconds"] == ctx_row["seconds"] and not tok_row.get("cached")
    # the budget sweep runs on the same problems as an unconditioned APR row of the tokens analysis
    assert sorted(c["prefix"] for c in conds if c["run"] == "apr" and c["analysis"] == "tokens") == [
        "",
        "Sub Call Budget: 1 ",
        "Sub Call Budget: 2 ",
    ]
    for c in conds:
        assert 0.0 <= c["accuracy_low"] <= c["accuracy"] <= c["accuracy_high"] <= 1.0 and c["total_tokens"] > 0
        assert c["total_tokens_with_context"] > c["total_tokens"] and c["latency_steps"] < c["sequential_tokens"]
    # paired comparisons: APR - SoS+ at each context, matched tokens; intervals bracket the difference
    labels = [c["label"] for c in result["comparisons"]]
    assert "APR - SoS+ at 64" in labels and "APR - SoS+ at 128" in labels
    assert any("matched total tokens" in label for label in labels)
    # each budget's point of APR's curve against the cons@n nearest in total tokens
    cons = {c["mode"]: c["total_tokens"] for c in conds if c["run"] == "sosp" and c["mode"].startswith("cons@")}
    for b in (1, 2):
        (cmp,) = [c for c in result["comparisons"] if c["label"].startswith(f"APR (Sub Call Budget: {b}) - SoS+ cons@")]
        (apr,) = [c for c in conds if c["run"] == "apr" and c["prefix"] == f"Sub Call Budget: {b} "]
        assert cmp["a"]["prefix"] == apr["prefix"] and cmp["b"]["mode"] in cons
        assert abs(cons[cmp["b"]["mode"]] - apr["total_tokens"]) == min(
            abs(t - apr["total_tokens"]) for t in cons.values()
        )
    for c in result["comparisons"]:
        assert c["low"] <= c["diff"] <= c["high"] and c["n"] == 3
    records = json.load(open(os.path.join(out, "records.json")))
    assert len(records["conditions"]) == len(conds)
    assert all(len(r["records"]["success"]) == 3 for r in records["conditions"])
    # the problems evaluated, each with its exact solution count (the difficulty plot's measure)
    numbers, targets = countdown.ProblemSplits.load(os.path.join(workdir, "data", "problems"))["test"]
    assert records["problems"]["numbers"] == numbers[:3].tolist()
    assert (
        records["problems"]["solutions"] == [int(countdown.count_solutions(a, t)) for a, t in zip(numbers, targets)][:3]
    )
    assert sorted(os.path.basename(p) for p in result["plots"]) == [
        "accuracy_vs_context.png",
        "accuracy_vs_latency.png",
        "accuracy_vs_total_tokens.png",
        "children_vs_difficulty.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in result["plots"])
    assert "Accuracy vs per-call context window" in proc.stdout and "Paired comparisons" in proc.stdout
    # APR rows carry the join diagnostics (runtime.join_diagnostics means), serial rows do not
    for c in conds:
        assert ("lost_at_join" in c) == (c["run"] == "apr")
        if c["run"] == "apr":
            assert 0.0 <= c["lost_at_join"] <= c["child_solved"] <= 1.0 and c["distinct_children"] <= c["children"]
    assert "APR joins" in proc.stdout
    # spawn decisions: the APR run only, one row per (budget, k) (unconditioned root calls first,
    # then --budgets' among those the 6 problems drew), probabilities and rates in [0, 1]
    assert list(result["spawn_decisions"]) == ["apr"] and "Spawn decisions" in proc.stdout
    rows = result["spawn_decisions"]["apr"]
    keys = [(-1 if r["budget"] is None else r["budget"], r["k"]) for r in rows]
    assert keys == sorted(set(keys)) and keys[0][0] == -1 and min(k for _, k in keys) >= 1
    assert {b for b, _ in keys} <= {-1, 1, 2}
    for r in rows:
        assert r["decisions"] > 0 and 0 <= r["data_spawn_rate"] <= 1 and 0 <= r["greedy_spawns"] <= 1
        assert 0 <= r["policy_spawn_p10"] <= r["policy_spawn_prob"] <= r["policy_spawn_p90"] <= 1


def test_evaluate_bad_input(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    for args, message in (
        (["--out=" + str(tmp_path)], "no runs found"),
        (["--workdir=" + str(tmp_path / "missing"), "--out=" + str(tmp_path)], "does not exist"),
        (["--workdir=" + str(tmp_path)], "--out is required"),
        (
            ["--out=" + str(tmp_path), "--cache_dir=" + __file__],
            "--cache_dir=" + repr(__file__) + " is not a directory",
        ),
        (["--out=" + str(tmp_path), "--spawn_problems=-1"], "--spawn_problems=-1: expected >= 0"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.evaluate", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]  # a usage error
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_evaluate_takes_exported_policies(workdir, tmp_path):
    """The shipped .npz policies evaluate like run workdirs (the same loader users use)."""
    ckpts = os.path.join(ROOT, "experiments", "checkpoints")
    out = str(tmp_path / "out")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    args = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        f"--sosp={ckpts}/tiny_sosp_sft.npz",
        f"--apr={ckpts}/tiny_apr_sft.npz",
        f"--out={out}",
        "--num_problems=3",
        "--contexts=128",
        "--n_max=1",
        "--num_slots=8",
        "--plots=False",
    ]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--data_dir is required with exported (.npz) policies" in proc.stderr
    proc = subprocess.run(
        args + [f"--data_dir={workdir}/data"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.load(open(os.path.join(out, "evaluate.json")))
    assert {(c["run"], c["analysis"]) for c in result["conditions"]} == {
        ("sosp", "context"),
        ("apr", "context"),
        ("sosp", "tokens"),
        ("apr", "tokens"),  # no budgets in the tiny data, but the matched-tokens row against cons@n
    }
    assert any("matched total tokens" in c["label"] for c in result["comparisons"])
    assert result["runs"]["apr"].endswith("tiny_apr_sft.npz")
    assert not any(c.get("cached") for c in result["conditions"])
    # --cache_dir: a second run reuses every stored condition, with the same records; already in
    # the first, APR's tokens row (no budget, every problem, the main window) is its context
    # row's condition, read back from the store
    cached = [*args, f"--data_dir={workdir}/data", f"--cache_dir={tmp_path / 'cache'}", f"--out={tmp_path / 'again'}"]
    same = [c["run"] == "apr" and c["analysis"] == "tokens" for c in result["conditions"]]
    for expect_cached in (same, [True] * len(same)):
        proc = subprocess.run(cached, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        again = json.load(open(tmp_path / "again" / "evaluate.json"))
        assert [bool(c.get("cached")) for c in again["conditions"]] == expect_cached
        assert [c["accuracy"] for c in again["conditions"]] == [c["accuracy"] for c in result["conditions"]]
    assert len(os.listdir(tmp_path / "cache")) == 3  # the two greedy conditions and one sampled rollout
    # as many problems of another split (train): other problems, so nothing is read from the store
    other = [a for a in cached if not a.startswith("--out=")] + ["--split=train", f"--out={tmp_path / 'train'}"]
    proc = subprocess.run(other, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.load(open(tmp_path / "train" / "evaluate.json"))
    assert [bool(c.get("cached")) for c in got["conditions"]] == same and got["split"] == "train"
    assert len(os.listdir(tmp_path / "cache")) == 6
    records = json.load(open(tmp_path / "train" / "records.json"))
    assert records["problems"]["targets"] != json.load(open(tmp_path / "again" / "records.json"))["problems"]["targets"]


class _SameEverywhere:
    """A stand-in policy: one next-token distribution at every position, the spawn token's
    logit ``lift`` above the others' (0)."""

    def __init__(self, lift: float, max_len: int = 1024):
        from types import SimpleNamespace

        from jaxapr.tokenizer import CountdownTokenizer

        self.tok = CountdownTokenizer()
        self.cfg = SimpleNamespace(max_len=max_len)
        self.lift = lift

    def __call__(self, tokens):
        import jax.numpy as jnp

        logits = jnp.zeros(tokens.shape + (len(self.tok),), jnp.float32) * tokens[..., None]  # not a constant
        return logits.at[..., self.tok.token_id("<Calling Sub Searches>")].set(self.lift)


@pytest.mark.parametrize("lift", [0.0, 2.0])
def test_spawn_decisions_against_the_demonstrations_text(lift):
    """``analysis.spawn_decisions`` finds every decision a root call's text shows (the k-th
    "Generated Node" line of an expansion followed by another exploration or the spawn), per
    budget prefix (none, or each asked-for ``Sub Call Budget: b``), with the demonstrations'
    spawn rate per (budget, k), and reads the policy's probability there."""
    import math

    from experiments import analysis

    config = data.TraceConfig(kind="apr", min_beam_size=2, max_beam_size=4, max_sub_call_beam_size=3, shuffle=False)
    config = dataclasses.replace(config, sub_call_budget=0.5)
    numbers, targets = countdown.make_splits(
        0, {"test": 30}, num_numbers=4, min_target=5, max_target=25, max_number=10
    )["test"]
    decisions, spawned = {}, {}  # (budget or None, k) -> count
    for i, (x, t) in enumerate(zip(numbers, targets)):  # the oracle: the root call's lines
        (prompt, output, _), *_ = data.problem_texts(x, t, config, 7, i)[0]
        budget = int(re.match(r"Sub Call Budget: (\d+) ", prompt)[1]) if prompt.startswith("Sub Call") else None
        lines = output.splitlines()
        k = 0
        for line, after in itertools.pairwise(lines):
            k = 0 if line.startswith("Current State: ") else k + line.startswith("Generated Node #")
            if line.startswith("Generated Node #") and after.startswith(
                ("Exploring Operation", "<Calling Sub Searches>")
            ):
                decisions[budget, k] = decisions.get((budget, k), 0) + 1
                spawned[budget, k] = spawned.get((budget, k), 0) + after.startswith("<Calling Sub Searches>")
    budgets = sorted({b for b, _ in decisions if b is not None})
    assert len(budgets) >= 2 and any(spawned[key] for key in spawned if key[0] is None)
    policy = _SameEverywhere(lift)
    unconditioned = {key: n for key, n in decisions.items() if key[0] is None}
    rows = analysis.spawn_decisions(policy, (numbers, targets), config, seed=7)
    assert {(r["budget"], r["k"]): r["decisions"] for r in rows} == unconditioned
    some = budgets[:2]
    rows = analysis.spawn_decisions(policy, (numbers, targets), config, budgets=some, seed=7)
    assert [(r["budget"], r["k"]) for r in rows] == sorted(
        (key for key in decisions if key[0] in (None, *some)),
        key=lambda key: (-1 if key[0] is None else key[0], key[1]),
    )
    vocab = len(policy.tok)
    expect = math.exp(lift) / (math.exp(lift) + vocab - 1)
    for r in rows:
        key = r["budget"], r["k"]
        assert r["decisions"] == decisions[key] and r["data_spawn_rate"] == spawned[key] / decisions[key]
        assert math.isclose(r["policy_spawn_prob"], expect, rel_tol=1e-5)
        assert math.isclose(r["policy_spawn_p10"], r["policy_spawn_p90"], rel_tol=1e-5)
        assert r["greedy_spawns"] == (1.0 if lift > 0 else 0.0)
    every_budget = dataclasses.replace(config, sub_call_budget=1.0)  # no unconditioned root call: no rows
    assert analysis.spawn_decisions(policy, (numbers, targets), every_budget, seed=7) == []


def test_rl_curves_come_from_grpo_work_directories(tmp_path):
    """Only a run whose metrics.jsonl has GRPO rows gives RL curves; the plot is written from them."""
    from experiments import analysis
    from jaxapr.train.metrics import MetricWriter

    for name, rows in {
        "rl": [(0, {"val/accuracy": 0.1, "val/accuracy_low": 0.05, "val/accuracy_high": 0.2, "val/children": 5.0})]
        + [(s, {"rl/success": 0.1 * s, "rl/children_per_problem": 5.0 + s}) for s in (1, 2, 3)],
        "sft": [(1, {"train/loss": 1.0})],
    }.items():
        w = MetricWriter(str(tmp_path / name), tensorboard=False, progress=False)
        for step, row in rows:
            w.write(step, row)
        w.close()
    runs = {"apr_rl": str(tmp_path / "rl"), "apr": str(tmp_path / "sft"), "sosp": str(tmp_path / "none.npz")}
    metrics = analysis.rl_metrics_of(runs)
    assert list(metrics) == ["apr_rl"] and [r["step"] for r in metrics["apr_rl"]] == [0, 1, 2, 3]
    out = tmp_path / "out"
    out.mkdir()
    files = analysis.plot({"conditions": []}, str(out), rl_metrics=metrics)
    assert [os.path.basename(f) for f in files] == ["rl_curves.png"] and os.path.getsize(files[0]) > 0
    # A serial run alone: its success panel only (no empty children panel, no legend warning).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (serial,) = analysis.plot({"conditions": []}, str(tmp_path), rl_metrics={"sosp_rl": metrics["apr_rl"]})
    assert os.path.getsize(serial) > 0


def test_join_losses_partition_the_problems_by_hand():
    """Each problem lands in exactly one class; the context threshold and the never-run join."""
    from experiments import analysis

    records = {  # problems: solved, filled (800 >= 768), not run, wrote on, stopped, no child, no child
        "success": [1, 0, 0, 0, 0, 0, 0],
        "child_solved": [1, 1, 1, 1, 1, 0, 0],
        "lost_at_join": [0, 1, 1, 1, 1, 0, 0],
        "join_overflow": [0, 1, 1, 1, 0, 1, 0],
        "join_prompt_tokens": [500, 800, 0, 767, 300, 900, 300],
        "join_output_tokens": [170, 224, 0, 257, 40, 124, 30],
    }
    got = analysis.join_losses(records, context=1024)
    assert got == {
        "problems": 7,
        "solved": 1,
        "lost_context_full": 2,
        "lost_writing_on": 1,
        "lost_stopped": 1,
        "no_child_solved": 2,
        "overflow": 4,
        "overflow_no_child_solved": 1,
        "join_prompt_median": 633.5,  # of the six that joined: (500 + 767) / 2
        "join_prompt_p90": float(np.percentile([500, 800, 767, 300, 900, 300], 90)),
        "output_solved": 170.0,
        "output_writing_on": 257.0,
    }
    assert sum(got[k] for k in analysis.JOIN_LOSSES) == got["problems"]
    assert analysis.join_losses(records, context=1024, full=0.5)["lost_context_full"] == 3  # 767 >= 512
    serial = {"run": "sosp", "analysis": "context", "context": 1024, "records": {"success": [1]}}
    apr = {"run": "apr", "analysis": "context", "context": 1024, "records": records}
    text = analysis.format_join_losses([serial, apr])
    assert "SoS+" not in text and "of 7: solved 1 / lost 2 context, 1 wrote on, 1 stopped / no child solved 2" in text
    assert analysis.format_join_losses([serial]) == ""
    assert "spawned again" not in text  # records without root_spawns
    # roots that spawned another round after a join: the first (solved) and the stopped one
    again = {**records, "root_spawns": [2, 1, 1, 1, 3, 1, 1]}
    got = analysis.join_losses(again, context=1024)
    assert (got["spawned_again"], got["spawned_again_solved"]) == (2, 1)
    text = analysis.format_join_losses([{**apr, "records": again}])
    assert text.endswith("; spawned again after a join 2 (1 solved)")


def test_cache_keys_by_policy_problems_condition_and_record_fields(tmp_path):
    """A stored condition is read back only for the same policy, problem set, condition and
    record fields: one stored before a field was added is computed again, not served short."""
    from experiments.analysis import _Cache

    spec = {"analysis": "context", "context": 1024, "problems": 4}
    store = _Cache(str(tmp_path), {"apr": "sha-a"}, "problems-1", ("success", "children"))
    store.put("apr", spec, {"records": {"success": [1, 0, 0, 1], "children": [2, 3, 4, 5]}})
    again = _Cache(str(tmp_path), {"apr": "sha-a"}, "problems-1", ("children", "success"))
    assert again.get("apr", spec) == {"records": {"success": [1, 0, 0, 1], "children": [2, 3, 4, 5]}}
    for other in (
        _Cache(str(tmp_path), {"apr": "sha-a"}, "problems-1", ("success", "children", "join_prompt_tokens")),
        _Cache(str(tmp_path), {"apr": "sha-b"}, "problems-1", ("success", "children")),
        _Cache(str(tmp_path), {"apr": "sha-a"}, "problems-2", ("success", "children")),
    ):
        assert other.get("apr", spec) is None
    assert again.get("apr", {**spec, "context": 4096}) is None
    # a training work directory (no fingerprint) is never stored
    unstored = _Cache(str(tmp_path), {"apr": None}, "problems-1", ("success",))
    unstored.put("apr", spec, {"records": {}})
    assert unstored.get("apr", spec) is None and len(os.listdir(tmp_path)) == 1
