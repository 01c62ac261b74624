"""Many hosts on CPU: 2 processes x 2 fake devices (``experiments.launch``, jax.distributed with
gloo collectives) against 1 process x 4 devices (this pytest process, the first 4 of its 8).

- an SFT step sequence (fsdp_tp rules: parameters split across the processes) reaches the
  same losses and parameters; the global batch is the processes' rows concatenated;
- a GRPO step (replicated rules, one engine per process) makes the same rollouts from the
  same keys and the same update;
- a checkpoint written by 2 processes restores in 1 process and continues identically;
- ``gen_data`` with 2 processes writes the same bytes as 1 process;
- a killed process makes the launcher stop the other and fail with a clear message, fast.

This file is also the worker the launcher runs: ``python tests/test_distributed.py <scenario> <out>``.
"""

import dataclasses
import functools
import json
import operator
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a script by the launcher: the repo's packages, not tests/' siblings
    sys.path[0] = ROOT

SMALL = {"num_layers": 1, "d_model": 32, "num_heads": 2, "num_kv_heads": 2, "mlp_dim": 64, "max_len": 256}
SFT_STEPS, SAVE_AT, GLOBAL_BATCH, SEQ_LEN = 5, 3, 8, 256
PROBLEMS = (np.array([[3, 5, 7], [2, 9, 4], [6, 1, 8], [5, 5, 2]], np.int32), np.array([15, 17, 13, 12], np.int32))
GRPO = dict(
    num_problems=4,
    group_size=2,
    learning_rate=1e-3,
    num_minibatches=2,
    inner_epochs=2,
    beta=0.001,
    length_penalty=0.01,
    pack_calls=True,
)  # rewards differ by length: non-zero advantages from a random policy
GRPO_CONTEXT, GRPO_SLOTS = 64, 8
TOL = dict(rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------------
# the computations both sides run (worker: 2 processes; reference: this process)
# --------------------------------------------------------------------------------------
def model_cfg():
    from jaxapr import model as model_lib

    return model_lib.ModelConfig(**{**dataclasses.asdict(model_lib.PRESETS["tiny"]), **SMALL}).check()


def sft_setup(devices):
    from jaxapr import sharding
    from jaxapr.policy_io import make_policy
    from jaxapr.train import mesh as mesh_lib
    from jaxapr.train import sft
    from jaxapr.train.state import make_optimizer

    mesh = sharding.make_mesh(data=2, fsdp=2, devices=devices)
    tx, schedule = make_optimizer(3e-3, total_steps=10, warmup_steps=1, weight_decay=0.01)
    graphdef, state, shardings = mesh_lib.init_state_on_mesh(
        make_policy(model_cfg(), 0), tx, mesh, sharding.RULES["fsdp_tp"]
    )
    step = sft.make_sft_step(graphdef, tx, 1, schedule, state_shardings=shardings)
    return mesh, state, step


def sft_batches(data_dir):
    from jaxapr import data

    loader = data.make_loader(os.path.join(data_dir, "apr"), "train", batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN, seed=0)
    return list(data.iterate_batches(loader, SFT_STEPS))


def rows(batch, process, processes):
    n = len(batch["tokens"]) // processes
    return {k: v[process * n : (process + 1) * n] for k, v in batch.items()}


def grpo_setup(devices):
    from flax import nnx

    from jaxapr import engine as engine_lib
    from jaxapr import sharding
    from jaxapr.policy_io import make_policy
    from jaxapr.train import grpo
    from jaxapr.train import mesh as mesh_lib
    from jaxapr.train.state import make_optimizer

    gcfg = grpo.GRPOConfig(**GRPO).check()
    mesh = sharding.make_mesh(data=-1, devices=devices)
    tx, schedule = make_optimizer(gcfg.learning_rate, total_steps=8, schedule="constant")
    graphdef, state, shardings = mesh_lib.init_state_on_mesh(
        make_policy(model_cfg(), 0), tx, mesh, sharding.RULES["replicated"]
    )
    from jaxapr import distributed

    engine = engine_lib.Engine(
        nnx.merge(graphdef, distributed.process_local(state.params)), num_slots=GRPO_SLOTS, max_len=GRPO_CONTEXT
    )
    step = grpo.make_grpo_step(graphdef, tx, gcfg, schedule, state_shardings=shardings)
    return gcfg, mesh, state, engine, step


def grpo_rollouts(engine, params, gcfg, process, processes):
    """Process ``process``'s rollouts of the step (its share of whole problems; keys from their global indices)."""
    import jax

    from jaxapr import distributed
    from jaxapr.train import grpo

    k_roll = jax.random.fold_in(jax.random.key(0), 12)  # a key whose groups differ in length (see the test)
    mine = distributed.share(gcfg.num_problems, process, processes)
    problems = (PROBLEMS[0][mine.start : mine.stop], PROBLEMS[1][mine.start : mine.stop])
    return grpo.rollout_groups(
        engine,
        params,
        problems,
        gcfg,
        key=k_roll,
        problem_ids=np.arange(mine.start, mine.stop),
        mode="apr",
        max_context=GRPO_CONTEXT,
    )


def rows_of(results):
    from jaxapr.train import grpo

    return grpo.rows_needed(results, GRPO_CONTEXT, GRPO["pack_calls"])


def tokens_of(results):
    return [[np.asarray(c.output_tokens).tolist() for c in r.calls] for r in results]


def flat(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def grpo_update_key():
    import jax

    return jax.random.fold_in(jax.random.key(0), 8)


# --------------------------------------------------------------------------------------
# worker side (run by the launcher)
# --------------------------------------------------------------------------------------
def worker_train(data_dir, out):
    """SFT steps + checkpoint, then one GRPO step; process 0 writes what the test compares."""
    import jax
    from jax.experimental import multihost_utils

    from jaxapr import distributed
    from jaxapr.train import mesh as mesh_lib
    from jaxapr.train import rl
    from jaxapr.train.checkpoint import Checkpointer

    p, n = jax.process_index(), jax.process_count()
    report = {
        "processes": n,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "allgather_64bit": distributed.allgather(np.array([2**40 + p], np.int64)).tolist(),
    }
    # SFT: each process feeds its rows of the same global batches.
    mesh, state, step = sft_setup(jax.devices())
    batches = sft_batches(data_dir)
    losses = []
    for i, batch in enumerate(batches[:SAVE_AT]):
        device_batch = mesh_lib.batch_to_device(rows(batch, p, n), mesh)
        if i == 0:
            whole = multihost_utils.process_allgather(device_batch["tokens"], tiled=True)
            report["global_batch_is_concatenation"] = bool(np.array_equal(np.asarray(whole), batch["tokens"]))
        state, m = step(state, device_batch)
        losses.append(float(mesh_lib.host(m)["loss"]))
    report["sft_losses"] = losses
    with Checkpointer(os.path.join(out, "ckpt"), config={"test": "distributed"}, async_save=False) as ckpt:
        ckpt.save(SAVE_AT, state, extra={"written_by": n})
    sft_params = flat(distributed.process_local(state.params))  # gathered from the fsdp shards
    # GRPO: this process's share of the problems on its own engine, then one global update.
    gcfg, mesh, state, engine, step = grpo_setup(jax.devices())
    from jaxapr.train import grpo

    ref = grpo.reference_params(state.params)
    results = grpo_rollouts(engine, distributed.process_local(state.params), gcfg, p, n)
    max_rows = int(distributed.allgather(rows_of(results)).max())
    num_rows = rl.rows_per_process(max_rows, gcfg.num_minibatches, mesh.shape["data"] * mesh.shape["fsdp"], n)
    batch, _ = rl.process_batch(results, gcfg, seq_len=GRPO_CONTEXT, num_rows=num_rows, processes=n)
    state, m = step(state, ref, mesh_lib.batch_to_device(batch, mesh), grpo_update_key())
    report["grpo_metrics"] = {k: float(v) for k, v in mesh_lib.host(m).items()}
    report["grpo_rows_per_process"] = num_rows
    report["grpo_tokens"] = distributed.allgather_json(tokens_of(results))
    grpo_params = flat(distributed.process_local(state.params))
    if distributed.is_main():
        np.savez(os.path.join(out, "sft_params.npz"), **sft_params)
        np.savez(os.path.join(out, "grpo_params.npz"), **grpo_params)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)
    distributed.barrier("worker done")
    distributed.log("worker done")


def worker_die(out):
    """Process 1 dies (SIGKILL) while process 0 waits for it in a collective."""
    import signal

    import jax

    from jaxapr import distributed

    distributed.allgather(np.zeros(1))
    if jax.process_index() == 1:
        print("process 1 dying now", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    distributed.allgather(np.zeros(1))  # blocks: process 1 never arrives
    print("unexpected: the collective returned", flush=True)


def worker_main(argv):
    from jaxapr import distributed

    assert distributed.initialize(), "expected the launcher's environment (JAX_COORDINATOR_ADDRESS, ...)"
    scenario = argv[1]
    if scenario == "train":
        worker_train(argv[2], argv[3])
    elif scenario == "die":
        worker_die(argv[2])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


# --------------------------------------------------------------------------------------
# test side
# --------------------------------------------------------------------------------------
def launch(args, *, processes=2, devices=2, timeout=600, grace=10.0, pass_flags=False, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "experiments.launch",
        f"--num_processes={processes}",
        f"--devices_per_process={devices}",
        f"--grace_seconds={grace}",
        "--kill_seconds=5",
        "--pass_flags" if pass_flags else "--nopass_flags",
        "--",
    ] + list(args)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    proc.elapsed = time.monotonic() - t0
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from envs import countdown
    from jaxapr import data

    root = tmp_path_factory.mktemp("dist_data")
    splits = countdown.make_splits(
        0, {"train": 60, "val": 8}, num_numbers=3, min_target=1, max_target=30, max_number=20
    )
    splits.save(str(root / "problems"))
    data.build_dataset(
        str(root / "apr"), splits.splits, data.TraceConfig(kind="apr", max_beam_size=2), seed=0, num_workers=0
    )
    return str(root)


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_run"))
    proc = launch(["tests/test_distributed.py", "train", data_dir, out])
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return out, report, proc


def _assert_trees_close(a: dict, b: dict, exact=False):
    assert sorted(a) == sorted(b)
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], err_msg=k, **TOL)


