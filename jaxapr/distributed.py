"""Many hosts: ``jax.distributed`` set-up and the few multi-process helpers the scripts share.

One module (over 500 lines) because every multi-process concern of the scripts (set-up,
barriers, values and arrays across processes) sits behind one import, with one rule: a
collective is called by every process.

Every experiment script calls :func:`initialize_from_flags` first thing in ``main`` (before
any JAX computation) and then builds its mesh over ``jax.devices()``, all global devices.
Where the settings come from, first match wins:

1. flags ``--coordinator_address=host:port --num_processes=N --process_id=i`` (see
   :func:`define_flags`);
2. environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (what ``experiments.launch`` sets);
3. a cluster seen in the environment (``--distributed=auto``, the default): SLURM, Open MPI
   or a GKE TPU slice (:data:`CLUSTER_SIGNALS`), used only when it holds more than one
   process; ``--distributed=slurm`` (or ``ompi``, ``gketpu``, ``mpi4py``, ``gcetpu``) names
   one; ``--distributed=off`` never initializes. JAX then reads the cluster's address, size
   and this process's index (``cluster_detection_method``).

Presence and size are read from environment variables, not asked of JAX, because
``jax.distributed.initialize`` refuses to run after any JAX computation: the decision to call
it must be made without touching JAX. Two clusters are not visible that way and are used only
when named: ``mpi4py`` (any MPI launcher; opt-in in JAX too) and ``gcetpu`` (a Cloud TPU VM
slice, which JAX recognizes by asking the GCE metadata server). JAX's Kubernetes detection has
no name to select it by and needs the Kubernetes API; on Kubernetes, set the three settings.

With none of these (or ``--num_processes=1``) nothing happens: a plain single-process run.
``--distributed_heartbeat_timeout`` (seconds; env ``JAXAPR_HEARTBEAT_TIMEOUT``) bounds how
long the others wait for a process that died before JAX's coordination service stops them;
``--distributed_init_timeout`` and ``--distributed_shutdown_timeout`` likewise (env
``JAXAPR_INIT_TIMEOUT``, ``JAXAPR_SHUTDOWN_TIMEOUT``). On CPU (``JAX_PLATFORMS=cpu``)
cross-process collectives use gloo (``jax_cpu_collectives_implementation``).

Helpers: :func:`is_main`, :func:`barrier` (every process waits for the others), :func:`log`
(process 0 only) and :func:`log_all` (every process, prefixed), :func:`allgather` /
:func:`allgather_json` / :func:`sum_across` (small host values across processes),
:func:`process_local` (a process-local, fully replicated copy of a global array tree, for the
per-process rollout engine), :func:`put_global` (host data that is the same on every process
onto a global sharding) and :func:`fail` (exit now without waiting for the others at JAX's
shutdown barrier). Only JAX's public API is used (``jax.distributed``,
``jax.experimental.multihost_utils``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_METHOD = "JAXAPR_DISTRIBUTED"
ENV_TIMEOUTS = {
    "init": "JAXAPR_INIT_TIMEOUT",
    "heartbeat": "JAXAPR_HEARTBEAT_TIMEOUT",
    "shutdown": "JAXAPR_SHUTDOWN_TIMEOUT",
}
DEFAULT_TIMEOUTS = {"init": 300, "heartbeat": 100, "shutdown": 300}  # JAX's defaults
METHODS = ("auto", "off", "slurm", "ompi", "mpi4py", "gcetpu", "gketpu")  # JAX's cluster names

_barrier_counter = itertools.count()


# --------------------------------------------------------------------------------------
# flags and initialization
# --------------------------------------------------------------------------------------
def define_flags(flag_values=None) -> None:
    """Define the distributed flags on ``flag_values`` (default ``absl.flags.FLAGS``); calling
    it twice is harmless."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    if "coordinator_address" in fv:
        return
    flags.DEFINE_string(
        "coordinator_address",
        None,
        f"host:port of process 0's coordinator (env {ENV_ADDRESS}); unset: single process, or the detected cluster's",
        flag_values=fv,
    )
    flags.DEFINE_integer("num_processes", None, f"Processes in the job (env {ENV_COUNT}).", flag_values=fv)
    flags.DEFINE_integer(
        "process_id", None, f"This process's index, 0..num_processes-1 (env {ENV_ID}).", flag_values=fv
    )
    flags.DEFINE_enum(
        "distributed",
        None,
        METHODS,
        "Cluster detection when the three settings above are absent: "
        f"'auto' (default; env {ENV_METHOD}) initializes only on a detected multi-process cluster, "
        "'off' never, or a cluster name.",
        flag_values=fv,
    )
    for what, env in ENV_TIMEOUTS.items():
        flags.DEFINE_integer(
            f"distributed_{what}_timeout",
            None,
            f"jax.distributed {what} timeout, seconds (env {env}; default {DEFAULT_TIMEOUTS[what]}).",
            flag_values=fv,
        )


