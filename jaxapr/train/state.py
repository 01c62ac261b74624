"""The training state and optimizer shared by SFT and GRPO.

``TrainState`` is a pytree (``flax.struct``) of ``step``, ``params`` (the policy's
``nnx.split`` state, the same structure ``engine.Engine.update_params`` takes) and
``opt_state``; the policy's ``graphdef`` stays outside, static. Train steps are pure jitted
functions ``(state, batch) -> (state, metrics)`` that donate ``state``.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any  # nnx.State of the policy
    opt_state: Any


def init_train_state(policy: nnx.Module, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """(graphdef, TrainState at step 0) for ``policy``."""
    graphdef, params = nnx.split(policy)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(tx: optax.GradientTransformation, params_like) -> TrainState:
    """A ``TrainState`` of ``jax.ShapeDtypeStruct`` leaves for parameters shaped like
    ``params_like``: the restore target of a checkpoint."""
    return jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)), params_like
    )


def make_schedule(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    end_fraction: float = 0.1,
) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine decay to ``end_fraction`` of it at
    ``total_steps`` (``schedule="cosine"``) or constant (``"constant"``)."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate={learning_rate}: expected > 0")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: expected a positive int")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps}: expected 0 <= warmup_steps <= total_steps={total_steps}")
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    if schedule != "cosine":
        raise ValueError(f"schedule={schedule!r}: expected 'cosine' or 'constant'")
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=end_fraction)
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=learning_rate * end_fraction
    )


def make_optimizer(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    end_fraction: float = 0.1,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (weight decay only on matrices) after global-norm clipping; returns (tx, schedule)."""
    sched = make_schedule(
        learning_rate, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, end_fraction=end_fraction
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [] if not clip_norm else [optax.clip_by_global_norm(clip_norm)]
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), sched