@pytest.mark.slow
def test_sft_two_processes_equal_one_process_and_checkpoint_moves_between_them(two_process_run, data_dir):
    import jax

    from jaxapr import distributed
    from jaxapr.train import mesh as mesh_lib
    from jaxapr.train.checkpoint import Checkpointer

    out, report, proc = two_process_run
    assert report["processes"] == 2 and report["devices"] == 4 and report["local_devices"] == 2
    assert report["allgather_64bit"] == [[2**40], [2**40 + 1]]  # not narrowed to 32 bits
    assert report["global_batch_is_concatenation"]
    assert proc.stdout.count("worker done") == 1  # distributed.log: process 0 only
    mesh, state, step = sft_setup(jax.devices()[:4])
    losses, at_save = [], None
    for i, batch in enumerate(sft_batches(data_dir)):
        state, m = step(state, mesh_lib.batch_to_device(batch, mesh))
        losses.append(float(mesh_lib.host(m)["loss"]))
        if i + 1 == SAVE_AT:
            at_save = flat(state.params)
    np.testing.assert_allclose(report["sft_losses"], losses[:SAVE_AT], **TOL)
    saved = dict(np.load(os.path.join(out, "sft_params.npz")))
    _assert_trees_close(saved, at_save)
    # The 2-process checkpoint restores here (one process, its own mesh) and continues identically.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(os.path.join(out, "ckpt"), config={"test": "distributed"}) as ckpt:
        restored, extra = ckpt.restore(target)
    assert extra == {"written_by": 2} and int(restored.step) == SAVE_AT
    _assert_trees_close(flat(restored.params), saved, exact=True)
    for batch in sft_batches(data_dir)[SAVE_AT:]:
        restored, m = step(restored, mesh_lib.batch_to_device(batch, mesh))
    np.testing.assert_allclose(float(mesh_lib.host(m)["loss"]), losses[-1], **TOL)
    _assert_trees_close(flat(restored.params), flat(state.params))
    assert distributed.process_local(state.params) is state.params  # one process: nothing copied