def initialize_from_flags(flag_values=None) -> bool:
    """:func:`initialize` with the values of :func:`define_flags`' flags (env fallbacks)."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    get = lambda name: fv[name].value if name in fv else None
    return initialize(
        get("coordinator_address"),
        get("num_processes"),
        get("process_id"),
        method=get("distributed"),
        init_timeout=get("distributed_init_timeout"),
        heartbeat_timeout=get("distributed_heartbeat_timeout"),
        shutdown_timeout=get("distributed_shutdown_timeout"),
    )


def initialize_or_exit(flag_values=None) -> bool:
    """:func:`initialize_from_flags` for a script's ``main``: a bad setting or a failed
    start exits with a one-line ``error: ...`` instead of a traceback."""
    try:
        return initialize_from_flags(flag_values)
    except (ValueError, RuntimeError) as e:
        fail(f"error: {e}")
        raise  # not reached: fail exits


def _env_int(name: str) -> int | None:
    return _parse_int(name, os.environ.get(name))


def _parse_int(name: str, value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


@dataclasses.dataclass(frozen=True)
class ClusterSignal:
    """How one of JAX's cluster environments shows itself in the environment variables."""

    name: str  # JAX's name for it: the cluster_detection_method passed on
    auto: bool  # looked for by --distributed=auto (else only when named)
    present: Callable[[Mapping[str, str]], bool]
    count: Callable[[Mapping[str, str]], int | None]  # processes in the job; None: not shown
    signal: str  # what is looked at, for the documentation


def _all_set(*names: str) -> Callable[[Mapping[str, str]], bool]:
    return lambda env: all(name in env for name in names)


def _count_var(name: str) -> Callable[[Mapping[str, str]], int | None]:
    return lambda env: _parse_int(name, env.get(name))


def _tpu_hosts(env: Mapping[str, str]) -> str | None:
    return env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))  # JAX's precedence


def _tpu_count(env: Mapping[str, str]) -> int | None:
    hosts = [h for h in (_tpu_hosts(env) or "").split(",") if h.strip()]
    slices = _parse_int("MEGASCALE_NUM_SLICES", env.get("MEGASCALE_NUM_SLICES")) or 1
    return len(hosts) * slices if hosts else None


_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

CLUSTER_SIGNALS = (
    ClusterSignal(
        name="ompi",
        auto=True,
        present=_all_set("OMPI_MCA_orte_hnp_uri"),
        count=_count_var("OMPI_COMM_WORLD_SIZE"),
        signal="OMPI_MCA_orte_hnp_uri set (mpirun / mpiexec); processes: OMPI_COMM_WORLD_SIZE",
    ),
    ClusterSignal(
        name="slurm",
        auto=True,
        present=_all_set(*_SLURM),
        count=_count_var("SLURM_NTASKS"),
        signal=f"{', '.join(_SLURM)} all set (an srun step); processes: SLURM_NTASKS",
    ),
    ClusterSignal(
        name="gketpu",
        auto=True,
        present=lambda env: _tpu_hosts(env) is not None,
        count=_tpu_count,
        signal="TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES set; processes: its comma-separated hosts "
        "x MEGASCALE_NUM_SLICES (default 1)",
    ),
    ClusterSignal(
        name="mpi4py",
        auto=False,
        present=lambda env: importlib.util.find_spec("mpi4py") is not None,
        count=lambda env: None,
        signal="named only; mpi4py importable; processes: MPI's, read by JAX",
    ),
    ClusterSignal(
        name="gcetpu",
        auto=False,
        present=lambda env: True,
        count=lambda env: None,
        signal="named only: JAX asks the GCE metadata server, which is not visible here",
    ),
)
"""What ``--distributed`` looks for, in the order ``auto`` tries them (JAX's order). ``auto``
initializes only when the first present one shows more than one process; a named one that is
present is used unless it shows at most one (a one-task job stays single-process)."""


