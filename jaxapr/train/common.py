"""What the SFT and GRPO runs share: the policy and mesh from a config, placing state and
batches on the mesh, config checks, a NaN guard.

A run config is an ``ml_collections.ConfigDict`` (see ``experiments/configs/sft.py`` and
``rl.py``) with at least ``model`` (every ``model.ModelConfig`` field), ``mesh`` (``data``,
``fsdp``, ``tensor``; -1 = all remaining devices) and ``rules`` (a ``sharding.RULES`` name or
``"auto"``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxapr import distributed
from jaxapr import model as model_lib
from jaxapr import sharding


class TrainingError(RuntimeError):
    """A run stopped on purpose (NaN loss, bad data); the last good checkpoint is intact."""


def to_dict(config) -> dict:
    return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def model_config(config) -> model_lib.ModelConfig:
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    given = to_dict(config.model)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown fields {unknown}: expected some of {sorted(fields)}")
    return model_lib.ModelConfig(**given).check()


def make_run_mesh(config):
    """The mesh of ``config.mesh`` over all (global) devices."""
    m = config.mesh
    sizes = {"data": int(m.data), "fsdp": int(m.fsdp), "tensor": int(m.tensor)}
    n = jax.device_count()
    fixed = math.prod(v for v in sizes.values() if v > 0)
    free = [k for k, v in sizes.items() if v < 0]
    if len(free) > 1:
        raise ValueError(f"config.mesh={sizes}: at most one axis may be -1 (all remaining devices)")
    if free:
        if n % fixed:
            raise ValueError(f"config.mesh={sizes}: {n} devices are not divisible by {fixed}")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(f"config.mesh={sizes} has {math.prod(sizes.values())} devices: expected {n} (all devices)")
    return sharding.make_mesh(**sizes)


def run_rules(config, cfg: model_lib.ModelConfig):
    name = config.get("rules", "auto")
    if name == "auto":
        return sharding.rules_for(cfg)
    if name not in sharding.RULES:
        raise ValueError(f"config.rules={name!r}: expected 'auto' or one of {sorted(sharding.RULES)}")
    return sharding.RULES[name]


def check_batch_fits(batch_size: int, accum_steps: int, mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % accum_steps or (batch_size // accum_steps) % ways:
        raise ValueError(f"batch_size={batch_size} with accum_steps={accum_steps}: each micro-batch "
                         f"({batch_size / accum_steps:g} rows) must be divisible by data x fsdp = {ways}")


def check_memory(cfg: model_lib.ModelConfig, batch_size: int, seq_len: int, accum_steps: int, what: str = "training") -> None:
    """Fail fast when a preset clearly does not fit this machine's memory (host RAM on CPU)."""
    params = model_lib.param_count(cfg)
    micro = batch_size // max(accum_steps, 1)
    # params + grads + 2 Adam moments + reference (f32), activations ~ 34 * d * L per layer-token
    # plus the float32 logits; a rough upper bound, conservative by design.
    need = 5 * 4 * params + micro * seq_len * (cfg.num_layers * 34 * cfg.d_model + 3 * cfg.vocab_size) * 4
    avail = _available_bytes()
    if avail and need > avail:
        raise ValueError(f"{what} needs about {need / 2**30:.1f} GiB (model d_model={cfg.d_model}, "
                         f"{cfg.num_layers} layers, micro-batch {micro} x {seq_len}) but this machine has "
                         f"{avail / 2**30:.1f} GiB available: use a smaller preset, batch or seq_len, or more accum_steps")


def _available_bytes() -> int | None:
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def init_state_on_mesh(policy: nnx.Module, tx, mesh, rules):
    """(graphdef, TrainState at step 0, its shardings): parameters placed by ``rules``, the
    optimizer state initialised under jit so its moments follow their parameters."""
    import jax.numpy as jnp

    from jaxapr.train.state import TrainState

    graphdef, params = nnx.split(policy)
    param_sh = sharding.param_shardings(policy, mesh, rules)
    by_path = {tuple(path): (sh, leaf.shape) for (path, sh), leaf in zip(
        jax.tree_util.tree_flatten_with_path(param_sh)[0], jax.tree.leaves(params))}
    rep = sharding.replicated(mesh)

    def like_param(path, leaf):  # optimizer moments mirror their parameter's path (as a suffix)
        for n in range(len(path)):
            hit = by_path.get(tuple(path[n:]))
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return rep

    make = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))  # noqa: E731
    shardings = jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(make, params))
    state = jax.jit(make, out_shardings=shardings)(distributed.put_global(params, param_sh))
    return graphdef, state, shardings


