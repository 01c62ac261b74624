"""Kill-and-resume: a real SFT process killed with SIGKILL mid-run, then restarted on the same
workdir, ends with the same parameters and metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from envs import countdown
from jaxapr import data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING = ("tokens_per_s", "peak_fraction", "train_seconds", "seconds", "seconds_per_problem")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    splits = countdown.make_splits(
        0, {"train": 200, "val": 20}, num_numbers=3, min_target=1, max_target=30, max_number=20
    )
    splits.save(str(root / "problems"))
    data.build_dataset(
        str(root / "sosp"), splits.splits, data.TraceConfig(kind="sosp", max_beam_size=2), seed=0, num_workers=0
    )
    return str(root)


def _command(data_dir, workdir):
    flags = dict(
        data_dir=data_dir,
        num_steps=40,
        log_every=1,
        eval_every=10,
        checkpoint_every=10,
        eval_problems=4,
        eval_max_context=64,
        eval_num_slots=4,
        batch_size=8,
        seq_len=512,
        eval_batches=1,
        progress=False,
        keep=2,
    )
    flags.update(
        {
            "model.num_layers": 1,
            "model.d_model": 64,
            "model.num_heads": 2,
            "model.num_kv_heads": 2,
            "model.mlp_dim": 128,
            "model.max_len": 512,
            "optim.warmup_steps": 5,
        }
    )
    return [
        sys.executable,
        "-m",
        "experiments.train_sft",
        "--config=experiments/configs/sft.py:tiny",
        f"--workdir={workdir}",
    ] + [f"--config.{k}={v}" for k, v in flags.items()]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device in the child
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k.split("/")[-1] not in TIMING} for r in rows]


def _final_params(workdir):
    from jaxapr import policy_io

    return policy_io.load_params(workdir, which="latest")[1]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, data_dir):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_command(data_dir, straight), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        _command(data_dir, killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 600
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics):
            with open(metrics) as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
            step = max([r["step"] for r in lines] or [0])
            if step >= 15:
                break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 15 <= step < 40
    subprocess.run(_command(data_dir, killed), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    assert _rows(killed) == _rows(straight)
    a, b = _final_params(straight), _final_params(killed)
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(os.path.join(killed, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 40 and summary["resumed_from"] in (10, 20, 30)  # its last checkpoint
    with open(os.path.join(straight, "summary.json")) as f:
        straight_summary = json.load(f)
    assert straight_summary["resumed_from"] == 0
    # the run's slot tokens (its mean rate's numerator) carried over the kill: _rows compared them
    assert summary["slot_tokens"] == straight_summary["slot_tokens"] > 0