def detect_cluster(method: str = "auto", env: Mapping[str, str] | None = None) -> tuple[str, int | None] | None:
    """``(name, processes or None where the environment does not show them)`` for the cluster
    ``method`` names, or the first that ``auto`` sees in ``env`` (default ``os.environ``); None
    for ``off`` or when ``auto`` sees none. A named cluster that is not present raises."""
    env = os.environ if env is None else env
    if method == "off":
        return None
    if method == "auto":
        for cluster in CLUSTER_SIGNALS:
            if cluster.auto and cluster.present(env):
                return cluster.name, cluster.count(env)
        return None
    cluster = next((c for c in CLUSTER_SIGNALS if c.name == method), None)
    if cluster is None or not cluster.present(env):
        what = f"{cluster.name}: {cluster.signal}; " if cluster else ""
        raise ValueError(
            f"--distributed={method}: that cluster environment is not present here "
            f"({what}known: {[c.name for c in CLUSTER_SIGNALS]})"
        )
    return cluster.name, cluster.count(env)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    method: str | None = None,
    init_timeout: int | None = None,
    heartbeat_timeout: int | None = None,
    shutdown_timeout: int | None = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` when this is a multi-process job (see the module
    docstring for where the settings come from); returns True when it did (or had already).
    Must run before any JAX computation."""
    import jax

    if jax.distributed.is_initialized():
        return True
    method = method or os.environ.get(ENV_METHOD) or "auto"
    if method not in METHODS:
        raise ValueError(f"distributed method {method!r}: expected one of {METHODS}")
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _env_int(ENV_COUNT)
    pid = process_id if process_id is not None else _env_int(ENV_ID)
    timeouts = {}
    for what, given in (("init", init_timeout), ("heartbeat", heartbeat_timeout), ("shutdown", shutdown_timeout)):
        value = given if given is not None else _env_int(ENV_TIMEOUTS[what])
        value = DEFAULT_TIMEOUTS[what] if value is None else value
        if value < 1:
            raise ValueError(f"distributed {what} timeout {value}: expected >= 1 second")
        timeouts[what] = value
    if method == "off" or count == 1:
        if count == 1 and pid not in (None, 0):
            raise ValueError(f"process_id={pid} with num_processes=1: expected process_id 0")
        return False
    if address is None or count is None or pid is None:
        found = detect_cluster(method)
        if found is None:
            given = {
                k: v
                for k, v in (("coordinator_address", address), ("num_processes", count), ("process_id", pid))
                if v is not None
            }
            if given:
                missing = [k for k in ("coordinator_address", "num_processes", "process_id") if k not in given]
                raise ValueError(
                    f"distributed settings {given} are incomplete and no cluster was detected: "
                    f"expected {missing} too (flags --{' --'.join(missing)} or env "
                    f"{ENV_ADDRESS}/{ENV_COUNT}/{ENV_ID})"
                )
            return False  # a plain single-process run
        detection, seen = found
        if count is None and seen is not None and seen <= 1:
            return False  # a one-process cluster job: nothing to coordinate
    else:
        if count < 1 or not 0 <= pid < count:
            raise ValueError(f"process_id={pid}, num_processes={count}: expected 0 <= process_id < num_processes")
        detection = "deactivate"
    if (
        os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
        and "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            address,
            count,
            pid,
            cluster_detection_method=detection,
            initialization_timeout=timeouts["init"],
            heartbeat_timeout_seconds=timeouts["heartbeat"],
            shutdown_timeout_seconds=timeouts["shutdown"],
        )
    except RuntimeError as e:
        if "before any JAX" in str(e) or "backend" in str(e).lower():
            raise RuntimeError(
                f"jax.distributed.initialize must run before any JAX computation: call "
                f"jaxapr.distributed.initialize_from_flags() first in main ({e})"
            ) from None
        raise
    _exit_fast_on_uncaught_errors()
    return True


def _exit_fast_on_uncaught_errors() -> None:
    """An uncaught exception prints its traceback and exits at once: the normal exit would wait
    at JAX's shutdown barrier (up to the shutdown timeout) for processes that are dead or blocked
    in a collective on this one."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            previous(exc_type, exc, tb)
            print(
                f"{_prefix()}exiting on an uncaught {exc_type.__name__} without waiting for the other processes",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
        finally:
            os._exit(130 if issubclass(exc_type, KeyboardInterrupt) else 1)

    sys.excepthook = hook


# --------------------------------------------------------------------------------------
# who am I, barriers, logging
# --------------------------------------------------------------------------------------
def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_main() -> bool:
    """True on process 0 (the one that logs and writes shared files)."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op with one process). Every
    process must call the same barriers in the same order; names that differ raise.

    ``multihost_utils.sync_global_devices``: a small all-gather of the name's hash over every
    device, so it is also a point where no device work is left in flight. No public API bounds
    the wait; a process that died is caught by JAX's coordination service once it misses
    heartbeats for ``--distributed_heartbeat_timeout`` seconds (the other processes then stop),
    and on CPU gloo fails the collective as soon as the dead process's connection closes."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    barrier_id = f"jaxapr:{name}:{next(_barrier_counter)}"
    try:
        multihost_utils.sync_global_devices(barrier_id)
    except AssertionError as e:  # the processes called different barriers
        raise RuntimeError(f"barrier {name!r} on process {jax.process_index()}: {e}") from None


def _prefix() -> str:
    import jax

    return f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""


def log(*args, file=None, **kw) -> None:
    """``print`` on process 0 only (flushed)."""
    if is_main():
        print(*args, file=file, flush=True, **kw)


def log_all(message: str, file=None) -> None:
    """``print`` on every process, each line prefixed with its index when there are several."""
    prefix = _prefix()
    print("\n".join(prefix + line for line in str(message).split("\n")), file=file or sys.stdout, flush=True)


def quiet_other_processes() -> None:
    """absl logging at ERROR on processes other than 0 (their INFO/WARNING lines repeat
    process 0's)."""
    if not is_main():
        from absl import logging

        logging.set_verbosity(logging.ERROR)


def fail(message: str, code: int = 1) -> None:
    """Print ``message`` (prefixed with the process) to stderr and exit with ``code``. With
    several processes it exits at once (``os._exit``) instead of waiting at JAX's shutdown
    barrier for processes that may be blocked on this one; the launcher or the cluster then
    stops the rest."""
    import jax

    many = jax.distributed.is_initialized() and jax.process_count() > 1
    print(_prefix() + message, file=sys.stderr, flush=True)
    if many:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


# --------------------------------------------------------------------------------------
# small values across processes
# --------------------------------------------------------------------------------------
def allgather(x) -> np.ndarray:
    """numpy ``[process_count, *x.shape]``: ``x`` (host data of the same shape and dtype on
    every process) from every process, in process order. The bytes travel, so 64-bit values
    stay exact (JAX would otherwise narrow them to 32 bits)."""
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(x.tobytes(), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(raw, tiled=False))
    return np.stack([np.frombuffer(row.tobytes(), x.dtype).reshape(x.shape) for row in rows])


def allgather_json(value: Any) -> list:
    """Every process's ``value`` (JSON data, any size per process), in process order."""
    import jax

    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = allgather(np.array(len(raw), np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(raw)] = raw
    rows = allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes.tolist())]


def sum_across(values: dict) -> dict:
    """``{name: sum over processes of value}`` for a dict of numbers (float64)."""
    names = sorted(values)
    total = allgather(np.array([float(values[k]) for k in names], np.float64)).sum(axis=0)
    return {k: float(v) for k, v in zip(names, total)}


def max_across(value: float) -> float:
    return float(allgather(np.array(float(value), np.float64)).max())


def run_on_main(fn, *args):
    """``fn(*args)`` on process 0 alone (its result there, None elsewhere). A ``ValueError``
    it raises is raised on every process (on the others as a ``ValueError`` with the same
    message), so no process goes on to wait in a collective for one that stopped."""
    result, error = None, None
    if is_main():
        try:
            result = fn(*args)
        except ValueError as e:
            if process_count() == 1:
                raise
            error = e
    if process_count() > 1:
        message = next((m for m in allgather_json(None if error is None else str(error)) if m), None)
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(message)
    return result


# --------------------------------------------------------------------------------------
# arrays
# --------------------------------------------------------------------------------------
_replicators: dict = {}


def process_local(tree):
    """A copy of ``tree`` (global jax arrays) that lives on this process's first local device
    alone: what a per-process engine decodes with. One process: ``tree`` itself. With several,
    a fully replicated leaf gives its local shard (no copy); other leaves are first gathered to
    a replicated copy on their mesh (a collective: every process must call this together)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    todo = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated
    ]
    if todo:
        mesh = leaves[todo[0]].sharding.mesh
        fn = _replicators.get(mesh)
        if fn is None:
            fn = _replicators[mesh] = jax.jit(lambda xs: xs, out_shardings=NamedSharding(mesh, PartitionSpec()))
        gathered = fn([leaves[i] for i in todo])
        for i, x in zip(todo, gathered):
            leaves[i] = x
    out = []
    for x in leaves:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_shards[0].data
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def put_global(tree, shardings):
    """``jax.device_put(tree, shardings)`` for host data (numpy or process-local arrays) that is
    the same on every process; with several processes each one places only its addressable
    pieces (``jax.make_array_from_callback``), without the equality check's collectives."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def share(n: int, index: int | None = None, count: int | None = None) -> range:
    """The contiguous indices of ``range(n)`` that process ``index`` of ``count`` (default:
    this one) owns, when ``n`` splits evenly; raises a one-line error when it does not."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    if n % count:
        raise ValueError(f"{n} items do not split evenly over {count} processes: expected a multiple of {count}")
    per = n // count
    return range(index * per, (index + 1) * per)


__all__ = [
    "CLUSTER_SIGNALS",
    "METHODS",
    "ClusterSignal",
    "allgather",
    "allgather_json",
    "barrier",
    "define_flags",
    "detect_cluster",
    "fail",
    "initialize",
    "initialize_from_flags",
    "is_main",
    "log",
    "log_all",
    "max_across",
    "process_count",
    "process_index",
    "process_local",
    "put_global",
    "quiet_other_processes",
    "run_on_main",
    "share",
    "sum_across",
]
