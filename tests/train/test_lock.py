"""One writer per work directory (jaxapr.train.lock): a second writer fails at once naming the
holder; the lock of a process killed with SIGKILL is taken over; real train_sft processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from jaxapr.train.lock import LOCK_NAME, LockedError, WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def test_second_writer_fails_naming_the_holder_and_release_frees_it(tmp_path):
    with WorkdirLock(str(tmp_path)) as held:
        assert held.stale is None
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(
            LockedError,
            match=rf"^'{tmp_path}' is in use by another run \(pid {os.getpid()} on host "
            rf"{socket.gethostname()}, since .*\): expected one writer",
        ) as e:
            WorkdirLock(str(tmp_path)).acquire()
        assert "\n" not in str(e.value)
    assert not (tmp_path / LOCK_NAME).exists()  # a clean release leaves nothing behind
    with WorkdirLock(str(tmp_path)) as again:
        assert again.stale is None


def _holder(directory, then):
    """A process that takes the lock, says so, then ``then`` (sleep or die by SIGKILL)."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from jaxapr.train.lock import WorkdirLock
        WorkdirLock({str(directory)!r}).acquire()
        print("locked", flush=True)
        if {then!r} == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = _holder(tmp_path, "die")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.stale["pid"] == proc.pid  # the run reports the takeover
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_lock_of_a_living_process_in_another_process(tmp_path):
    proc = _holder(tmp_path, "sleep")
    try:
        with pytest.raises(LockedError, match=rf"\(pid {proc.pid} on host {socket.gethostname()}"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        proc.kill()
        proc.wait()
    with WorkdirLock(str(tmp_path)) as lock:  # its death freed the lock
        assert lock.stale["pid"] == proc.pid


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from experiments import gen_data
    from experiments.configs import data as data_configs

    config = data_configs.get_config("tiny")
    config.problems.update(train=60, val=8, test=8)
    config.num_workers = 0
    out = str(tmp_path_factory.mktemp("lock") / "data")
    gen_data.run(config, out, log=lambda *_: None)
    return out


def _train_sft(data_dir, workdir, *flags):
    small = [
        "--config.model.num_layers=1",
        "--config.model.d_model=32",
        "--config.model.num_heads=2",
        "--config.model.num_kv_heads=2",
        "--config.model.mlp_dim=64",
        "--config.model.max_len=256",
        "--config.seq_len=256",
        "--config.batch_size=4",
        "--config.optim.warmup_steps=1",
        "--config.eval_problems=0",
        "--config.eval_batches=1",
        "--config.progress=False",
    ]
    return [
        sys.executable,
        "-m",
        "experiments.train_sft",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        *small,
        *flags,
    ]


@pytest.mark.slow
def test_two_train_sft_processes_on_one_workdir(tmp_path, data_dir):
    """The second run (another seed) fails at once naming the first; the first is untouched;
    after the first is killed, a new run takes its lock over."""
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        _train_sft(
            data_dir,
            workdir,
            "--config.num_steps=100000",
            "--config.checkpoint_every=50",
            "--config.eval_every=0",
            "--config.log_every=50",
        ),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (workdir / LOCK_NAME).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None and (workdir / LOCK_NAME).exists()
        second = subprocess.run(
            _train_sft(data_dir, workdir, "--config.num_steps=3", "--config.seed=1"),
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr
        assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert first.poll() is None  # the holder goes on
        while not os.path.isdir(workdir / "checkpoints" / "50") and time.time() < deadline:
            time.sleep(0.2)
        assert json.loads((workdir / "config.json").read_text())["seed"] == 0  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.endswith("\n")]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)  # one run's rows, not two interleaved
    third = subprocess.run(
        _train_sft(data_dir, workdir, "--config.num_steps=2", "--config.overwrite=True"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"took over the lock of '{workdir}' from pid {first.pid}" in third.stdout
    assert "summary: step=2" in third.stdout and not (workdir / LOCK_NAME).exists()
