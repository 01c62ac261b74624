"""A training run on its devices: the mesh and partition rules of a run config, the train
state placed on the mesh, batches placed on it, and results brought back to the host."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxapr import distributed, sharding
from jaxapr import model as model_lib


def make_run_mesh(config):
    """The mesh of ``config.mesh`` over all (global) devices; -1 = all remaining devices."""
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
    """The partition rules ``config.rules`` names (``"auto"``: ``sharding.rules_for(cfg)``)."""
    name = config.get("rules", "auto")
    if name == "auto":
        return sharding.rules_for(cfg)
    if name not in sharding.RULES:
        raise ValueError(f"config.rules={name!r}: expected 'auto' or one of {sorted(sharding.RULES)}")
    return sharding.RULES[name]


def check_batch_fits(batch_size: int, accum_steps: int, mesh) -> None:
    """Each micro-batch splits evenly over the data-parallel devices (data x fsdp)."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % accum_steps or (batch_size // accum_steps) % ways:
        raise ValueError(
            f"batch_size={batch_size} with accum_steps={accum_steps}: each micro-batch "
            f"({batch_size / accum_steps:g} rows) must be divisible by data x fsdp = {ways}"
        )


def init_state_on_mesh(policy: nnx.Module, tx, mesh, rules):
    """(graphdef, TrainState at step 0, its shardings): parameters placed by ``rules``, the
    optimizer state initialised under jit so its moments follow their parameters."""
    graphdef, params = nnx.split(policy)
    make, shardings = _state_layout(policy, tx, mesh, rules)
    param_sh = sharding.param_shardings(policy, mesh, rules)
    state = jax.jit(make, out_shardings=shardings)(distributed.put_global(params, param_sh))
    return graphdef, state, shardings


def abstract_state_on_mesh(policy: nnx.Module, tx, mesh, rules):
    """(graphdef, the TrainState of ``init_state_on_mesh`` as ``jax.ShapeDtypeStruct`` leaves
    with their shardings, the shardings) for a policy that may be abstract
    (``nnx.eval_shape``): what a step compiles against, nothing allocated."""
    graphdef, params = nnx.split(policy)
    make, shardings = _state_layout(policy, tx, mesh, rules)
    shapes = jax.eval_shape(make, params)
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)
    return graphdef, state, shardings


def _state_layout(policy: nnx.Module, tx, mesh, rules):
    """(params -> TrainState at step 0, the state's shardings)."""
    from jaxapr.train.state import TrainState

    params = nnx.split(policy)[1]
    param_sh = sharding.param_shardings(policy, mesh, rules)
    by_path = {
        tuple(path): (sh, leaf.shape)
        for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(param_sh)[0], jax.tree.leaves(params))
    }
    rep = sharding.replicated(mesh)

    def like_param(path, leaf):  # optimizer moments mirror their parameter's path (as a suffix)
        for n in range(len(path)):
            hit = by_path.get(tuple(path[n:]))
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return rep

    make = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
    return make, jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(make, params))


def batch_to_device(batch: dict, mesh) -> dict:
    """This process's rows of the global batch onto the mesh: with P processes the global batch
    is the concatenation of the processes' batches in process order (P x the rows)."""
    s = sharding.data_sharding(mesh)
    if mesh.devices.size == 1:
        return {k: np.asarray(v) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in batch.items()}


def host(tree) -> Any:
    """``tree`` on the host: scalars as Python numbers, other arrays as numpy."""
    return jax.tree.map(
        lambda x: x.item() if hasattr(x, "item") and np.ndim(x) == 0 else np.asarray(x), jax.device_get(tree)
    )