@pytest.mark.slow
def test_grpo_step_two_processes_equal_one_process(two_process_run):
    import jax

    from jaxapr.train import grpo, rl
    from jaxapr.train import mesh as mesh_lib

    out, report, _ = two_process_run
    gcfg, mesh, state, engine, step = grpo_setup(jax.devices()[:4])
    ref = grpo.reference_params(state.params)
    results = [grpo_rollouts(engine, state.params, gcfg, p, 2) for p in range(2)]
    assert [tokens_of(r) for r in results] == report["grpo_tokens"]  # same keys -> same rollouts
    assert len(set(json.dumps(t) for t in report["grpo_tokens"])) == 2  # the processes' samples differ
    # keys come from the problems' global indices: the two parts are the step's rollouts in one piece
    whole = grpo_rollouts(engine, state.params, gcfg, 0, 1)
    assert functools.reduce(operator.iadd, report["grpo_tokens"], []) == tokens_of(whole)
    assert np.ptp(grpo.rewards(whole, gcfg).reshape(-1, gcfg.group_size), axis=1).max() > 0  # non-zero advantages
    num_rows = rl.rows_per_process(max(rows_of(r) for r in results), gcfg.num_minibatches, 4, 2)
    assert num_rows == report["grpo_rows_per_process"]
    parts = [rl.process_batch(r, gcfg, seq_len=GRPO_CONTEXT, num_rows=num_rows, processes=2)[0] for r in results]
    batch = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    np.testing.assert_allclose(batch["token_weights"].sum(), 1.0, rtol=1e-6)  # 1 / (calls x all rollouts), packed
    state, m = step(state, ref, mesh_lib.batch_to_device(batch, mesh), grpo_update_key())
    m = mesh_lib.host(m)
    assert m["grad_norm"] > 1e-3 and m["pg_loss"] != 0 and m["updates"] == 4  # a real update, 2 epochs x 2 minibatches
    for k in ("loss", "pg_loss", "kl", "grad_norm", "clip_fraction", "tokens"):
        np.testing.assert_allclose(report["grpo_metrics"][k], m[k], err_msg=k, **TOL)
    _assert_trees_close(dict(np.load(os.path.join(out, "grpo_params.npz"))), flat(state.params))


