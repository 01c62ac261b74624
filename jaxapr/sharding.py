"""Meshes and partition rules: how the policy's parameters and batches lie on devices.

Every parameter of ``jaxapr.model`` carries logical axis names (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``norm``). A *rule set* maps each logical name to a mesh
axis (or a tuple of mesh axes, or None = replicated) of a 3-axis mesh ``("data", "fsdp",
"tensor")``:

- ``replicated`` (tiny, mini): every parameter on every device; batches split over
  ``("data", "fsdp")`` (plain data parallelism).
- ``fsdp_tp`` (paper): ``embed`` split over ``fsdp`` (ZeRO-3 style), ``heads``, ``kv_heads``,
  ``mlp`` and ``vocab`` split over ``tensor`` (Megatron style), ``norm`` and ``head_dim``
  replicated.

The activation name ``batch`` (the first axis of a batch or of a KV cache) maps to ``("data",
"fsdp")`` in both sets.

**Non-divisible dimensions fall back to replication.** A mesh axis whose size does not divide
the dimension it would split is dropped for that dimension (for a tuple of axes, the longest
prefix whose product divides is kept). So the Countdown vocabulary of 335 (odd) is replicated
under ``tensor=2`` while every other parameter is split; nothing raises.

The modern form of ``pjit`` is ``jax.jit(f, in_shardings=..., out_shardings=...)`` over the
``nnx.split`` state: see :func:`sharded_forward`. Meshes use ``AxisType.Auto`` (the compiler
propagates shardings through the model, which carries no sharding constraints of its own);
note that ``jax.make_mesh`` defaults to ``Explicit`` axes in this jax version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxapr.model import CACHE_AXES, PRESETS, ModelConfig, get_config, param_count

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis | tuple of mesh axes | None)
Rules = tuple[tuple[str, Any], ...]

RULES: dict[str, Rules] = {
    "replicated": (
        ("batch", BATCH_AXES),
        ("vocab", None),
        ("embed", None),
        ("heads", None),
        ("kv_heads", None),
        ("head_dim", None),
        ("mlp", None),
        ("norm", None),
    ),
    "fsdp_tp": (
        ("batch", BATCH_AXES),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("norm", None),
    ),
}

# Presets that use fsdp_tp by name; a bare ModelConfig uses it from this size on.
FSDP_TP_PRESETS = ("paper",)
FSDP_TP_MIN_PARAMS = 100_000_000


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all); one size may be
    -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: expected positive ints, at most one -1"
        )
    if -1 in sizes:
        known = -math.prod(sizes)
        if len(devices) % known:
            raise ValueError(
                f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: "
                f"{len(devices)} devices are not a multiple of {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices: "
            f"expected {len(devices)} (the device count)"
        )
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def rules_for(what: str | ModelConfig, **overrides) -> Rules:
    """The rule set for a preset name, a rule-set name or a ``ModelConfig`` (paper or >= 100M
    parameters -> ``fsdp_tp``, else ``replicated``); ``overrides`` replace single entries,
    e.g. ``rules_for("paper", vocab=None)``."""
    if isinstance(what, ModelConfig):
        big = what == PRESETS["paper"] or param_count(what) >= FSDP_TP_MIN_PARAMS
        name = "fsdp_tp" if big else "replicated"
    elif what in RULES:
        name = what
    else:
        get_config(what)  # one-line error for an unknown preset
        name = "fsdp_tp" if what in FSDP_TP_PRESETS else "replicated"
    rules = dict(RULES[name])
    for logical, axes in overrides.items():
        if logical not in rules:
            raise ValueError(f"rule override for unknown logical axis {logical!r}: expected one of {sorted(rules)}")
        rules[logical] = axes
    return tuple(rules.items())


def logical_to_mesh(spec: Sequence | PartitionSpec, rules: Rules) -> PartitionSpec:
    """Map a logical spec (e.g. ``("embed", "heads", "head_dim")``) to a mesh PartitionSpec."""
    table = dict(rules)
    out = []
    for name in spec:
        if name is None:
            out.append(None)
        elif name in table:
            out.append(table[name])
        else:
            raise ValueError(f"logical axis {name!r} has no rule: expected one of {sorted(table)}")
    return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop the mesh axes that do not divide their dimension (or are already used by an
    earlier dimension): those dimensions are replicated instead."""
    used: set[str] = set()
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept: list[str] = []
        for axis in axes:
            if axis in used or dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
                break
            kept.append(axis)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules) -> nnx.Variable:
    logical = var.get_metadata().get("out_sharding") or ()
    spec = fit_spec(logical_to_mesh(logical, rules), var.shape, mesh)
    return var.replace(NamedSharding(mesh, spec))


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings with the structure of ``nnx.state(model, nnx.Param)`` (or of the given
    state), for ``jax.device_put`` and ``jax.jit(in_shardings=...)``."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return jax.tree.map(
        lambda v: _variable_sharding(v, mesh, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Place the model's parameters on ``mesh`` by ``rules`` (in place); returns the model."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def data_sharding(mesh: Mesh) -> NamedSharding:
    """A batch whose first axis is split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def rows_sharding(state_shardings, batch_sharding=None) -> NamedSharding | None:
    """How a train step splits the rows of its (micro-)batches: ``batch_sharding`` when given,
    else ``data_sharding`` of the mesh the state lives on (``state_shardings``); None without a
    mesh."""
    if batch_sharding is not None or state_shardings is None:
        return batch_sharding
    return data_sharding(jax.tree.leaves(state_shardings)[0].mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def cache_sharding(mesh: Mesh, rules: Rules, name: str, shape: Sequence[int]) -> NamedSharding:
    """The sharding of one layer's KV cache array ``name`` ("k" or "v") of ``shape``
    (``model.CACHE_AXES``): slots split like a batch, heads like ``kv_heads``."""
    spec = logical_to_mesh(CACHE_AXES[name], rules)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def _check_batch(batch: int, mesh: Mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % ways:
        raise ValueError(f"batch size {batch} is not divisible by data x fsdp = {ways} on this mesh")


def sharded_forward(model: nnx.Module, mesh: Mesh, rules: Rules) -> Callable:
    """A jitted training forward ``(tokens, positions=None, segment_ids=None) -> logits`` with
    the parameters split by ``rules`` and the batch split over ``("data", "fsdp")``.

    The modern ``pjit``: ``nnx.split`` the model, place the state, and ``jax.jit`` a pure
    function of (state, inputs) with ``in_shardings`` / ``out_shardings``. The parameters are
    copied onto the mesh now: later changes to ``model`` are not seen (build a new forward).
    """
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    batch = data_sharding(mesh)

    def forward(state, tokens, positions, segment_ids):
        return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

    jitted = jax.jit(forward, in_shardings=(shardings, batch, batch, batch), out_shardings=batch)

    def run(tokens, positions=None, segment_ids=None):
        b, t = tokens.shape
        _check_batch(b, mesh)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        return jitted(state, tokens, positions, segment_ids)

    return run


def sharded_forward_cached(model: nnx.Module, mesh: Mesh, rules: Rules) -> Callable:
    """A jitted ``(tokens, positions, cache, write_mask=None) -> (logits, cache)`` (see
    ``Transformer.forward_cached``) with parameters split by ``rules``, slots split like a batch
    (``cache_sharding``) and the cache donated: don't reuse the cache you pass in. Parameters
    are captured now, as in :func:`sharded_forward`."""
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    batch = data_sharding(mesh)
    compiled: dict[tuple, tuple] = {}  # cache shape -> (jitted, cache shardings)

    def forward(state, tokens, positions, cache, write_mask):
        return nnx.merge(graphdef, state).forward_cached(tokens, positions, cache, write_mask)

    def run(tokens, positions, cache, write_mask=None):
        _check_batch(tokens.shape[0], mesh)
        if write_mask is None:
            write_mask = jnp.ones(tokens.shape, bool)
        shape = (cache["k"][0].shape, len(cache["k"]))
        if shape not in compiled:
            kv = {name: tuple(cache_sharding(mesh, rules, name, c.shape) for c in cache[name]) for name in cache}
            compiled[shape] = (
                jax.jit(
                    forward,
                    in_shardings=(shardings, batch, batch, kv, batch),
                    out_shardings=(batch, kv),
                    donate_argnums=(3,),
                ),
                kv,
            )
        jitted, kv = compiled[shape]
        return jitted(state, tokens, positions, jax.device_put(cache, kv), write_mask)

    return run
