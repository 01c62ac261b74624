"""A run's config and what follows from it: the model, the optimizer, and the run's identity.

A run config is an ``ml_collections.ConfigDict`` (``experiments/configs/sft.py`` and
``rl.py``) with at least ``model`` (every ``model.ModelConfig`` field), ``optim``,
``num_steps``, ``mesh`` (``data``, ``fsdp``, ``tensor``; -1 = all remaining devices) and
``rules`` (a ``sharding.RULES`` name or ``"auto"``).

Identity: a work directory holds one run. Its checkpoints store the resolved config, and a
restart must agree with it on every field except :data:`RESUMABLE` (how long to train, how
often to evaluate, log and save, how to show progress, how to lay the run out on devices),
which may change between a run and its continuation without changing what is trained (the
training forward's ``remat`` and ``attention`` give the same values, ``shard_slots`` only
places the rollout engine's slots).
:func:`differences` lists the fields where two configs disagree; the checkpointer and
``experiments.gen_data`` both report a mismatch with :func:`describe`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from jaxapr import model as model_lib

# Fields that a continuation may change (dotted prefixes of the flattened config).
RESUMABLE = (
    "num_steps",
    "max_train_seconds",
    "eval_every",
    "eval_problems",
    "eval_batches",
    "eval_num_slots",
    "eval_max_context",
    "eval_split",
    "eval_at_start",
    "checkpoint_every",
    "log_every",
    "keep",
    "async_checkpoint",
    "progress",
    "wandb",
    "mesh",
    "rules",
    "overwrite",
    "remat",
    "attention",
    "shard_slots",
)


def to_dict(config) -> dict:
    """A config (ConfigDict, dataclass or dict) as plain JSON data (tuples become lists)."""
    if hasattr(config, "to_json"):
        return json.loads(config.to_json())
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(dict(config)))


def check_counts(config, positive: Iterable[str] = (), non_negative: Iterable[str] = ()) -> None:
    """One-line errors for count fields out of range: ``positive`` ones must be >= 1,
    ``non_negative`` ones >= 0 (where 0 turns something off)."""
    for name in positive:
        if config[name] < 1:
            raise ValueError(f"config.{name}={config[name]}: expected >= 1")
    for name in non_negative:
        if config[name] < 0:
            raise ValueError(f"config.{name}={config[name]}: expected >= 0 (0 turns it off)")


def model_config(config) -> model_lib.ModelConfig:
    """``config.model`` as a checked ``ModelConfig`` (unknown fields are a one-line error)."""
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    given = to_dict(config.model)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown fields {unknown}: expected some of {sorted(fields)}")
    return model_lib.ModelConfig(**given).check()


def make_optimizer(config):
    """(tx, schedule) from ``config.optim`` and ``config.num_steps`` (SFT and GRPO alike)."""
    from jaxapr.train.state import make_optimizer as make

    o = config.optim
    if o.warmup_steps > config.num_steps:
        raise ValueError(f"config.optim.warmup_steps={o.warmup_steps} is more than config.num_steps={config.num_steps}")
    return make(
        o.learning_rate,
        total_steps=config.num_steps,
        warmup_steps=o.warmup_steps,
        schedule=o.schedule,
        end_fraction=o.end_fraction,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        clip_norm=o.clip_norm,
    )


def optimizer_config(config):
    """The config whose :func:`make_optimizer` gives a run's optimizer (GRPO runs count
    optimizer updates, ``inner_epochs x num_minibatches`` per RL step, not RL steps)."""
    if "grpo" not in config:
        return config
    c = config.copy_and_resolve_references()
    per = int(config.grpo.inner_epochs) * int(config.grpo.num_minibatches)
    with c.unlocked():
        c.num_steps = config.num_steps * per
        c.optim.warmup_steps = config.optim.warmup_steps * per
    return c


# --------------------------------------------------------------------------------------
# Identity: which fields two configs disagree on
# --------------------------------------------------------------------------------------
def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys: ``{"model": {"d_model": 128}}`` ->
    ``{"model.d_model": 128}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


ABSENT = "<absent>"


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences(
    old: Mapping, new: Mapping, *, compare: Iterable[str] | None = None, ignore: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for each dotted key where the configs differ (a key
    missing on one side is :data:`ABSENT` there), sorted by key. ``compare``: only keys under
    these prefixes (None: all); ``ignore``: never keys under these."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    ignore = tuple(ignore)
    keys = sorted(k for k in set(a) | set(b) if (compare is None or _under(k, compare)) and not _under(k, ignore))
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys if a.get(k, ABSENT) != b.get(k, ABSENT)]


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """Every difference on one line: ``kind="sosp" differs from this run's "apr", seed=0
    differs from this run's 7``."""

    def show(v):
        return v if v == ABSENT else json.dumps(v)

    return ", ".join(f"{k}={show(a)} differs from this run's {show(b)}" for k, a, b in diffs)