SLURM_ONE_TASK = {
    "SLURM_JOB_ID": "1",
    "SLURM_STEP_NODELIST": "n1",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}


def test_rows_per_process_shares_and_single_process_initialize(monkeypatch):
    from jaxapr import distributed
    from jaxapr.train import grpo, rl

    assert rl.rows_per_process(5, 2, 4, 1) == grpo.bucket_rows(5, 8)  # one process: as before
    for calls, m, ways, n in [(5, 2, 4, 2), (9, 4, 8, 4), (3, 1, 1, 2), (7, 3, 2, 2)]:
        r = rl.rows_per_process(calls, m, ways, n)
        assert r >= calls and r % m == 0 and (n * r) % (m * ways) == 0
    assert [list(distributed.share(6, i, 3)) for i in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="5 items do not split evenly over 2 processes"):
        distributed.share(5, 0, 2)
    with pytest.raises(ValueError, match="incomplete"):
        distributed.initialize(coordinator_address="localhost:1")
    assert distributed.initialize(num_processes=1) is False
    assert distributed.initialize(method="off") is False
    with pytest.raises(ValueError, match="--distributed=slurm: that cluster environment is not present"):
        distributed.initialize(method="slurm")
    # A detected cluster of one process (a 1-task SLURM job) stays single-process.
    for k, v in SLURM_ONE_TASK.items():
        monkeypatch.setenv(k, v)
    assert distributed.initialize() is False
    assert distributed.allgather(np.array([2**40])).tolist() == [[2**40]]
    assert distributed.allgather_json({"a": 1}) == [{"a": 1}]


