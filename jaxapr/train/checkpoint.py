"""Checkpoints with orbax: the train state's arrays, plus a JSON record of the run.

A checkpoint is one step directory ``<dir>/<step>/`` written by an
``orbax.checkpoint.CheckpointManager`` with two items:

- ``state``: the array pytree (``TrainState``: step, params, optimizer state), written with
  ``StandardSave`` (OCDBT/zarr, one file set per host, any sharding);
- ``meta``: JSON ``{"format", "step", "config", "extra", "metrics"}``. ``extra`` holds whatever
  else a resumed run needs to continue exactly: the data iterator's ``get_state()``, PRNG keys,
  counters. Values that JSON cannot hold are encoded reversibly (bytes, tuples, numpy/jax
  arrays, typed PRNG keys; see :func:`encode_json` / :func:`decode_json`).

Retention: the newest ``keep`` checkpoints, and with ``best_metric`` also the best one by
``metrics[best_metric]`` (orbax ``AnyPreservationPolicy(LatestN(keep), BestN(n=1))``), so an
old best checkpoint survives while later ones rotate out.

Saves are asynchronous by default: ``save`` returns once the arrays are copied to host memory
(so the caller may donate or delete the state's buffers right away) and the files are written
in a background thread, into ``<step>.orbax-checkpoint-tmp`` first and renamed when complete;
a process that dies mid-save leaves only that tmp directory, which is never listed as a step.
Call ``wait()`` or ``close()`` (or use ``with Checkpointer(...)``) before the process exits,
or the last save is lost.

``restore(target)`` places every array on the sharding of the matching ``target`` leaf (a
``jax.ShapeDtypeStruct`` with ``.sharding``, or a concrete array), so a checkpoint written on
one device restores onto a mesh and the other way round; :func:`sharded_target` builds such a
target from ``state.abstract_train_state`` and ``sharding.rules_for``. Before touching the
arrays it checks the saved config against this run's (keys ``compare_keys``) and the target's
tree against the saved one, each with a one-line ``ValueError``. A checkpoint that cannot be
read is reported as :class:`CorruptCheckpointError` naming the step and directory; with
``step=None`` the newest checkpoint that restores is used instead (a warning names the bad
ones). Nothing is deleted: corrupt steps newer than the one restored are moved aside to
``<dir>/corrupt/<step>`` by the next ``save`` (so the resumed run can reuse those step
numbers), and kept there for inspection.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

logger = logging.getLogger(__name__)

FORMAT = "jaxapr.checkpoint/1"
STATE, META = "state", "meta"
CORRUPT_DIR = "corrupt"


class CorruptCheckpointError(ValueError):
    """A checkpoint step that exists but cannot be read (missing, truncated or garbage files)."""


# --------------------------------------------------------------------------------------
# JSON encoding of ``extra`` and ``config``
# --------------------------------------------------------------------------------------
_MARKERS = ("__bytes__", "__tuple__", "__array__", "__prng_key__", "__float__", "__dict__")


def encode_json(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data, reversibly (:func:`decode_json` gives it back): bytes,
    tuples, non-finite floats, numpy/jax arrays (-> numpy on decode), typed PRNG keys (-> the
    same key array) and dicts with non-string keys get tagged forms. Raises a one-line
    ``ValueError`` naming ``where`` for anything else (objects, functions...)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return {"__prng_key__": np.asarray(jax.random.key_data(value)).tolist(),
                "impl": str(jax.random.key_impl(value))}
    if isinstance(value, (np.ndarray, jax.Array)):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{where} is an array of dtype {arr.dtype}: expected bool, int or float arrays")
        flat = [encode_json(x, where) for x in arr.reshape(-1).tolist()]
        return {"__array__": flat, "dtype": arr.dtype.name, "shape": list(arr.shape)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_json(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {"__dict__": [[encode_json(k, f"{where} key"), encode_json(v, f"{where}[{k!r}]")]
                             for k, v in value.items()]}
    raise ValueError(f"{where} is a {type(value).__name__}: expected JSON-serializable data (dict, list, str, "
                     "number, bool, None, bytes, tuple, numpy/jax array, PRNG key)")


def decode_json(value: Any) -> Any:
    """The inverse of :func:`encode_json`."""
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if len(value) == 1 and "__tuple__" in value:
        return tuple(decode_json(v) for v in value["__tuple__"])
    if len(value) == 1 and "__float__" in value:
        return float(value["__float__"])
    if len(value) == 1 and "__dict__" in value:
        return {_hashable(decode_json(k)): decode_json(v) for k, v in value["__dict__"]}
    if set(value) == {"__array__", "dtype", "shape"}:
        flat = [decode_json(x) for x in value["__array__"]]
        return np.asarray(flat, dtype=value["dtype"]).reshape(value["shape"])
    if set(value) == {"__prng_key__", "impl"}:
        data = np.asarray(value["__prng_key__"], np.uint32)
        return jax.random.wrap_key_data(data, impl=_key_impl(value["impl"]))
    return {k: decode_json(v) for k, v in value.items()}


def _hashable(x):
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


def _key_impl(text: str):
    # str(key_impl) looks like "PRNGImpl(threefry2x32)" or is the bare name.
    name = text[text.index("(") + 1:text.rindex(")")] if "(" in text else text
    return name


def _config_json(config: Any) -> Any:
    """A config (dict, dataclass, ml_collections ConfigDict) as plain JSON data."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict") and callable(config.to_dict):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {str(k): _config_json(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_config_json(v) for v in config]
    return encode_json(config, "config value")


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys: ``{"model": {"d_model": 128}}`` ->
    ``{"model.d_model": 128}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not any(str(k).startswith("__") for k in value):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def _quiet_closed_loop_noise() -> None:
    """A failed orbax/tensorstore read leaves callbacks that fire on orbax's already closed
    asyncio loop and print "Exception ignored ... RuntimeError: Event loop is closed" from a
    background thread, concurrently with the error we report. Before reading a checkpoint,
    wrap ``sys.unraisablehook`` to drop exactly that message (every other unraisable exception
    still reaches the previous hook)."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxapr_closed_loop_filter", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxapr_closed_loop_filter = True
    sys.unraisablehook = hook


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------
# Restore targets
# --------------------------------------------------------------------------------------
def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_name(path) -> str:
    return ".".join(_key_name(k) for k in path) or "<root>"


def sharded_target(abstract_state: Any, mesh, rules) -> Any:
    """``abstract_state`` (e.g. ``state.abstract_train_state(...)``) with a ``NamedSharding`` on
    every leaf: ``nnx.Variable`` leaves (parameters and the optimizer moments that mirror them)
    split by their logical axes under ``rules`` (as ``sharding.param_shardings``), every other
    leaf (step, counters) replicated. The result is a restore target for ``mesh``."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxapr import sharding as sh

    def one(x):
        if isinstance(x, nnx.Variable):
            logical = x.get_metadata().get("out_sharding") or ()
            spec = sh.fit_spec(sh.logical_to_mesh(logical, rules), x.shape, mesh)
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)))
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract(target: Any) -> Any:
    """Every leaf as a ShapeDtypeStruct with a sharding (default: the first local device)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(path, x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or default)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, (np.ndarray, np.generic)):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=default)
        raise ValueError(f"restore target leaf {_path_name(path)} is a {type(x).__name__}: "
                         "expected jax.ShapeDtypeStruct or an array (e.g. state.abstract_train_state(...))")

    return jax.tree_util.tree_map_with_path(one, target)


# --------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------
class Checkpointer:
    """Save and restore train states in ``directory`` (see the module docstring).

    ``config``: this run's config (dict, dataclass or ConfigDict), stored with every checkpoint
    and compared on restore over ``compare_keys`` (dotted prefixes of the flattened config;
    default every key under ``model``; ``None`` = all keys; ``()`` = none).
    ``keep``: how many of the newest checkpoints to keep. ``best_metric``/``best_mode``: also
    keep the best checkpoint by ``metrics[best_metric]`` passed to :meth:`save` (NaN ranks
    worst). ``async_save``: write in a background thread.
    """

    def __init__(self, directory: str | os.PathLike, *, config: Any, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True,
                 compare_keys: Sequence[str] | None = ("model",)):
        import orbax.checkpoint as ocp
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep={keep!r}: expected an int >= 1 (the number of newest checkpoints kept)")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode={best_mode!r}: expected 'max' or 'min'")
        if best_metric is not None and not isinstance(best_metric, str):
            raise ValueError(f"best_metric={best_metric!r}: expected a metric name (str) or None")
        if isinstance(compare_keys, str):
            compare_keys = (compare_keys,)
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint directory '{self.directory}' is a file: expected a directory")
        self.config = _config_json(config)
        if not isinstance(self.config, dict):
            raise ValueError(f"config is a {type(config).__name__}: expected a dict (or dataclass / ConfigDict)")
        self.compare_keys = None if compare_keys is None else tuple(compare_keys)
        self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
        self._corrupt: set[int] = set()
        self._closed = False

        policies: list = [pp.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            worst = -math.inf if best_mode == "max" else math.inf

            def best_fn(metrics, _name=best_metric, _worst=worst):
                value = metrics.get(_name) if isinstance(metrics, Mapping) else None
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    return _worst
                return _worst if math.isnan(value) else value

            policies.append(pp.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode=best_mode, create=True)
        self._ocp = ocp
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()})

    # ---- queries -------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The steps of the checkpoints kept (ascending), including one being written."""
        return sorted(int(s) for s in self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the best ``metrics[best_metric]``; None without ``best_metric``
        or when no checkpoint has metrics."""
        if self.best_metric is None:
            return None
        return self._mgr.best_step()

    def metadata(self, step: int | None = None) -> dict:
        """The JSON record of a checkpoint (default: the latest): ``{"format", "step",
        "config", "extra", "metrics"}`` with ``extra`` decoded."""
        self.wait()
        step = self._existing_step(step)
        meta = self._read_meta(step)
        return {**meta, "extra": decode_json(meta.get("extra", {}))}

    # ---- save ----------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, extra: Mapping | None = None, metrics: Mapping | None = None,
             force: bool = False) -> bool:
        """Save ``state`` (a pytree of arrays) as checkpoint ``step`` with ``extra`` (JSON data,
        see :func:`encode_json`) and ``metrics`` (name -> number). Returns False, saving
        nothing, when ``step`` is not newer than the latest checkpoint (unless ``force``; an
        existing step is never overwritten). Asynchronous by default: the arrays are on host
        when this returns, so the caller may donate ``state`` to the next step."""
        self._check_open()
        if isinstance(step, (jax.Array, np.ndarray, np.integer)):
            step = int(np.asarray(step))
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r}: expected an int >= 0")
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"extra is a {type(extra).__name__}: expected a dict")
        metrics_json = self._metrics_json(metrics)
        meta = {"format": FORMAT, "step": step, "config": self.config,
                "extra": encode_json(dict(extra or {}), "extra"), "metrics": encode_json(metrics_json or {}, "metrics")}
        self._set_aside_corrupt()
        steps = self.all_steps()
        if step in steps:
            if force:
                raise ValueError(f"checkpoint step {step} already exists in '{self.directory}': expected a new step "
                                 "(existing checkpoints are never overwritten)")
            logger.info("checkpoint step %d already exists in '%s'; save skipped", step, self.directory)
            return False
        if not force and steps and step < steps[-1]:
            logger.warning("save(step=%d) skipped: '%s' already holds the newer step %d (pass force=True to save "
                           "an older step)", step, self.directory, steps[-1])
            return False
        args = self._ocp.args.Composite(**{STATE: self._ocp.args.StandardSave(state),
                                           META: self._ocp.args.JsonSave(meta)})
        track = metrics_json if self.best_metric is not None else None
        return bool(self._mgr.save(step, args=args, metrics=track, force=True))

    def _metrics_json(self, metrics: Mapping | None) -> dict | None:
        if metrics is None:
            return None
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics is a {type(metrics).__name__}: expected a dict of name -> number")
        out = {}
        for name, value in metrics.items():
            try:
                if isinstance(value, (str, bytes)):
                    raise TypeError
                arr = np.asarray(value)
                if arr.dtype.kind not in "biuf" and jax.numpy.issubdtype(arr.dtype, jax.numpy.floating):
                    arr = arr.astype(np.float64)  # bfloat16 and friends
                if arr.size != 1 or arr.dtype.kind not in "biuf":
                    raise TypeError
                out[str(name)] = arr.reshape(()).item()
            except (TypeError, ValueError):
                raise ValueError(f"metrics[{name!r}]={value!r}: expected a number") from None
        if self.best_metric is not None and self.best_metric not in out:
            raise ValueError(f"metrics has no {self.best_metric!r} (the best_metric): expected it among "
                             f"{sorted(out)} or metrics=None")
        return out

    # ---- restore -------------------------------------------------------------------------
    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """``(state, extra)`` of checkpoint ``step`` (default: the newest that restores), the
        arrays placed on ``target``'s shardings. See the module docstring for the checks."""
        self._check_open()
        self.wait()
        self._mgr.reload()
        abstract = _abstract(target)
        if step is not None:
            return self._restore_step(self._existing_step(step), abstract)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(self._no_checkpoint())
        failures: list[str] = []
        for s in reversed(steps):
            try:
                result = self._restore_step(s, abstract)
            except CorruptCheckpointError as e:
                self._corrupt.add(s)
                failures.append(str(e))
                logger.warning("%s; trying an older checkpoint (nothing is deleted)", e)
                continue
            if failures:
                logger.warning("restored checkpoint step %d of '%s' after skipping corrupt step(s) %s", s,
                               self.directory, sorted(self._corrupt))
            return result
        raise CorruptCheckpointError(f"no checkpoint in '{self.directory}' restores: all of steps {steps} are corrupt "
                                     f"(newest: {failures[0]})")

    def _no_checkpoint(self) -> str:
        return (f"no checkpoint in '{self.directory}': expected step directories written by Checkpointer.save "
                "(start a fresh run without restore)")

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(self._no_checkpoint())
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in '{self.directory}': expected one of {steps}")
        return step

    def _corrupt_error(self, step: int, what: str, exc: BaseException | None = None) -> CorruptCheckpointError:
        cause = f" ({_one_line(exc)})" if exc is not None else ""
        return CorruptCheckpointError(f"checkpoint step {step} in '{self.directory}' is corrupt: {what}{cause}")

    def _read_meta(self, step: int) -> dict:
        _quiet_closed_loop_noise()
        try:
            meta = self._mgr.restore(step, args=self._ocp.args.Composite(**{META: self._ocp.args.JsonRestore()}))[META]
        except Exception as e:  # noqa: BLE001 - any failure to read is corruption
            raise self._corrupt_error(step, "its meta JSON cannot be read", e) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
            raise self._corrupt_error(step, f"its meta JSON is not a {FORMAT!r} record")
        return meta

    def _check_config(self, saved: dict, step: int) -> None:
        if self.compare_keys is not None and not self.compare_keys:
            return
        old, new = flatten_config(saved), flatten_config(self.config)

        def compared(key):
            return self.compare_keys is None or any(key == p or key.startswith(p + ".") for p in self.compare_keys)

        absent = object()
        for key in sorted(k for k in set(old) | set(new) if compared(k)):
            a, b = old.get(key, absent), new.get(key, absent)
            if a != b:
                def show(v):
                    return "<absent>" if v is absent else json.dumps(v)

                raise ValueError(f"checkpoint config {key}={show(a)} differs from this run's {show(b)}: expected the "
                                 f"same value to restore step {step} of '{self.directory}' (use the checkpoint's "
                                 "config or a new directory)")

    def _check_tree(self, step: int, abstract: Any) -> None:
        _quiet_closed_loop_noise()
        try:
            md = self._mgr.item_metadata(step)[STATE]
            tree = md.tree if hasattr(md, "tree") else md
            saved = {_path_name(p): tuple(leaf.shape)
                     for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        except Exception as e:  # noqa: BLE001
            raise self._corrupt_error(step, "its array metadata cannot be read", e) from None
        if not saved:
            raise self._corrupt_error(step, "it holds no arrays")
        wanted = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        where = f"checkpoint step {step} of '{self.directory}' does not match the restore target"
        missing = sorted(set(wanted) - set(saved))
        if missing:
            raise ValueError(f"{where}: {missing[0]} is not in the checkpoint ({len(missing)} target arrays missing); "
                             "expected the tree the checkpoint was saved from")
        unexpected = sorted(set(saved) - set(wanted))
        if unexpected:
            raise ValueError(f"{where}: the checkpoint has {unexpected[0]}, which the target lacks "
                             f"({len(unexpected)} arrays); expected the tree the checkpoint was saved from")
        for name in sorted(wanted):
            if wanted[name] != saved[name]:
                raise ValueError(f"{where}: {name} has shape {saved[name]} in the checkpoint, {wanted[name]} in the "
                                 "target; expected equal shapes")

    def _restore_step(self, step: int, abstract: Any) -> tuple[Any, dict]:
        meta = self._read_meta(step)
        self._check_config(meta["config"], step)
        self._check_tree(step, abstract)
        try:
            state = self._mgr.restore(
                step, args=self._ocp.args.Composite(**{STATE: self._ocp.args.StandardRestore(abstract)}))[STATE]
        except Exception as e:  # noqa: BLE001
            raise self._corrupt_error(step, "its arrays cannot be read", e) from None
        return state, decode_json(meta.get("extra", {}))

    def _set_aside_corrupt(self) -> None:
        """Move corrupt steps found by restore to <dir>/corrupt/<step> (never delete them)."""
        if not self._corrupt:
            return
        self.wait()
        if jax.process_index() == 0:
            for step in sorted(self._corrupt):
                src = os.path.join(self.directory, str(step))
                if not os.path.isdir(src):
                    continue
                dest = os.path.join(self.directory, CORRUPT_DIR, str(step))
                n = 1
                while os.path.exists(dest):
                    dest = os.path.join(self.directory, CORRUPT_DIR, f"{step}-{n}")
                    n += 1
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(src, dest)
                logger.warning("moved corrupt checkpoint step %d aside to '%s' (kept for inspection)", step, dest)
        if jax.process_count() > 1:
            self._ocp.multihost.sync_global_processes("jaxapr_checkpoint_set_aside_corrupt")
        self._corrupt.clear()
        self._mgr.reload()

    # ---- lifecycle -----------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ValueError(f"Checkpointer for '{self.directory}' is closed: expected an open one")

    def wait(self) -> None:
        """Block until the pending asynchronous save is on disk (raises its error, if any)."""
        if not self._closed:
            self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for the pending save and release the manager (idempotent)."""
        if self._closed:
            return
        try:
            self._mgr.wait_until_finished()
        finally:
            self._closed = True
            self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
