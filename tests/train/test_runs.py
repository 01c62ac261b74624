"""The SFT and GRPO runs end to end (in-process, a very small policy): outputs, resume,
and bad input (missing data, NaN loss, a config that does not match the checkpoint, another
run's work directory, a corrupt latest checkpoint)."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from envs import countdown
from jaxapr import data, evaluation, policy_io, runtime
from jaxapr.train import loop, rl, sft

SMALL = {"num_layers": 1, "d_model": 32, "num_heads": 2, "num_kv_heads": 2, "mlp_dim": 64, "max_len": 256}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs_data")
    splits = countdown.make_splits(
        0, {"train": 120, "val": 16}, num_numbers=3, min_target=1, max_target=30, max_number=20
    )
    splits.save(str(root / "problems"))
    for kind in ("sosp", "apr"):
        data.build_dataset(
            str(root / kind), splits.splits, data.TraceConfig(kind=kind, max_beam_size=2), seed=0, num_workers=0
        )
    return str(root)


def sft_config(data_dir, **kw):
    from experiments.configs import sft as sft_configs

    c = sft_configs.get_config("tiny")
    c.model.update(SMALL)
    c.update(
        dict(
            data_dir=data_dir,
            kind="apr",
            num_steps=6,
            seq_len=256,
            batch_size=8,
            log_every=2,
            eval_every=3,
            checkpoint_every=3,
            eval_problems=4,
            eval_max_context=128,
            eval_num_slots=8,
            eval_batches=1,
            progress=False,
            async_checkpoint=False,
        )
    )
    c.optim.warmup_steps = 2
    for k, v in kw.items():
        c[k] = v
    return c


def rl_config(data_dir, init_from, **kw):
    from experiments.configs import rl as rl_configs

    c = rl_configs.get_config("tiny")
    c.update(
        dict(
            data_dir=data_dir,
            init_from=init_from,
            kind="apr",
            num_steps=3,
            max_context=128,
            num_slots=16,
            eval_every=2,
            checkpoint_every=1,
            eval_problems=4,
            eval_at_start=False,
            progress=False,
            async_checkpoint=False,
        )
    )
    # rewards differ by length, so a random policy's groups have advantages (with every
    # rollout failing, skip_zero_advantage would leave nothing to train)
    c.grpo.update(dict(num_problems=2, group_size=2, learning_rate=1e-3, length_penalty=0.01))
    c.optim.learning_rate = 1e-3
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def sft_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft"))
    summary = sft.train(sft_config(data_dir), workdir, log=lambda *_: None)
    return workdir, summary


def test_sft_run_writes_metrics_checkpoints_and_summary(sft_run):
    workdir, summary = sft_run
    assert summary["step"] == 6 and np.isfinite(summary["loss"]) and 0.0 <= summary["val/accuracy"] <= 1.0
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert train_rows[0]["train/loss"] > train_rows[-1]["train/loss"]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_fraction"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "val/accuracy" in r] == [3, 6]
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [3, 6]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    policy = policy_io.load_policy(workdir, which="latest")
    assert policy.cfg.d_model == SMALL["d_model"]
    # Running again on a finished workdir resumes at the end and trains nothing more.
    again = sft.train(sft_config(sft_run_data(workdir)), workdir, log=lambda *_: None)
    assert again["step"] == 6


def sft_run_data(workdir):
    return json.load(open(os.path.join(workdir, "config.json")))["data_dir"]


def test_bad_input_is_a_clear_error(tmp_path, data_dir, sft_run):
    with pytest.raises(ValueError, match="config.data_dir is required"):
        sft.train(sft_config(""), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        sft.train(sft_config(str(tmp_path / "nowhere")), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="config.kind='x'"):
        sft.train(sft_config(data_dir, kind="x"), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="warmup_steps=2 is more than config.num_steps=1"):
        sft.train(sft_config(data_dir, num_steps=1), str(tmp_path / "d"))
    with pytest.raises(ValueError, match="seq_len=512"):
        sft.train(sft_config(data_dir, seq_len=512), str(tmp_path / "e"))
    # The workdir's checkpoint is for d_model=32: a different model is refused, naming the key.
    workdir, _ = sft_run
    other = sft_config(data_dir)
    other.model.d_model = 64
    with pytest.raises(ValueError, match="model.d_model=32 differs from this run's 64"):
        sft.train(other, workdir)
    with pytest.raises(ValueError, match="config.init_from is required"):
        rl.train(rl_config(data_dir, ""), str(tmp_path / "f"))
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        rl.train(rl_config(data_dir, str(tmp_path)), str(tmp_path / "g"))


def test_sft_says_how_many_examples_are_too_long(tmp_path, data_dir):
    lengths = data.TraceSource(os.path.join(data_dir, "apr"), "train", False).lengths
    seq_len = int(np.median(lengths))  # about half of the examples do not fit
    lines = []
    sft.train(
        sft_config(data_dir, num_steps=2, seq_len=seq_len, eval_every=0, checkpoint_every=2),
        str(tmp_path / "r"),
        log=lines.append,
    )
    dropped = int((lengths > seq_len).sum())
    assert dropped > 0
    assert any(
        line.startswith(f"{dropped} training examples are longer than seq_len={seq_len} tokens") for line in lines
    )


def test_sft_init_from_starts_from_another_runs_parameters(tmp_path, data_dir, sft_run):
    workdir, _ = sft_run
    source = policy_io.export_policy(
        policy_io.load_policy(workdir, which="latest"), str(tmp_path / "p_apr.npz"), dtype="float32"
    )
    # "{kind}" in init_from is the run's kind; with a negligible learning rate the run keeps them exactly.
    c = sft_config(data_dir, num_steps=2, eval_every=0, checkpoint_every=2, init_from=str(tmp_path / "p_{kind}.npz"))
    c.optim.update(learning_rate=1e-30, warmup_steps=1)  # updates below every float32 ulp
    sft.train(c, str(tmp_path / "ft"), log=lambda *_: None)
    got = policy_io.load_params(str(tmp_path / "ft"), which="latest")[1]
    want = policy_io.load_params(source)[1]
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # A finished or interrupted run resumes from its own checkpoint: init_from is not read again.
    os.remove(source)
    assert sft.train(c, str(tmp_path / "ft"), log=lambda *_: None)["step"] == 2
    # ... and a fresh run (no init_from, seed 0) does not start there.
    fresh = sft_config(data_dir, num_steps=2, eval_every=0, checkpoint_every=2)
    fresh.optim.update(learning_rate=1e-30, warmup_steps=1)
    sft.train(fresh, str(tmp_path / "fresh"), log=lambda *_: None)
    other = policy_io.load_params(str(tmp_path / "fresh"), which="latest")[1]
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(other), jax.tree.leaves(want))
    )
    bigger = sft_config(data_dir, init_from=workdir, init_which="latest")
    bigger.model.d_model = 64
    with pytest.raises(ValueError, match=r"is a different model: d_model=32 \(run: 64\)"):
        sft.train(bigger, str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="no exported policy"):
        sft.train(sft_config(data_dir, init_from=str(tmp_path / "none.npz")), str(tmp_path / "bad2"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "nan")
    # Warmup from 0: step 1 changes nothing, step 2 (lr 5e29) makes every later loss non-finite.
    blowup = sft_config(data_dir, num_steps=30, checkpoint_every=1, eval_every=0, eval_problems=0)
    blowup.optim.learning_rate = 1e30
    with pytest.raises(loop.TrainingError, match="non-finite loss") as err:
        sft.train(blowup, workdir, log=lambda *_: None)
    assert "\n" not in str(err.value)
    _, params, _ = policy_io.load_params(workdir, which="latest")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_another_runs_workdir_is_refused_listing_the_fields(tmp_path, data_dir, sft_run):
    """A finished APR run restarted as a SoS+ run with another seed and learning rate: one
    line with every differing field; nothing in the workdir changes. Fields that only say how
    long to train or how often to evaluate may change; overwrite=True starts afresh."""
    from jaxapr.train.checkpoint import ConfigMismatchError

    workdir = str(tmp_path / "run")
    shutil.copytree(sft_run[0], workdir)
    before = {
        p: open(p, "rb").read() for p in glob.glob(os.path.join(workdir, "**"), recursive=True) if os.path.isfile(p)
    }
    other = sft_config(data_dir, kind="sosp", seed=7)
    other.optim.learning_rate = 0.05
    with pytest.raises(ConfigMismatchError) as e:
        sft.train(other, workdir, log=lambda *_: None)
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        'checkpoint config kind="apr" differs from this run\'s "sosp", '
        "optim.learning_rate=0.002 differs from this run's 0.05, "
        "seed=0 differs from this run's 7: expected the same values"
    )
    assert "--config.overwrite=True" in message
    after = {
        p: open(p, "rb").read() for p in glob.glob(os.path.join(workdir, "**"), recursive=True) if os.path.isfile(p)
    }
    assert after == before
    # How long to train and how often to evaluate may change: the run continues 6 -> 8.
    longer = sft_config(data_dir, num_steps=8, eval_every=4, checkpoint_every=4, log_every=4, eval_batches=2)
    lines = []
    assert sft.train(longer, workdir, log=lines.append)["step"] == 8
    assert any(line.startswith("resumed from step 6") for line in lines), lines
    # overwrite=True: the previous run's outputs go, a fresh run of the new config starts.
    fresh = sft_config(data_dir, kind="sosp", seed=7, num_steps=2, checkpoint_every=2, eval_every=0, overwrite=True)
    lines = []
    assert sft.train(fresh, workdir, log=lines.append)["step"] == 2
    assert any(line.startswith("config.overwrite: deleted the previous run's checkpoints") for line in lines)
    assert not any("resumed" in line for line in lines)
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [2]
    assert [r["step"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "train/loss" in r] == [
        2
    ]
    assert json.load(open(os.path.join(workdir, "config.json")))["kind"] == "sosp"


def test_flipped_bytes_in_the_latest_checkpoint_resume_from_the_one_before(tmp_path, data_dir):
    workdir = str(tmp_path / "flip")
    c = sft_config(data_dir, num_steps=6, eval_every=0, eval_problems=0)
    sft.train(c, workdir, log=lambda *_: None)
    files = [
        p
        for p in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "d", "*"), recursive=True)
        if os.path.getsize(p) > 4096
    ]  # the array data (orbax reads it without complaint: wrong values)
    for path in files:
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            chunk = f.read(16)
            f.seek(os.path.getsize(path) // 2)
            f.write(bytes(b ^ 0x5A for b in chunk))
    lines = []
    summary = sft.train(sft_config(data_dir, num_steps=9, eval_every=0, eval_problems=0), workdir, log=lines.append)
    assert any(line.startswith("resumed from step 3 ") for line in lines), lines
    assert summary["step"] == 9 and np.isfinite(summary["loss"])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt", "6"))  # kept aside, not deleted
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == 9 and 6 in steps  # step 6 was written again by the resumed run


def test_rl_run_resumes_exactly(tmp_path, data_dir, sft_run):
    init, _ = sft_run
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    s = rl.train(rl_config(data_dir, init, init_which="latest"), straight, log=lambda *_: None)
    assert s["rl_step"] == 3 and 0.0 <= s["success"] <= 1.0 and s["calls"] >= 4
    rows = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))]
    rl_rows = [r for r in rows if "rl/reward" in r]
    assert [r["step"] for r in rl_rows] == [1, 2, 3]
    # the run's generated tokens and generation seconds so far: each step's, summed
    g = rl_config(data_dir, init).grpo
    per_step = [r["rl/total_tokens"] * g.num_problems * g.group_size for r in rl_rows]
    assert [r["rl/generated_tokens"] for r in rl_rows] == pytest.approx(np.cumsum(per_step).tolist())
    assert s["generation_seconds"] == pytest.approx(sum(r["rl/rollout_seconds"] for r in rl_rows))
    assert {
        "rl/kl",
        "rl/clip_fraction",
        "rl/children_per_problem",
        "rl/sequential_tokens",
        "rl/rollout_seconds",
        "rl/update_seconds",
    } <= set(rl_rows[0])
    # each validation's per-problem records: their means are the logged scalars
    records = rl.read_val_records(straight)
    val_rows = {r["step"]: r for r in rows if "val/accuracy" in r}
    assert sorted(records) == sorted(val_rows) == [1, 2, 3]
    # an APR run keeps every record field, the join diagnostics included
    assert set(records[3]) == {*evaluation.RECORD_FIELDS, *runtime.JOIN_FIELDS}
    for step, rec in records.items():
        assert len(rec["success"]) == val_rows[step]["val/problems"] == 4
        assert np.mean(rec["success"]) == pytest.approx(val_rows[step]["val/accuracy"])
        assert np.mean(rec["children"]) == pytest.approx(val_rows[step]["val/children"])
        assert np.mean(rec["total_tokens"]) == pytest.approx(val_rows[step]["val/total_tokens"])
    # experiments.evaluate's latest checkpoint, on the run's validation problems: the run's own
    # last validation, problem by problem
    from experiments import analysis

    numbers, targets = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))["val"]
    plan = analysis.Plan(contexts=(128,), n_max=0, budgets=(), num_slots=8)
    result = analysis.evaluate(
        {"apr_rl": straight}, (numbers[:4], targets[:4]), plan, which="latest", log=lambda *_: None
    )
    (cond,) = [c for c in result["conditions"] if c["analysis"] == "context"]
    assert {k: cond["records"][k] for k in records[3]} == records[3]
    rl.train(rl_config(data_dir, init, init_which="latest", num_steps=2), split, log=lambda *_: None)
    resumed = rl.train(rl_config(data_dir, init, init_which="latest"), split, log=lambda *_: None)
    assert resumed["generated_tokens"] == s["generated_tokens"]  # carried over the resume
    with open(os.path.join(split, rl.VAL_RECORDS), "a") as f:
        f.write('{"step": 3, "succ')  # a torn last line (a crash mid-write) is skipped
    assert rl.read_val_records(split) == records
    assert rl.read_val_records(str(tmp_path)) == {}
    a = policy_io.load_params(straight, which="latest")[1]
    b = policy_io.load_params(split, which="latest")[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    init_params = policy_io.load_params(init, which="latest")[1]
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(init_params))
    )


def test_export_round_trip(tmp_path, sft_run):
    from jaxapr import model

    workdir, _ = sft_run
    policy = policy_io.load_policy(workdir, which="latest")
    path = policy_io.export_policy(policy, str(tmp_path / "p"), extra={"note": "test"})
    back = policy_io.load_policy(path)
    tokens = np.arange(3, 40, dtype=np.int32)[None]
    a, b = np.asarray(policy(tokens)), np.asarray(back(tokens))
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())  # bfloat16 parameters
    f32 = policy_io.export_policy(policy, str(tmp_path / "q.npz"), dtype="float32")
    np.testing.assert_array_equal(np.asarray(policy_io.load_policy(f32)(tokens)), a)
    assert policy_io.load_exported(path)[1]["extra"] == {"note": "test"}
    assert os.path.getsize(path) < os.path.getsize(f32)
    with pytest.raises(FileNotFoundError, match="no exported policy"):
        policy_io.load_policy(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable exported policy"):
        policy_io.load_policy(str(tmp_path / "bad.npz"))
    del model


def test_a_preset_that_does_not_fit_memory_fails_fast():
    from experiments.configs import sft as sft_configs
    from jaxapr.train import plan

    # per device: the paper preset's 32 rows x 4,096 tokens on each of the 8 (fake) devices
    with pytest.raises(ValueError, match=r"SFT needs .* GiB per device .* but a device has 2.0 GiB: .*config\."):
        plan.check_run(sft_configs.get_config("paper"), "sft", limit="2GiB")
    assert plan.check_run(sft_configs.get_config("tiny"), "sft", limit="2GiB").method == "analytic"  # fits


def test_rl_step_without_a_trained_call_runs_no_update(tmp_path, data_dir, sft_run):
    # Without the length penalty every rollout of the barely trained policy fails, so every
    # group's rewards are equal: no call carries an advantage and the update is not even traced.
    from jaxapr.train import grpo

    init, _ = sft_run
    c = rl_config(data_dir, init, init_which="latest", num_steps=1, eval_problems=0)
    c.grpo.length_penalty = 0.0
    traced = grpo.TRACE_COUNTS["grpo_update"]
    workdir = str(tmp_path / "rl")
    s = rl.train(c, workdir, log=lambda *_: None)
    row = next(json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if "rl/reward" in l)
    assert s["rl_step"] == 1 and row["rl/success"] == 0 and row["rl/trained_calls"] == 0 < row["rl/calls"]
    assert row["rl/loss"] == row["rl/kl"] == row["rl/grad_norm"] == 0.0
    assert grpo.TRACE_COUNTS["grpo_update"] == traced
    after = policy_io.load_params(workdir, which="latest")[1]
    before = policy_io.load_params(init, which="latest")[1]
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
