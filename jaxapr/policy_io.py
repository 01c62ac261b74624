"""Policies in and out: a trained run's checkpoint or a compact exported file -> a policy.

- :func:`load_policy(path)` (also ``jaxapr.load_policy``): the policy of a training work
  directory (its best checkpoint by default), of an exported ``.npz`` or of a Hugging Face
  Llama directory (``config.json`` + ``model.safetensors``, as ``jaxapr.hf.export_hf`` writes);
- :func:`load_params`: the same as (model config, parameters, run config), for code that
  trains further or compares parameters;
- :func:`export_policy` / :func:`load_exported` / :func:`exported_meta`: one compact
  ``.npz`` per policy (parameters in bfloat16 by default, the model config and provenance as
  JSON): what ``experiments/checkpoints/`` ships.

Export format ``jaxapr.policy/1``: ``__meta__`` (JSON: format, dtype, model, extra) and one
array per parameter, named by its path with ``/`` and the nnx Variable's value as ``.value``
(``blocks/0/attn/wk/.value``); bfloat16 arrays are stored as their uint16 bits.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from jaxapr import hf
from jaxapr import model as model_lib

EXPORT_FORMAT = "jaxapr.policy/1"


def make_policy(cfg: model_lib.ModelConfig, seed: int) -> nnx.Module:
    """A freshly initialised policy of ``cfg``."""
    return model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))


def _abstract_policy(cfg: model_lib.ModelConfig):
    """(graphdef, abstract parameters) of a policy of ``cfg`` (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: make_policy(cfg, 0)))


# --------------------------------------------------------------------------------------
# Training work directories
# --------------------------------------------------------------------------------------
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


def load_params(path: str, which: str = "best", step: int | None = None):
    """(ModelConfig, params, run config) of a run's checkpoint: ``which`` = "best" (see
    :func:`best_step`; the newest restorable one when no checkpoint has validation metrics)
    or "latest", or an explicit ``step``. The config is the one saved in the checkpoint.
    ``path`` may also be an exported ``.npz``: its parameters, and a run config holding its
    ``model`` (and its metadata as ``exported``); or a Hugging Face directory (``jaxapr.hf``):
    its parameters and a run config holding its ``model``."""
    from ml_collections import ConfigDict

    from jaxapr.train import run_config
    from jaxapr.train.checkpoint import Checkpointer
    from jaxapr.train.state import abstract_train_state

    if path.endswith(".npz"):
        policy, meta = load_exported(path)
        return policy.cfg, nnx.split(policy)[1], ConfigDict({"model": meta["model"], "exported": meta["extra"]})
    if hf.is_hf_dir(path):
        policy = hf.load_hf(path)
        return policy.cfg, nnx.split(policy)[1], ConfigDict({"model": dataclasses.asdict(policy.cfg)})
    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
    directory = os.path.join(path, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {path!r}: expected the workdir of a train_sft / train_rl run")
    with Checkpointer(directory, config={}, compare_keys=()) as ckpt:
        if step is None and which == "best":
            step = best_step(ckpt)
        config = ConfigDict(ckpt.metadata(step)["config"])
        cfg = run_config.model_config(config)
        tx, _ = run_config.make_optimizer(run_config.optimizer_config(config))
        state, _ = ckpt.restore(abstract_train_state(tx, _abstract_policy(cfg)[1]), step=step)
    return cfg, state.params, config


def load_policy(path: str, which: str = "best", step: int | None = None) -> nnx.Module:
    """The policy at ``path``: a train_sft / train_rl work directory (checkpoint ``which`` /
    ``step`` as :func:`load_params` says), an exported ``.npz`` (:func:`export_policy`) or a
    Hugging Face Llama directory (:func:`jaxapr.hf.export_hf`)."""
    if path.endswith(".npz"):
        return load_exported(path)[0]
    if hf.is_hf_dir(path):
        return hf.load_hf(path)
    cfg, params, _ = load_params(path, which, step)
    return nnx.merge(_abstract_policy(cfg)[0], params)


# --------------------------------------------------------------------------------------
# Exported files
# --------------------------------------------------------------------------------------
def _named_variables(params) -> list[tuple[str, nnx.Variable]]:
    """(export name, Variable) of every parameter, in tree order."""
    from jaxapr.train.checkpoint import path_name

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return [(path_name(path, "/") + "/.value", var) for path, var in flat]


def export_policy(policy: nnx.Module, path: str, dtype: str = "bfloat16", extra: dict | None = None) -> str:
    """Writes ``policy`` as one compact ``.npz`` (parameters in ``dtype``, the model config and
    ``extra`` as JSON): what the repository ships; :func:`load_policy` reads it back."""
    import ml_dtypes

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
    flat = {}
    for name, var in _named_variables(nnx.split(policy)[1]):
        arr = np.asarray(var[...], np.float32)
        flat[name] = arr.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bfloat16" else arr.astype(dtype)
    meta = {"format": EXPORT_FORMAT, "dtype": dtype, "model": dataclasses.asdict(policy.cfg), "extra": extra or {}}
    path = path if path.endswith(".npz") else path + ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **flat)
    return path


def _read_exported(path: str, arrays: bool) -> tuple[dict, dict]:
    """(meta, parameter arrays if ``arrays`` else {}) of an :func:`export_policy` file, with
    one-line errors for a missing, unreadable, truncated or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported policy at {path!r}: expected a .npz written by export_policy")
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["__meta__"]))
            params = {k: f[k] for k in f.files if k != "__meta__"} if arrays else {}
    except Exception as e:
        reason = " ".join(str(e).split())[:160]
        raise ValueError(f"{path!r} is not a readable exported policy ({type(e).__name__}: {reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} has format {found!r}: expected {EXPORT_FORMAT!r}")
    return meta, params


def exported_meta(path: str) -> dict:
    """The metadata of an :func:`export_policy` file (model config, dtype, ``extra``) without
    reading its parameters."""
    return _read_exported(path, arrays=False)[0]


def load_exported(path: str) -> tuple[nnx.Module, dict]:
    """(policy, meta) of a file written by :func:`export_policy` (parameters as float32)."""
    import ml_dtypes

    meta, arrays = _read_exported(path, arrays=True)
    try:
        cfg = model_lib.ModelConfig(**meta["model"]).check()
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path!r} has an unreadable model config ({type(e).__name__}: {e})") from None
    graphdef, abstract = _abstract_policy(cfg)
    for name, var in _named_variables(abstract):
        if name not in arrays:
            raise ValueError(f"{path!r} lacks parameter {name!r}: expected a policy of its model config")
        arr = arrays[name]
        arr = arr.view(ml_dtypes.bfloat16) if meta["dtype"] == "bfloat16" else arr
        if arr.shape != var.shape:
            raise ValueError(f"{path!r}: parameter {name!r} has shape {arr.shape}, expected {var.shape}")
        var.set_value(jax.numpy.asarray(arr.astype(np.float32), var.dtype))
    return nnx.merge(graphdef, abstract), meta