def test_cluster_signals_read_presence_and_size_from_the_environment():
    from jaxapr import distributed

    detect = distributed.detect_cluster
    assert detect("auto", {}) is None and detect("off", {**SLURM_ONE_TASK, "SLURM_NTASKS": "4"}) is None
    assert detect("auto", SLURM_ONE_TASK) == ("slurm", 1)
    assert detect("auto", {**SLURM_ONE_TASK, "SLURM_NTASKS": "4"}) == ("slurm", 4)
    assert detect("slurm", {**SLURM_ONE_TASK, "SLURM_NTASKS": "4"}) == ("slurm", 4)
    partial = {k: v for k, v in SLURM_ONE_TASK.items() if k != "SLURM_STEP_NODELIST"}  # salloc, no srun step
    assert detect("auto", partial) is None
    with pytest.raises(ValueError, match="--distributed=slurm: that cluster environment is not present here"):
        detect("slurm", partial)
    ompi = {"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "3"}
    assert detect("auto", ompi) == ("ompi", 3)
    assert detect("auto", {**ompi, **SLURM_ONE_TASK}) == ("ompi", 3)  # JAX's order: Open MPI first
    assert detect("auto", {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == ("gketpu", 4)
    tpu = {"TPU_PROCESS_ADDRESSES": "a:1,b:1", "TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "MEGASCALE_NUM_SLICES": "2"}
    assert detect("auto", tpu) == ("gketpu", 4)  # TPU_PROCESS_ADDRESSES wins; 2 hosts x 2 slices
    assert detect("gcetpu", {}) == ("gcetpu", None)  # not visible in the environment: trusted when named
    assert detect("auto", {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "OMPI_COMM_WORLD_SIZE": "2"}) is None
    with pytest.raises(ValueError, match="SLURM_NTASKS='two': expected an integer"):
        detect("auto", {**SLURM_ONE_TASK, "SLURM_NTASKS": "two"})
    with pytest.raises(ValueError, match="not present"):
        detect("k8s", {})
    assert [c.name for c in distributed.CLUSTER_SIGNALS if not c.auto] == ["mpi4py", "gcetpu"]
    assert set(c.name for c in distributed.CLUSTER_SIGNALS) == set(distributed.METHODS) - {"auto", "off"}


def test_a_seen_cluster_of_several_processes_initializes_with_its_name(monkeypatch):
    """The decision is made from the environment alone; JAX is then told which cluster to read
    (a stand-in for jax.distributed.initialize records the call)."""
    import jax

    from jaxapr import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kw: calls.append((args, kw)))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize installs its own
    monkeypatch.setenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")  # leaves this process's config alone
    for k in (distributed.ENV_ADDRESS, distributed.ENV_COUNT, distributed.ENV_ID, distributed.ENV_METHOD):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**SLURM_ONE_TASK, "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.initialize(heartbeat_timeout=7) is True
    ((args, kw),) = calls
    assert args == (None, None, None)  # JAX reads the address, size and index from SLURM
    assert kw["cluster_detection_method"] == "slurm" and kw["heartbeat_timeout_seconds"] == 7
    assert distributed.initialize(method="off") is False and len(calls) == 1
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.initialize(method="slurm") is False and len(calls) == 1  # one task: single-process
    assert distributed.initialize(num_processes=2, method="slurm") is True  # an explicit size wins
    assert calls[-1] == ((None, 2, None), calls[-1][1]) and calls[-1][1]["cluster_detection_method"] == "slurm"
    assert distributed.initialize("h:1", 2, 0) is True and calls[-1][1]["cluster_detection_method"] == "deactivate"


def test_distributed_uses_only_public_jax_api():
    import ast
    import inspect

    from jaxapr import distributed

    modules = set()
    for node in ast.walk(ast.parse(inspect.getsource(distributed))):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    assert "jax.experimental" in modules  # the walk sees the imports inside functions
    assert not [m for m in modules if m.startswith("jax._src")], modules


def test_gen_data_two_processes_writes_the_same_bytes(tmp_path):
    from experiments import gen_data
    from experiments.configs import data as data_configs

    overrides = {
        "problems.train": 40,
        "problems.val": 8,
        "problems.test": 8,
        "num_workers": 0,
        "problems_per_task": 8,
    }  # 5 training chunks: process 0 builds 0, 2, 4, process 1 1, 3
    config = data_configs.get_config("tiny")
    config.problems.train, config.problems.val, config.problems.test = 40, 8, 8
    config.num_workers, config.problems_per_task = 0, 8
    one, two = tmp_path / "one", tmp_path / "two"
    gen_data.run(config, str(one), log=lambda *_: None)
    proc = launch(
        ["experiments.gen_data", "--config=experiments/configs/data.py:tiny", f"--out={two}"]
        + [f"--config.{k}={v}" for k, v in overrides.items()],
        pass_flags=True,
    )
    assert "wrote" in proc.stdout and proc.stdout.count("resolved config") == 1
    files = lambda root: sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    assert files(one) == files(two) and not any(".parts" in f for f in files(two))
    for rel in files(one):
        a, b = (root / rel for root in (one, two))
        if rel == "gen_data.json":  # timings
            continue
        if rel.endswith("manifest.json") and rel != os.path.join("problems", "manifest.json"):
            ja, jb = (json.loads(p.read_text()) for p in (a, b))
            ja.pop("build_seconds"), jb.pop("build_seconds")
            assert ja == jb, rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


SCRIPT_MODEL = {
    "model.num_layers": 1,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.mlp_dim": 64,
    "model.max_len": 256,
}


def _flags(values: dict) -> list:
    return [f"--config.{k}={v}" for k, v in values.items()]


@pytest.mark.slow
def test_scripts_train_with_two_processes_and_resume_in_one(tmp_path, data_dir):
    """experiments.train_sft and train_rl run under the launcher (2 x 2 devices); their
    workdirs then resume in this process (1 process, 8 devices)."""
    from experiments.configs import rl as rl_configs
    from experiments.configs import sft as sft_configs
    from jaxapr import policy_io
    from jaxapr.train import rl, sft

    sft_dir, rl_dir = str(tmp_path / "sft"), str(tmp_path / "rl")
    sft_values = {
        "data_dir": data_dir,
        "kind": "apr",
        "num_steps": 4,
        "seq_len": 256,
        "batch_size": 8,
        "log_every": 2,
        "eval_every": 2,
        "checkpoint_every": 2,
        "eval_problems": 4,
        "eval_max_context": 128,
        "eval_num_slots": 8,
        "eval_batches": 1,
        "progress": False,
        "optim.warmup_steps": 1,
        **SCRIPT_MODEL,
    }
    proc = launch(
        ["experiments.train_sft", "--config=experiments/configs/sft.py:tiny", f"--workdir={sft_dir}"]
        + _flags(sft_values),
        pass_flags=True,
    )
    assert proc.stdout.count("summary: step=4") == 1  # printed by process 0 only
    rows = [json.loads(line) for line in open(os.path.join(sft_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4]
    assert sorted(int(s) for s in os.listdir(os.path.join(sft_dir, "checkpoints")) if s.isdigit()) == [2, 4]
    rl_values = {
        "data_dir": data_dir,
        "init_from": sft_dir,
        "init_which": "latest",
        "kind": "apr",
        "num_steps": 2,
        "max_context": 128,
        "num_slots": 8,
        "eval_every": 2,
        "checkpoint_every": 1,
        "eval_problems": 2,
        "eval_at_start": False,
        "progress": False,
        "grpo.num_problems": 2,
        "grpo.group_size": 2,
        "grpo.learning_rate": 1e-3,
        "optim.learning_rate": 1e-3,
    }
    proc = launch(
        ["experiments.train_rl", "--config=experiments/configs/rl.py:tiny", f"--workdir={rl_dir}"] + _flags(rl_values),
        pass_flags=True,
    )
    assert proc.stdout.count("summary: rl_step=2") == 1
    rl_rows = [json.loads(line) for line in open(os.path.join(rl_dir, "metrics.jsonl")) if "rl/reward" in line]
    assert [r["step"] for r in rl_rows] == [1, 2] and all(r["rl/calls"] >= 4 for r in rl_rows)  # 2 x 2 rollouts
    # Resume both in one process (8 devices): parameters and optimizer state carry over.
    config = sft_configs.get_config("tiny")
    config.update({k: v for k, v in sft_values.items() if "." not in k})
    config.model.update({k.split(".")[1]: v for k, v in SCRIPT_MODEL.items()})
    config.optim.warmup_steps, config.num_steps = 1, 6
    lines = []
    summary = sft.train(config, sft_dir, log=lines.append)
    assert summary["step"] == 6 and any("written by 2 processes" in line for line in lines)
    assert any(line.startswith("resumed from step 4") for line in lines)
    config = rl_configs.get_config("tiny")
    config.update({k: v for k, v in rl_values.items() if "." not in k})
    config.grpo.update(num_problems=2, group_size=2, learning_rate=1e-3)
    config.optim.learning_rate, config.num_steps = 1e-3, 3
    assert rl.train(config, rl_dir, log=lambda *_: None)["rl_step"] == 3
    assert policy_io.load_params(rl_dir, which="latest")[0].d_model == 32


def test_killed_process_stops_the_job_with_a_clear_error(tmp_path):
    proc = launch(["tests/test_distributed.py", "die", str(tmp_path)], devices=1, grace=3.0, check=False, timeout=300)
    assert proc.returncode == 128 + 9
    assert "process 1 dying now" in proc.stdout
    assert "unexpected" not in proc.stdout
    assert re.search(r"launch: process 1 failed with exit code -9 \(killed by SIGKILL\)", proc.stderr), proc.stderr
    assert re.search(
        r"launch: exit codes: process 0: exit code (1|-9 \(killed by SIGKILL\)), process 1: exit code -9", proc.stderr
    ), proc.stderr
    # On CPU the survivor's collective fails at once (gloo sees the closed connection) and it exits
    # by itself instead of waiting at JAX's shutdown barrier; otherwise the launcher kills it.
    if "exit code 1," in proc.stderr:
        assert "[p0] [process 0/2] exiting on an uncaught" in proc.stdout
    assert proc.elapsed < 120, proc.elapsed  # startup + 3 s grace + 5 s kill, not JAX's 100 s heartbeat


if __name__ == "__main__":
    worker_main(sys.argv)
