"""Checkpoints with orbax: the train state's arrays, plus a JSON record of the run.

One module (over 500 lines) because the ``Checkpointer`` and the integrity record it writes and
verifies are one on-disk format.

A checkpoint is one step directory ``<dir>/<step>/`` written by an
``orbax.checkpoint.CheckpointManager`` with two items:

- ``state``: the array pytree (``TrainState``: step, params, optimizer state; or any pytree
  of arrays, PRNG keys included), written with ``StandardSave`` (OCDBT/zarr, one file set
  per host, any sharding);
- ``meta``: JSON (orbax's ``JsonSave``) ``{"format", "step", "config", "extra", "metrics",
  "checksums"}``. ``extra`` holds whatever else a resumed run needs to continue exactly (the
  data iterator's ``get_state()``, counters) as JSON data: dicts with string keys, lists,
  strings, numbers (NaN and infinities included), bools, None; arrays and PRNG keys belong
  in the state.

Integrity: ``checksums`` holds a 32-bit fingerprint of every array of the state (its bits and
their positions, summed with wrap-around on the devices, so it is the same for any sharding).
``restore`` recomputes them and also requires every floating array to be finite; an array
that fails either check makes the step corrupt, like a file that cannot be read.

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
arrays it checks the saved config against this run's (every key under ``compare_keys`` and
not under ``ignore_keys``: all differing keys in one line, :class:`ConfigMismatchError`) and
the target's tree against the saved one (a one-line ``ValueError``). A checkpoint that cannot
be read or fails its integrity checks is reported as :class:`CorruptCheckpointError` naming
the step and directory; with ``step=None`` the newest checkpoint that restores is used
instead (a warning names the bad ones). Nothing is deleted: corrupt steps newer than the one
restored are moved aside to ``<dir>/corrupt/<step>`` by the next ``save`` (so the resumed run
can reuse those step numbers), and kept there for inspection.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxapr.train import run_config

logger = logging.getLogger(__name__)

FORMAT = "jaxapr.checkpoint/1"
STATE, META = "state", "meta"
CORRUPT_DIR = "corrupt"


class CorruptCheckpointError(ValueError):
    """A checkpoint step that exists but cannot be used: missing, truncated or garbage files,
    an array whose checksum differs from the saved one, or a non-finite array."""


class ConfigMismatchError(ValueError):
    """A checkpoint written by a run whose config differs from this run's (``.differences``:
    ``(key, saved value, this run's value)``)."""

    def __init__(self, message: str, differences: list):
        super().__init__(message)
        self.differences = differences


def path_name(path, separator: str = ".") -> str:
    """A pytree key path as text: dict keys, sequence indices and attribute names joined by
    ``separator`` (``params.blocks.0.attn.wk.value``); ``<root>`` for the empty path."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator=separator) or "<root>"


def json_data(value: Any, where: str = "value") -> Any:
    """``value`` as JSON data for the meta record (numpy scalars -> Python numbers, tuples ->
    lists); a one-line ``ValueError`` naming ``where`` for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (list, tuple)):
        return [json_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise ValueError(f"{where} has the key {bad!r}: expected string keys (JSON)")
        return {k: json_data(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise ValueError(
        f"{where} is a {type(value).__name__}: expected JSON data (dict with string keys, list, str, "
        "number, bool, None); arrays and PRNG keys belong in the saved state"
    )


# --------------------------------------------------------------------------------------
# Integrity: a fingerprint per array, computed where the arrays live
# --------------------------------------------------------------------------------------
def _bits(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 (narrower types widened; 64-bit ones as two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32: each element's bits mixed with its flat index (murmur3's finaliser), summed
    with wrap-around. Integer sums are exact in any order, so any sharding gives the same."""
    b = _bits(x)
    index = jnp.zeros(b.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(b.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, b.shape, d) * jnp.uint32(stride % 2**32)
        stride *= b.shape[d]
    h = b * jnp.uint32(0x9E3779B1) + index * jnp.uint32(0x85EBCA77)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jnp.sum(h, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


@jax.jit
def _integrity(leaves: list) -> tuple[list, list]:
    return [_fingerprint(x) for x in leaves], [_finite(x) for x in leaves]


def _scalar(x) -> Any:
    """A replicated scalar result as a Python value (also when it spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x).item()


def integrity(tree: Any) -> tuple[dict[str, str], list[str]]:
    """(``{array name: fingerprint as 8 hex digits}``, names of floating arrays that hold a
    NaN or an infinity) of a pytree of arrays (computed on their devices; with several
    processes every process must call it together)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}, []
    sums, finite = _integrity([x for _, x in flat])
    names = [path_name(p) for p, _ in flat]
    return (
        {n: f"{_scalar(s):08x}" for n, s in zip(names, sums)},
        [n for n, ok in zip(names, finite) if not _scalar(ok)],
    )


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
        raise ValueError(
            f"restore target leaf {path_name(path)} is a {type(x).__name__}: "
            "expected jax.ShapeDtypeStruct or an array (e.g. state.abstract_train_state(...))"
        )

    return jax.tree_util.tree_map_with_path(one, target)


def _stored_shape(x) -> tuple:
    """The shape orbax records for a target leaf (a PRNG key array: its key data's)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape)


# --------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------
class Checkpointer:
    """Save and restore train states in ``directory`` (see the module docstring).

    ``config``: this run's config (dict, dataclass or ConfigDict), stored with every checkpoint
    and compared on restore over ``compare_keys`` (dotted prefixes of the flattened config;
    default every key under ``model``; ``None`` = all keys; ``()`` = none), except keys under
    ``ignore_keys`` (a training run passes ``compare_keys=None,
    ignore_keys=run_config.RESUMABLE``: its identity).
    ``keep``: how many of the newest checkpoints to keep. ``best_metric``/``best_mode``: also
    keep the best checkpoint by ``metrics[best_metric]`` passed to :meth:`save` (NaN ranks
    worst). ``async_save``: write in a background thread.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        config: Any,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        compare_keys: Sequence[str] | None = ("model",),
        ignore_keys: Sequence[str] = (),
    ):
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
        if not (
            isinstance(config, Mapping)
            or hasattr(config, "to_json")
            or (hasattr(config, "__dataclass_fields__") and not isinstance(config, type))
        ):
            raise ValueError(f"config is a {type(config).__name__}: expected a dict (or dataclass / ConfigDict)")
        self.config = json_data(run_config.to_dict(config), "config")
        self.compare_keys = None if compare_keys is None else tuple(compare_keys)
        self.ignore_keys = (ignore_keys,) if isinstance(ignore_keys, str) else tuple(ignore_keys)
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

            policies.append(
                pp.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False)
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            create=True,
        )
        self._ocp = ocp
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()},
        )

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
        "config", "extra", "metrics", "checksums"}``."""
        self.wait()
        return self._read_meta(self._existing_step(step))

    # ---- save ----------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        *,
        extra: Mapping | None = None,
        metrics: Mapping | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` (a pytree of arrays) as checkpoint ``step`` with ``extra`` (JSON data,
        see the module docstring) and ``metrics`` (name -> number), and the fingerprint of
        every array. Returns False, saving nothing, when ``step`` is not newer than the latest
        checkpoint (unless ``force``; an existing step is never overwritten). Asynchronous by
        default: the arrays are on host when this returns, so the caller may donate ``state``
        to the next step. With several processes every process calls it together."""
        self._check_open()
        if isinstance(step, (jax.Array, np.ndarray, np.integer)):
            step = int(np.asarray(step))
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r}: expected an int >= 0")
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"extra is a {type(extra).__name__}: expected a dict")
        metrics_json = self._metrics_json(metrics)
        meta = {
            "format": FORMAT,
            "step": step,
            "config": self.config,
            "extra": json_data(dict(extra or {}), "extra"),
            "metrics": metrics_json or {},
        }
        self._set_aside_corrupt()
        steps = self.all_steps()
        if step in steps:
            if force:
                raise ValueError(
                    f"checkpoint step {step} already exists in '{self.directory}': expected a new step "
                    "(existing checkpoints are never overwritten)"
                )
            logger.info("checkpoint step %d already exists in '%s'; save skipped", step, self.directory)
            return False
        if not force and steps and step < steps[-1]:
            logger.warning(
                "save(step=%d) skipped: '%s' already holds the newer step %d (pass force=True to save an older step)",
                step,
                self.directory,
                steps[-1],
            )
            return False
        meta["checksums"], _ = integrity(state)
        args = self._ocp.args.Composite(
            **{STATE: self._ocp.args.StandardSave(state), META: self._ocp.args.JsonSave(meta)}
        )
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
            raise ValueError(
                f"metrics has no {self.best_metric!r} (the best_metric): expected it among "
                f"{sorted(out)} or metrics=None"
            )
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
                logger.warning(
                    "restored checkpoint step %d of '%s' after skipping corrupt step(s) %s",
                    s,
                    self.directory,
                    sorted(self._corrupt),
                )
            return result
        raise CorruptCheckpointError(
            f"no checkpoint in '{self.directory}' restores: all of steps {steps} are corrupt (newest: {failures[0]})"
        )

    def _no_checkpoint(self) -> str:
        return (
            f"no checkpoint in '{self.directory}': expected step directories written by Checkpointer.save "
            "(start a fresh run without restore)"
        )

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
        except Exception as e:
            raise self._corrupt_error(step, "its meta JSON cannot be read", e) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
            raise self._corrupt_error(step, f"its meta JSON is not a {FORMAT!r} record")
        return meta

    def _check_config(self, saved: dict, step: int) -> None:
        if self.compare_keys is not None and not self.compare_keys:
            return
        diffs = run_config.differences(saved, self.config, compare=self.compare_keys, ignore=self.ignore_keys)
        if diffs:
            raise ConfigMismatchError(
                f"checkpoint config {run_config.describe(diffs)}: expected the same values to resume step {step} of "
                f"'{self.directory}' (a fresh run: a new directory, or --config.overwrite=True)",
                diffs,
            )

    def _check_tree(self, step: int, abstract: Any) -> None:
        _quiet_closed_loop_noise()
        try:
            md = self._mgr.item_metadata(step)[STATE]
            tree = md.tree if hasattr(md, "tree") else md
            saved = {path_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        except Exception as e:
            raise self._corrupt_error(step, "its array metadata cannot be read", e) from None
        if not saved:
            raise self._corrupt_error(step, "it holds no arrays")
        wanted = {path_name(p): _stored_shape(x) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        where = f"checkpoint step {step} of '{self.directory}' does not match the restore target"
        missing = sorted(set(wanted) - set(saved))
        if missing:
            raise ValueError(
                f"{where}: {missing[0]} is not in the checkpoint ({len(missing)} target arrays missing); "
                "expected the tree the checkpoint was saved from"
            )
        unexpected = sorted(set(saved) - set(wanted))
        if unexpected:
            raise ValueError(
                f"{where}: the checkpoint has {unexpected[0]}, which the target lacks "
                f"({len(unexpected)} arrays); expected the tree the checkpoint was saved from"
            )
        for name in sorted(wanted):
            if wanted[name] != saved[name]:
                raise ValueError(
                    f"{where}: {name} has shape {saved[name]} in the checkpoint, {wanted[name]} in the "
                    "target; expected equal shapes"
                )

    def _restore_step(self, step: int, abstract: Any) -> tuple[Any, dict]:
        meta = self._read_meta(step)
        self._check_config(meta["config"], step)
        self._check_tree(step, abstract)
        try:
            state = self._mgr.restore(
                step, args=self._ocp.args.Composite(**{STATE: self._ocp.args.StandardRestore(abstract)})
            )[STATE]
        except Exception as e:
            raise self._corrupt_error(step, "its arrays cannot be read", e) from None
        self._check_integrity(step, state, meta.get("checksums"))
        return state, meta.get("extra", {})

    def _check_integrity(self, step: int, state: Any, saved: Mapping | None) -> None:
        """Corrupt unless every array matches its saved fingerprint (checkpoints written
        without fingerprints skip that part) and every floating array is finite."""
        sums, nonfinite = integrity(state)
        if saved is not None:
            bad = sorted(name for name, value in sums.items() if saved.get(name) != value)
            if bad:
                raise self._corrupt_error(
                    step, f"array {bad[0]} does not match its saved checksum ({len(bad)} of {len(sums)} arrays differ)"
                )
        if nonfinite:
            raise self._corrupt_error(
                step, f"array {nonfinite[0]} holds NaN or infinite values ({len(nonfinite)} arrays do)"
            )

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

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
