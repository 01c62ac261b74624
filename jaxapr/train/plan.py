"""Memory per device of a training run, planned before anything is allocated.

A plan lists what one device holds at the step's peak: the train state (parameters and
optimizer moments, donated to the step), the batch, the step's temporaries (activations kept
for the backward, gradients, optimizer updates) and, for GRPO, the frozen reference
parameters and the rollout engine's KV cache, which stays resident while the update runs.

Two ways to get the step's part, same table:

- ``compiled``: the train step is lowered and compiled for the run's mesh against
  ``jax.ShapeDtypeStruct`` arguments with their shardings (``nnx.eval_shape``: no parameter is
  allocated) and ``memory_analysis()`` gives its per-device argument, output, alias and
  temporary bytes; the peak is ``arguments + outputs - aliased + temporaries``. Exact for the
  backend it compiles on, seconds to minutes of compile.
- ``analytic``: the state's bytes from the same shardings (exact), the activations from a
  per-token formula (a rough figure: above the compiled one on small configs, below it at the
  paper's 4,096-token rows, where the compiled attention's working set grows with the square
  of the row). Milliseconds.

The training scripts check (``check_run``) before the first step with the analytic plan and
compile only when the analytic peak falls in ``ANALYTIC_BAND`` of the device's memory, so the
tiny and mini presets never pay a compile for it while a run near the limit is judged by the
compiled figure. ``experiments.plan`` prints either.

The device's memory (``device_bytes``): on an accelerator its allocator's ``bytes_limit``
(JAX's default is 75% of the memory: ``XLA_PYTHON_CLIENT_MEM_FRACTION``); on a CPU the host's
available memory split evenly over the local devices (fake CPU devices share the host).
Planning a GPU or TPU run from a CPU host takes the target's figure from ``--device_bytes``.
A compile on a CPU host runs the CPU kernels (``jaxapr.kernels``): their attention keeps only
q, k, v, the output and the log-sum-exp, as a fused kernel does; ``kernels="xla"`` plans the
accelerators' blocked path (per-block ``dot_product_attention``, which keeps its
probabilities).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp

GiB = 2**30
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text) -> int:
    """``"80GiB"``, ``"16gb"``, ``"1.5e9"`` or an int -> bytes; one-line error otherwise."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    try:
        value = float(m.group(1)) * _UNITS[unit] if m and unit in _UNITS else -1.0
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"device_bytes={text!r}: expected a positive size such as 85899345920, 80GiB or 16GB")
    return int(value)


def device_bytes() -> int | None:
    """The memory one device may use (see the module docstring); None when unknown."""
    from jaxapr.train import machine

    avail = machine.available_bytes()
    if avail and jax.devices()[0].platform == "cpu":
        return avail // max(jax.local_device_count(), 1)
    return avail