def batch_to_device(batch: dict, mesh) -> dict:
    """This process's rows of the global batch onto the mesh: with P processes the global batch
    is the concatenation of the processes' batches in process order (P x the rows)."""
    s = sharding.data_sharding(mesh)
    if mesh.devices.size == 1:
        return {k: np.asarray(v) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in batch.items()}


def check_finite(metrics: dict, step: int) -> None:
    loss = float(metrics.get("loss", 0.0))
    if not bool(metrics.get("finite", True)) or not np.isfinite(loss):
        raise TrainingError(f"non-finite loss {loss} at step {step}: stopped (the update was not applied; the last "
                            "good checkpoint is intact) - lower the learning rate or check the data")


def host(tree) -> Any:
    return jax.tree.map(lambda x: x.item() if hasattr(x, "item") and np.ndim(x) == 0 else np.asarray(x), jax.device_get(tree))


def make_policy(cfg: model_lib.ModelConfig, seed: int) -> nnx.Module:
    return model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))


def ensure_workdir(workdir: str | None) -> str:
    if not workdir:
        raise ValueError("--workdir is required: expected a directory for checkpoints and metrics")
    os.makedirs(workdir, exist_ok=True)
    return workdir


def matmul_peak_flops(n: int | None = None, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a jitted ``dtype`` [n, n] @ [n, n] on the default device (random operands):
    the reference peak that "fraction of peak" figures are measured against (in the same run).
    Use the model's compute dtype: on GPU/TPU a bfloat16 product runs several times faster
    than a float32 one. ``n`` defaults to 2,048 on a CPU and 8,192 on an accelerator (a
    smaller product does not fill it)."""
    import jax.numpy as jnp

    n = n or (2048 if jax.default_backend() == "cpu" else 8192)

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def read_last_eval(workdir: str) -> dict | None:
    """The newest line of ``metrics.jsonl`` with validation metrics (``val/...``)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if any(k.startswith("val/") for k in row):
                last = row
    return last


def run_training(train, config, workdir: str) -> dict:
    """What ``train_sft`` / ``train_rl`` do around ``train(config, workdir, log=...)``: quiet
    logs, the resolved config and the summary from process 0, and user errors (bad config,
    missing data, a NaN loss) as one line and exit status 1."""
    from jaxapr import distributed

    quiet_logs()
    distributed.quiet_other_processes()
    distributed.log(f"resolved config:\n{config}")
    try:
        summary = train(config, workdir, log=distributed.log)
    except (ValueError, FileNotFoundError, KeyError, TrainingError) as e:
        distributed.fail(f"error: {e}")
    distributed.log("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in summary.items()))
    return summary


def quiet_logs() -> None:
    """absl INFO logs (orbax writes several lines per save) off; warnings stay."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def make_run_optimizer(config):
    """(tx, schedule) from ``config.optim`` and ``config.num_steps`` (SFT and GRPO alike)."""
    from jaxapr.train.state import make_optimizer

    o = config.optim
    if o.warmup_steps > config.num_steps:
        raise ValueError(f"config.optim.warmup_steps={o.warmup_steps} is more than config.num_steps={config.num_steps}")
    return make_optimizer(o.learning_rate, total_steps=config.num_steps, warmup_steps=o.warmup_steps,
                          schedule=o.schedule, end_fraction=o.end_fraction, weight_decay=o.weight_decay, b1=o.b1,
                          b2=o.b2, clip_norm=o.clip_norm)


def best_step(ckpt) -> int | None:
    """The kept checkpoint with the highest ``val/accuracy`` (ties: the later), else the
    lowest ``val/loss``; None when no kept checkpoint has validation metrics."""
    scored = []
    for step in ckpt.all_steps():
        m = ckpt.metadata(step).get("metrics") or {}
        if "val/accuracy" in m:
            scored.append(((1, float(m["val/accuracy"]), step), step))
        elif "val/loss" in m:
            scored.append(((0, -float(m["val/loss"]), step), step))
    return max(scored)[1] if scored else None


def load_params(workdir: str, which: str = "best", step: int | None = None):
    """(ModelConfig, params, run config) of a run's checkpoint: ``which`` = "best" (see
    :func:`best_step`; the latest when no checkpoint has validation metrics) or "latest", or
    an explicit ``step``. The config is the one saved in the checkpoint. :func:`load_policy`
    makes the policy. ``workdir`` may also be an exported ``.npz`` (:func:`export_policy`):
    its parameters, and a run config holding its ``model`` (and its metadata as ``exported``)."""
    from ml_collections import ConfigDict

    from jaxapr.train.checkpoint import Checkpointer
    from jaxapr.train.state import abstract_train_state

    if workdir.endswith(".npz"):
        policy, meta = load_exported(workdir)
        return policy.cfg, nnx.split(policy)[1], ConfigDict({"model": meta["model"], "exported": meta["extra"]})
    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {workdir!r}: expected the workdir of a train_sft / train_rl run")
    ckpt = Checkpointer(directory, config={}, compare_keys=())
    try:
        if step is None and which == "best":
            step = best_step(ckpt)
        config = ConfigDict(ckpt.metadata(step)["config"])
        cfg = model_config(config)
        tx, _ = make_run_optimizer(optimizer_config(config))
        _, abstract_params = nnx.split(nnx.eval_shape(lambda: make_policy(cfg, 0)))
        state, _ = ckpt.restore(abstract_train_state(tx, abstract_params), step=step)
    finally:
        ckpt.close()
    return cfg, state.params, config


def optimizer_config(config):
    """The config whose ``make_run_optimizer`` gives a run's optimizer state structure (GRPO
    runs count optimizer updates, not RL steps)."""
    if "grpo" not in config:
        return config
    c = config.copy_and_resolve_references()
    per = int(config.grpo.inner_epochs) * int(config.grpo.num_minibatches)
    with c.unlocked():
        c.num_steps = config.num_steps * per
        c.optim.warmup_steps = config.optim.warmup_steps * per
    return c


def load_policy(workdir: str, which: str = "best", step: int | None = None) -> nnx.Module:
    """The policy of a run's checkpoint (see :func:`load_params`), or of an exported ``.npz``
    (:func:`export_policy`) when ``workdir`` is such a file."""
    if workdir.endswith(".npz"):
        return load_exported(workdir)[0]
    cfg, params, _ = load_params(workdir, which, step)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_policy(cfg, 0)))
    return nnx.merge(graphdef, params)


EXPORT_FORMAT = "jaxapr.policy/1"


def export_policy(policy: nnx.Module, path: str, dtype: str = "bfloat16", extra: dict | None = None) -> str:
    """Writes ``policy`` as one compact ``.npz`` (parameters in ``dtype``, the model config and
    ``extra`` as JSON): what the repository ships; :func:`load_policy` reads it back."""
    import ml_dtypes

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
    _, params = nnx.split(policy)
    flat = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
        arr = np.asarray(leaf, np.float32)
        flat[name] = arr.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bfloat16" else arr.astype(dtype)
    meta = {"format": EXPORT_FORMAT, "dtype": dtype, "model": dataclasses.asdict(policy.cfg), "extra": extra or {}}
    path = path if path.endswith(".npz") else path + ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **flat)
    return path


def _read_exported(path: str, arrays: bool) -> tuple[dict, dict]:
    """(meta, parameter arrays if ``arrays`` else {}) of an :func:`export_policy` file, with
    one-line errors for a missing, unreadable or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported policy at {path!r}: expected a .npz written by export_policy")
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["__meta__"]))
            params = {k: f[k] for k in f.files if k != "__meta__"} if arrays else {}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path!r} is not a readable exported policy ({type(e).__name__}: {e})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path!r} has format {meta.get('format')!r}: expected {EXPORT_FORMAT!r}")
    return meta, params


def exported_meta(path: str) -> dict:
    """The metadata of an :func:`export_policy` file (model config, dtype, ``extra``) without
    reading its parameters."""
    return _read_exported(path, arrays=False)[0]


def load_exported(path: str) -> tuple[nnx.Module, dict]:
    """(policy, meta) of a file written by :func:`export_policy` (parameters as float32)."""
    import ml_dtypes

    meta, arrays = _read_exported(path, arrays=True)
    cfg = model_lib.ModelConfig(**meta["model"]).check()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make_policy(cfg, 0)))
    leaves = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
        if name not in arrays:
            raise ValueError(f"{path!r} lacks parameter {name!r}: expected a policy of its model config")
        arr = arrays[name]
        arr = arr.view(ml_dtypes.bfloat16) if meta["dtype"] == "bfloat16" else arr
        if arr.shape != leaf.shape:
            raise ValueError(f"{path!r}: parameter {name!r} has shape {arr.shape}, expected {leaf.shape}")
        leaves.append(jax.numpy.asarray(arr.astype(np.float32), leaf.dtype))
    params = jax.tree.unflatten(jax.tree.structure(abstract), leaves)
    return nnx.merge(graphdef, params), meta
