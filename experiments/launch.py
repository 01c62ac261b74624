r"""Run a multi-process JAX job on this machine (CPU): N local processes, one coordinator.

    python -m experiments.launch --num_processes=2 --devices_per_process=2 -- \
        experiments.train_sft --config=experiments/configs/sft.py:tiny --config.data_dir=/tmp/d --workdir=/tmp/w

starts ``python -m <module> <args>`` (or ``python <script.py> <args>``) ``num_processes``
times with

- ``JAX_COORDINATOR_ADDRESS=localhost:<free port>``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  in the environment and (``--pass_flags``, the default) the same as flags
  ``--coordinator_address --num_processes --process_id`` after the command's own arguments
  (``jaxapr.distributed.initialize_from_flags`` reads either);
- ``JAX_PLATFORMS=cpu``, ``XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>``
  (replacing any device count inherited) and gloo CPU collectives
  (``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``);

streams every process's output line by line prefixed with ``[p<i>]``, and exits with 0 when
all succeed. When a process fails (non-zero exit or a signal), the launcher names it and its
exit code, gives the others ``--grace_seconds`` to finish on their own (they are usually
blocked in a collective waiting for it), then stops them (SIGTERM, then SIGKILL after
``--kill_seconds``) and exits with the failed process's code (128 + signal for a signal).
Children die with the launcher (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "How many processes to start.")
flags.DEFINE_integer("devices_per_process", 1, "Fake CPU devices per process (XLA_FLAGS device count).")
flags.DEFINE_integer("port", 0, "Coordinator port on localhost (0: a free one).")
flags.DEFINE_float("grace_seconds", 10.0, "After a process fails, how long the others may take to exit on their own.")
flags.DEFINE_float("kill_seconds", 5.0, "After SIGTERM, how long before SIGKILL.")
flags.DEFINE_bool("pass_flags", True, "Also pass --coordinator_address/--num_processes/--process_id as flags.")
flags.DEFINE_integer(
    "heartbeat_timeout",
    None,
    "jax.distributed heartbeat timeout in seconds for the children (env JAXAPR_HEARTBEAT_TIMEOUT; default JAX's).",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(
    base: dict, *, process_id: int, num_processes: int, address: str, devices: int, heartbeat_timeout: int | None = None
) -> dict:
    env = dict(base)
    xla = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(xla + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["JAX_COORDINATOR_ADDRESS"] = address
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    if heartbeat_timeout is not None:
        env["JAXAPR_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout)
    return env


def child_command(
    target: str, args: list[str], *, process_id: int, num_processes: int, address: str, pass_flags: bool
) -> list[str]:
    cmd = [sys.executable] + ([target] if target.endswith(".py") else ["-m", target]) + list(args)
    if pass_flags:
        cmd += [f"--coordinator_address={address}", f"--num_processes={num_processes}", f"--process_id={process_id}"]
    return cmd


def _die_with_parent():  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"exit code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code} (killed by signal {-code})"
    return f"exit code {code}"


def _stream(proc: subprocess.Popen, prefix: bytes, out, lock: threading.Lock) -> None:
    for line in iter(proc.stdout.readline, b""):
        with lock:
            out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            out.flush()
    proc.stdout.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own process group (its pool workers included)
    except (ProcessLookupError, PermissionError):
        pass


def launch(
    target: str,
    args: list[str],
    *,
    num_processes: int,
    devices_per_process: int = 1,
    port: int = 0,
    grace_seconds: float = 10.0,
    kill_seconds: float = 5.0,
    pass_flags: bool = True,
    heartbeat_timeout: int | None = None,
    env: dict | None = None,
    out=None,
    err=None,
) -> int:
    """Runs the job (see the module docstring); returns the launcher's exit code."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes}, devices_per_process={devices_per_process}: expected >= 1")
    out = out or sys.stdout.buffer
    err = err or sys.stderr
    address = f"localhost:{port or free_port()}"
    base = dict(os.environ if env is None else env)
    lock = threading.Lock()
    procs, threads = [], []

    def say(message: str) -> None:
        with lock:
            print(f"launch: {message}", file=err, flush=True)

    say(
        f"{num_processes} processes x {devices_per_process} CPU devices, coordinator {address}: "
        f"{' '.join([target] + list(args))}"
    )
    try:
        for i in range(num_processes):
            proc = subprocess.Popen(
                child_command(
                    target, args, process_id=i, num_processes=num_processes, address=address, pass_flags=pass_flags
                ),
                env=child_env(
                    base,
                    process_id=i,
                    num_processes=num_processes,
                    address=address,
                    devices=devices_per_process,
                    heartbeat_timeout=heartbeat_timeout,
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            procs.append(proc)
        for i, proc in enumerate(procs):  # threads only after the forks (preexec_fn and threads do not mix)
            t = threading.Thread(target=_stream, args=(proc, f"[p{i}] ".encode(), out, lock), daemon=True)
            t.start()
            threads.append(t)
        failed: tuple[int, int] | None = None
        deadline = None
        while True:
            codes = [p.poll() for p in procs]
            if failed is None:
                bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = bad[0]
                    deadline = time.monotonic() + grace_seconds
                    running = [i for i, c in enumerate(codes) if c is None]
                    rest = f"; stopping processes {running} in {grace_seconds:g} s unless they exit" if running else ""
                    say(f"process {failed[0]} failed with {describe(failed[1])}{rest}")
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() >= deadline:
                _stop([p for p in procs if p.poll() is None], kill_seconds)
                for i, p in enumerate(procs):
                    if p.returncode is not None and codes[i] is None:
                        say(f"process {i} stopped ({describe(p.returncode)}) because process {failed[0]} failed")
                break
            time.sleep(0.05)
    except BaseException:
        _stop([p for p in procs if p.poll() is None], kill_seconds)
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
    codes = [p.wait() for p in procs]
    if failed is None:
        say(f"all {num_processes} processes succeeded")
        return 0
    say("exit codes: " + ", ".join(f"process {i}: {describe(c)}" for i, c in enumerate(codes)))
    code = failed[1]
    return code if code > 0 else 128 - code


def _stop(procs: list, kill_seconds: float) -> None:
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    end = time.monotonic() + kill_seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def main(argv):
    if len(argv) < 2:
        raise app.UsageError(
            "expected a module (or script.py) to run after '--', e.g. "
            "python -m experiments.launch --num_processes=2 -- experiments.train_sft --workdir=..."
        )
    try:
        code = launch(
            argv[1],
            argv[2:],
            num_processes=FLAGS.num_processes,
            devices_per_process=FLAGS.devices_per_process,
            port=FLAGS.port,
            grace_seconds=FLAGS.grace_seconds,
            kill_seconds=FLAGS.kill_seconds,
            pass_flags=FLAGS.pass_flags,
            heartbeat_timeout=FLAGS.heartbeat_timeout,
        )
    except ValueError as e:
        sys.exit(f"launch: {e}")
    sys.exit(code)


if __name__ == "__main__":
    app.run(main)