@dataclasses.dataclass
class Plan:
    what: str  # "SFT" | "GRPO"
    method: str  # "compiled" | "analytic"
    mesh: dict
    rows: list  # (item, bytes per device)
    peak_bytes_per_device: int
    device_bytes: int | None
    field: str  # the config field to change when it does not fit
    advice: str

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.peak_bytes_per_device <= self.device_bytes

    def summary(self) -> dict:
        return {
            "what": self.what,
            "method": self.method,
            "mesh": self.mesh,
            "peak_bytes_per_device": int(self.peak_bytes_per_device),
            "fits": self.fits,
            "device_bytes": self.device_bytes,
        }

    def table(self) -> str:
        n = math.prod(self.mesh.values())
        lines = [f"{self.what} memory per device ({self.method}; mesh {self.mesh}, {n} devices)"]
        lines += [f"  {name:<44} {b / GiB:9.2f} GiB" for name, b in self.rows]
        lines.append(f"  {'peak':<44} {self.peak_bytes_per_device / GiB:9.2f} GiB")
        if self.device_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {'device memory':<44} {self.device_bytes / GiB:9.2f} GiB: {verdict}")
        return "\n".join(lines)

    def error(self) -> str:
        return (
            f"{self.what} needs {self.peak_bytes_per_device / GiB:.1f} GiB per device ({self.method} plan; "
            f"largest: {max(self.rows, key=lambda r: r[1])[0]}) but a device has {self.device_bytes / GiB:.1f} GiB: "
            f"{self.advice}"
        )


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ``jax.ShapeDtypeStruct`` with shardings (the
    largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


# --------------------------------------------------------------------------------------
# the run's pieces, abstract
# --------------------------------------------------------------------------------------
def _setup(config, mesh):
    from flax import nnx

    from jaxapr import policy_io, sharding
    from jaxapr.train import mesh as mesh_lib
    from jaxapr.train import run_config

    cfg = run_config.model_config(config)
    mesh = mesh if mesh is not None else mesh_lib.make_run_mesh(config)
    rules = mesh_lib.run_rules(config, cfg)
    policy = nnx.eval_shape(lambda: policy_io.make_policy(cfg, 0))
    tx, schedule = run_config.make_optimizer(run_config.optimizer_config(config))
    graphdef, state, shardings = mesh_lib.abstract_state_on_mesh(policy, tx, mesh, rules)
    data = sharding.data_sharding(mesh)
    return cfg, mesh, tx, schedule, graphdef, state, shardings, data


def _options(config) -> dict:
    from jaxapr import model as model_lib

    remat, attention = config.get("remat", "none"), config.get("attention", "blocked")
    model_lib.check_train_options(remat, attention)
    return {"remat": remat, "attention": attention}


def _spec(shape, dtype, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def _ways(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _compile_memory(fn, *args, kernels: str | None = None) -> dict:
    from jaxapr import kernels as kernels_lib

    before = kernels_lib.IMPL
    if kernels is not None:
        kernels_lib.resolve(kernels)  # one-line error for a bad value
        kernels_lib.IMPL = kernels
    try:
        ma = fn.lower(*args).compile().memory_analysis()
    finally:
        kernels_lib.IMPL = before
    return {
        "argument": ma.argument_size_in_bytes,
        "output": ma.output_size_in_bytes,
        "alias": ma.alias_size_in_bytes,
        "temp": ma.temp_size_in_bytes,
    }


def _activation_bytes(cfg, rows: int, seq_len: int, remat: str, attention: str) -> int:
    """Analytic bytes of the forward's saved activations and one layer's working set for
    ``rows`` rows of ``seq_len`` tokens on one device (conservative)."""
    d, m, h, layers = cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_layers
    c = jnp.dtype(cfg.dtype).itemsize
    tokens = rows * seq_len
    block = (16 * d + 6 * m) * c + 8 * d  # everything one block keeps for its backward, per token
    kept = {"none": layers * block, "block": layers * d * c + block, "dots": layers * (4 * d + 3 * m) * c + block}
    scores = rows * h * seq_len * (seq_len if attention == "fused" else 128) * 4 * 2  # one layer's at once
    logits = tokens * cfg.vocab_size * 4 * 3
    return tokens * kept[remat] + scores + logits


# --------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------
def sft_plan(config, mesh=None, *, compiled: bool = True, kernels: str | None = None, limit=None) -> Plan:
    """The memory plan of ``experiments.train_sft`` with ``config`` on ``mesh`` (default:
    the run's mesh over this process's view of the devices)."""
    from jaxapr.train import mesh as mesh_lib
    from jaxapr.train import sft

    cfg, mesh, tx, schedule, graphdef, state, shardings, data = _setup(config, mesh)
    opts = _options(config)
    batch_size, seq_len, accum = int(config.batch_size), int(config.seq_len), int(config.accum_steps)
    mesh_lib.check_batch_fits(batch_size, accum, mesh)
    state_b = shard_bytes(state)
    batch = {k: _spec((batch_size, seq_len), jnp.int32, data) for k in sft.BATCH_KEYS}
    batch_b = shard_bytes(batch)
    if compiled:
        step = sft.make_sft_step(graphdef, tx, accum, schedule, state_shardings=shardings, batch_sharding=data, **opts)
        mem = _compile_memory(step, state, batch, kernels=kernels)
        rows = _compiled_rows(mem, {"train state (params + optimizer, donated)": state_b, "batch": batch_b})
    else:
        micro = -(-batch_size // accum // _ways(mesh))
        params_b = shard_bytes(state.params)
        rows = [
            ("train state (params + optimizer, donated)", state_b),
            ("batch", batch_b),
            ("gradients (+ their accumulator)", 2 * params_b),
            (
                f"activations ({micro} rows x {seq_len}, remat={opts['remat']})",
                _activation_bytes(cfg, micro, seq_len, **opts),
            ),
        ]
    return _plan("SFT", "compiled" if compiled else "analytic", mesh, rows, limit, _sft_advice(config, rows))


def _compiled_rows(mem: dict, known: dict) -> list:
    rows = list(known.items())
    rest = mem["argument"] - sum(known.values())
    if rest > 0:
        rows.append(("other arguments", rest))
    rows.append(("outputs not aliased to arguments", max(mem["output"] - mem["alias"], 0)))
    rows.append(("step temporaries (activations, gradients, updates)", mem["temp"]))
    return rows


def _sft_advice(config, rows) -> tuple[str, str]:
    largest = max(rows, key=lambda r: r[1])[0]
    if largest.startswith("train state"):
        return "mesh.fsdp", "set config.mesh.fsdp > 1 (shard parameters and moments) or use a smaller model"
    if config.get("remat", "none") == "none":
        return "remat", "set config.remat='block' (recompute each block in the backward)"
    return "accum_steps", f"raise config.accum_steps (now {config.accum_steps}): smaller micro-batches"


# --------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------
def rl_batch_rows(config, mesh) -> int:
    """Rows of the planned GRPO batch: ``rl.py``'s guess of two calls per rollout (packed),
    in the bucket the run would pad it to."""
    from jaxapr.train import rl

    g = rl.grpo_config(config)
    return rl.rows_per_process(g.num_problems * g.group_size * 2, g.num_minibatches, _ways(mesh), 1)


def kv_cache_bytes(config, cfg, mesh) -> tuple[int, int]:
    """(KV cache bytes, slot-state bytes) per device of the rollout engine: ``num_slots`` slots
    of ``max_context`` tokens, split over data x fsdp when ``config.shard_slots`` (KV heads
    over tensor where they divide), else all on one device."""
    from jaxapr import model as model_lib

    slots, ctx = int(config.num_slots), int(config.max_context)
    ways = _ways(mesh) if config.get("shard_slots", False) else 1
    tensor = mesh.shape["tensor"] if config.get("shard_slots", False) else 1
    per_slot = model_lib.cache_bytes_per_slot(cfg, max_len=ctx)
    heads = tensor if cfg.num_kv_heads % tensor == 0 else 1
    local = -(-slots // ways)
    return local * per_slot // heads, local * ctx * 8  # slot tokens int32 + log-probs float32


def rl_plan(config, mesh=None, *, compiled: bool = True, kernels: str | None = None, limit=None) -> Plan:
    """The memory plan of ``experiments.train_rl`` with ``config`` (``config.model`` filled:
    the policy's) on ``mesh``: the GRPO update, the reference parameters and the engine."""
    from jaxapr.train import grpo, rl

    cfg, mesh, tx, schedule, graphdef, state, shardings, data = _setup(config, mesh)
    opts = _options(config)
    g = rl.grpo_config(config)
    seq_len, n = int(config.max_context), rl_batch_rows(config, mesh)
    f32, i32 = jnp.float32, jnp.int32
    batch = {k: _spec((n, seq_len), i32, data) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    batch["old_logprobs"] = _spec((n, seq_len - 1), f32, data)
    if g.pack_calls:
        batch.update({k: _spec((n, seq_len - 1), f32, data) for k in ("token_advantages", "token_weights")})
    else:
        batch.update({k: _spec((n,), f32, data) for k in ("advantages", "weights")})
    ref = state.params if g.beta else None
    known = {"train state (params + optimizer, donated)": shard_bytes(state)}
    if ref is not None:
        known["reference params"] = shard_bytes(ref)
    known["batch"] = shard_bytes(batch)
    if compiled:
        step = grpo.make_grpo_step(graphdef, tx, g, schedule, state_shardings=shardings, batch_sharding=data, **opts)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        rows = _compiled_rows(_compile_memory(step, state, ref, batch, key, kernels=kernels), known)
    else:
        _, size = grpo.micro_chunks(n // g.num_minibatches, seq_len, g.micro_batch_tokens)
        micro = -(-size // _ways(mesh))
        rows = list(known.items())
        rows.append(("gradients (+ their accumulator)", 2 * shard_bytes(state.params)))
        rows.append(
            (
                f"activations ({micro} rows x {seq_len}, remat={opts['remat']})",
                _activation_bytes(cfg, micro, seq_len, **opts),
            )
        )
    cache, slot_state = kv_cache_bytes(config, cfg, mesh)
    rows.append((f"engine KV cache ({config.num_slots} slots x {seq_len})", cache))
    rows.append(("engine slot state", slot_state))
    return _plan("GRPO", "compiled" if compiled else "analytic", mesh, rows, limit, _rl_advice(config, rows))


def _rl_advice(config, rows) -> tuple[str, str]:
    largest = max(rows, key=lambda r: r[1])[0]
    if largest.startswith("engine"):
        if not config.get("shard_slots", False):
            return "shard_slots", "set config.shard_slots=True (split the slots over the data devices)"
        return "num_slots", f"lower config.num_slots (now {config.num_slots})"
    if largest.startswith(("train state", "reference")):
        return "mesh.fsdp", "set config.mesh.fsdp > 1 (shard parameters and moments) or use a smaller model"
    if config.get("remat", "none") == "none":
        return "remat", "set config.remat='block' (recompute each block in the backward)"
    return "grpo.micro_batch_tokens", f"lower config.grpo.micro_batch_tokens (now {config.grpo.micro_batch_tokens})"


def _plan(what, method, mesh, rows, limit, advice) -> Plan:
    limit = device_bytes() if limit is None else parse_bytes(limit)
    return Plan(
        what=what,
        method=method,
        mesh=dict(mesh.shape),
        rows=rows,
        peak_bytes_per_device=int(sum(b for _, b in rows)),
        device_bytes=limit,
        field=advice[0],
        advice=advice[1],
    )


# --------------------------------------------------------------------------------------
# the check before a run's first step
# --------------------------------------------------------------------------------------
# The band of analytic peaks (as fractions of the device's memory) where the compiled plan
# decides: below it the run fits, above it it does not, whatever the analytic estimate's error
# (BUILD_NOTES.md: its ratio to the compiled figure on the small and the paper configs).
ANALYTIC_BAND = (0.25, 2.0)


def check_run(config, what: str, mesh=None, limit=None, log=None) -> Plan:
    """Raise a one-line ``ValueError`` naming the config field to change when the run does
    not fit its devices. The analytic plan decides when its peak is below ``ANALYTIC_BAND[0]``
    of the device's memory (fits) or above ``ANALYTIC_BAND[1]`` of it (does not); in between
    the compiled plan decides. Returns the deciding plan."""
    make = {"sft": sft_plan, "rl": rl_plan}[what]
    plan = make(config, mesh, compiled=False, limit=limit)
    low, high = ANALYTIC_BAND
    if plan.device_bytes and low * plan.device_bytes <= plan.peak_bytes_per_device <= high * plan.device_bytes:
        plan = make(config, mesh, compiled=True, limit=limit)
        if log is not None:
            log(plan.table())
    if not plan.fits:
        raise ValueError(plan.error())
    return plan


def to_json(plan: Plan) -> str:
    return json.dumps(plan.summary())
