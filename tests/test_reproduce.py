"""experiments.reproduce end to end at a very small size: every stage, the table, resuming."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--sft_config.model.num_layers=1",
    "--sft_config.model.d_model=32",
    "--sft_config.model.num_heads=2",
    "--sft_config.model.num_kv_heads=2",
    "--sft_config.model.mlp_dim=64",
    "--sft_config.model.max_len=256",
    "--sft_config.seq_len=256",
    "--sft_config.batch_size=4",
    "--sft_config.num_steps=3",
    "--sft_config.optim.warmup_steps=1",
    "--sft_config.eval_every=0",
    "--sft_config.checkpoint_every=3",
    "--sft_config.eval_problems=2",
    "--sft_config.eval_max_context=128",
    "--sft_config.eval_num_slots=8",
    "--sft_config.eval_batches=1",
    "--sft_config.progress=False",
    "--data_config.problems.train=40",
    "--data_config.problems.val=4",
    "--data_config.problems.test=4",
    "--data_config.num_workers=0",
    "--data_config.apr.sub_call_budget=0.5",  # budget prefixes, for the second stage's sweep
    "--rl_config.num_steps=1",
    "--rl_config.grpo.num_problems=2",
    "--rl_config.grpo.group_size=2",
    "--rl_config.max_context=128",
    "--rl_config.num_slots=8",
    "--rl_config.eval_problems=2",
    "--rl_config.progress=False",
    "--eval_config.problems=3",
    "--eval_config.n_max=2",
    "--eval_config.contexts=(64,128)",
    "--eval_config.num_slots=8",
]


@pytest.mark.slow
def test_reproduce_tiny_end_to_end_and_resume(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")

    def reproduce(workdir):
        cmd = [sys.executable, "-m", "experiments.reproduce", "--preset=tiny", f"--workdir={workdir}", *SMALL]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    proc = reproduce(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "reproduce.json"))
    assert [
        (r["context"], r["apr"] in ("apr", "apr_rl"), r["sosp"] in ("sosp", "sosp_rl")) for r in report["headline"]
    ] == [(64, True, True), (128, True, True)]
    for row in report["headline"]:  # the lead is APR - SoS+ with a paired interval around it
        assert row["lead"] == row["apr_accuracy"] - row["sosp_accuracy"]
        assert row["lead_low"] <= row["lead"] <= row["lead_high"]
    for stage in ("sft_sosp", "sft_apr", "rl_sosp", "rl_apr"):
        assert os.path.isfile(tmp_path / stage / "summary.json")
        assert report["times"][stage]["wall_s"] > 0
        summary = json.load(open(tmp_path / stage / "summary.json"))
        tokens, seconds = (
            ("slot_tokens", "train_seconds") if stage.startswith("sft") else ("generated_tokens", "generation_seconds")
        )
        assert report["times"][stage]["tokens_per_s"] == summary[tokens] / summary[seconds]  # the run's mean
    manifest = json.load(open(tmp_path / "export" / "manifest.json"))
    policies = {k: v for k, v in manifest["files"].items() if "method" in v}
    assert sorted(policies) == ["tiny_apr_grpo.npz", "tiny_apr_sft.npz", "tiny_sosp_grpo.npz", "tiny_sosp_sft.npz"]
    from envs.countdown.problems import sha256_file

    for name, entry in manifest["files"].items():
        assert sha256_file(str(tmp_path / "export" / name)) == entry["sha256"]
    for entry in policies.values():  # equal budgets: the same SFT token slots and RL rollouts
        assert entry["sft_tokens"] == 3 * 4 * 256 and entry["sft_steps"] == 3
        assert 0 < entry["sft_trained_tokens"] < entry["sft_nonpad_tokens"] <= entry["sft_tokens"]
        assert entry["rl_steps"] == (1 if entry["stage"] == "grpo" else 0)
        assert entry["command"].startswith("python -m experiments.reproduce --preset=tiny")
    assert set(manifest["choice"]) == {"sosp", "apr"}
    for c in manifest["choice"].values():  # GRPO - SFT on the same validation problems, paired
        paired = c["grpo_minus_sft"]
        assert paired["n"] == c["val_problems"]
        assert paired["diff"] == pytest.approx(c["grpo_val_accuracy"] - c["sft_val_accuracy"])
        assert paired["low"] <= paired["diff"] <= paired["high"]
    assert "Validation choice" in proc.stdout
    result = json.load(open(tmp_path / "eval" / "evaluate.json"))
    assert {c["run"] for c in result["conditions"]} == {"sosp", "apr", "sosp_rl", "apr_rl"}
    for c in result["conditions"]:
        assert c["accuracy_low"] <= c["accuracy"] <= c["accuracy_high"] and c["problems"] in (3,)
    assert any(c["label"].startswith("APR - SoS+ at 128") for c in result["comparisons"])
    # the APR policies' spawn decisions, on the validation problems
    assert set(result["spawn_decisions"]) == {"apr", "apr_rl"} and "Spawn decisions" in proc.stdout
    assert all(r["decisions"] > 0 for rows in result["spawn_decisions"].values() for r in rows)
    assert "Headline" in proc.stdout and "Paired comparisons" in proc.stdout
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the code that ran each stage and the export (a git checkout)
        assert manifest["code"]["commit"] == head.stdout.strip()
        assert all(e["code"] == manifest["code"] for e in policies.values())
    for entry in policies.values():  # where the run wrote is not part of what it recorded
        assert "--workdir=<workdir>" in entry["command"] and str(tmp_path) not in json.dumps(entry)
    assert not any("resumed_from" in e for e in policies.values())  # every stage ran start to end
    # The same command in another work directory holding the finished stages: every stage is
    # done, the export is the same bytes (so the evaluation is the cache's, keyed by file hash).
    other = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.copytree(tmp_path, other)
    shutil.rmtree(other / "export")
    again = reproduce(other)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== SFT sosp: done" in again.stdout
    conditions = json.load(open(other / "eval" / "evaluate.json"))["conditions"]
    assert conditions and all(c.get("cached") for c in conditions)
    # the stage times are the invocations that computed them, not the cached rerun's
    assert json.load(open(other / "stages.json"))["evaluate"] == report["times"]["evaluate"]
    for name, entry in manifest["files"].items():
        assert sha256_file(str(other / "export" / name)) == entry["sha256"], name
    # The second stage (evaluate.py:mini_sweep, sized down): the first stage's conditions come
    # from the cache, only the budget sweep is computed, and its time is a row of its own.
    stage2 = "--eval_config=experiments/configs/evaluate.py:mini_sweep"  # before SMALL's overrides of it
    sweep = ["--eval_config.budgets=(1,2)", "--eval_config.sweep_problems=0", "--eval_config.spawn_problems=100"]
    cmd = [sys.executable, "-m", "experiments.reproduce", "--preset=tiny", f"--workdir={other}", stage2, *SMALL, *sweep]
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    swept_result = json.load(open(other / "eval" / "evaluate.json"))
    swept = swept_result["conditions"]
    budget = [c for c in swept if c["prefix"]]
    assert {(c["run"], c["prefix"].strip()) for c in budget} == {
        (run, f"Sub Call Budget: {b}") for run in ("apr", "apr_rl") for b in (1, 2)
    }
    assert not any(c.get("cached") for c in budget)
    first = {(c["run"], c["analysis"], c["mode"], c["context"]): c["accuracy"] for c in conditions}
    assert {
        (c["run"], c["analysis"], c["mode"], c["context"]): c["accuracy"] for c in swept if not c["prefix"]
    } == first
    assert all(c.get("cached") for c in swept if not c["prefix"])
    stages = json.load(open(other / "stages.json"))
    assert stages["evaluate"] == report["times"]["evaluate"] and stages["evaluate_mini_sweep"]["wall_s"] > 0
    assert any(c["label"].startswith("enforced children") for c in swept_result["comparisons"])
    # APR's SFT stage in the first directory loses its summary (as if stopped after its last
    # checkpoint): it resumes from step 3, and its row, the manifest and the table say its wall
    # time is that invocation's, its train_seconds the whole run's.
    (tmp_path / "sft_apr" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "export")
    third = reproduce(tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "== SFT sosp: done" in third.stdout and "resumed from step 3: wall s is" in third.stdout
    resumed = json.load(open(tmp_path / "stages.json"))["sft_apr"]
    assert resumed["resumed_from"] == 3 and resumed["train_seconds"] == report["times"]["sft_apr"]["train_seconds"]
    entry = json.load(open(tmp_path / "export" / "manifest.json"))["files"]["tiny_apr_sft.npz"]
    assert entry["resumed_from"] == 3 and entry["wall_s"] == resumed["wall_s"]
    assert entry["sha256"] == manifest["files"]["tiny_apr_sft.npz"]["sha256"]


@pytest.mark.parametrize("preset", ["tiny", "mini", "paper"])
def test_presets_are_consistent(preset):
    """Every preset's configs load; an SFT ``init_from`` names shipped files of the run's model."""
    from experiments.configs import data as data_configs
    from experiments.configs import rl as rl_configs
    from experiments.configs import sft as sft_configs
    from jaxapr import policy_io
    from jaxapr.train import run_config

    d, s, r = data_configs.get_config(preset), sft_configs.get_config(preset), rl_configs.get_config(preset)
    assert s.seq_len <= s.model.max_len and r.max_context <= s.model.max_len and s.eval_max_context <= s.model.max_len
    assert s.optim.warmup_steps < s.num_steps
    assert d.apr.min_beam_size <= d.apr.max_beam_size and d.sosp.min_beam_size <= d.sosp.max_beam_size
    if s.init_from:
        for kind in ("sosp", "apr"):
            path = s.init_from.replace("{kind}", kind)
            cfg, _, _ = policy_io.load_params(path)
            assert cfg == run_config.model_config(s), path


def test_manifest_paths_inside_the_repository_are_relative_to_it():
    """A manifest written from any clone and work directory names the repository's files and
    the work directory's the same way; other paths stay as given."""
    from experiments.pipeline import REPO, portable

    tiny = os.path.join(REPO, "experiments", "checkpoints", "tiny_{kind}_sft.npz")
    config = {"sft": {"init_from": tiny, "data_dir": "/tmp/w/data", "seeds": [os.path.join(REPO, "a")]}, "n": 3}
    assert portable(config) == {
        "sft": {"init_from": "experiments/checkpoints/tiny_{kind}_sft.npz", "data_dir": "/tmp/w/data", "seeds": ["a"]},
        "n": 3,
    }
    assert portable(config, "/tmp/w")["sft"]["data_dir"] == "<workdir>/data"
    assert portable("/tmp/w", "/tmp/w/") == "<workdir>" and portable("/tmp/wx/data", "/tmp/w") == "/tmp/wx/data"
    assert portable(REPO + "x/y") == REPO + "x/y"  # a sibling directory whose name starts like the repository's
    assert portable(REPO) == REPO and portable("relative/path") == "relative/path"


def test_recorded_command_leaves_out_where_the_run_wrote():
    from experiments.pipeline import recorded_command

    expected = "python -m experiments.reproduce --preset=mini --workdir=<workdir> --rl=False"
    assert recorded_command(["--preset=mini", "--workdir=/tmp/r", "--rl=False"]) == expected
    assert recorded_command(["--preset=mini", "--workdir", "/tmp/r", "--rl=False"]) == expected.replace("=<", " <")
    assert recorded_command(["--preset=tiny"]) == "python -m experiments.reproduce --preset=tiny"
