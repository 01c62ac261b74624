"""Training metrics: a JSONL file (always), TensorBoard event files, a console progress bar and,
optionally, Weights & Biases.

``MetricWriter(workdir)`` appends one JSON object per ``write(step, metrics)`` to
``<workdir>/metrics.jsonl`` (``{"step": step, name: value, ...}``, flushed per line; NaN and
infinities are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``, which
:func:`read_metrics` turns back into floats) and the same scalars to TensorBoard event files
under ``<workdir>/tensorboard`` (tensorboardX's ``SummaryWriter``, no TensorFlow). ``progress(step, ...)`` moves a tqdm bar on stderr with a postfix (loss,
tokens/s, ...).

Resuming: ``MetricWriter(workdir, resume_step=s)`` drops the JSONL lines with ``step > s``
(the file is rewritten atomically) and opens the TensorBoard writer with ``purge_step=s + 1``
(which makes TensorBoard discard the old events after ``s``), so a resumed run's metrics
equal an uninterrupted run's.

Weights & Biases (``wandb=True``; the training configs' ``--config.wandb=True``): ``wandb`` is
imported only then (``pip install 'jaxapr[wandb]'``; without it the writer raises a one-line
ValueError). The run is named after the work directory, its id is kept in
``<workdir>/wandb_run_id`` so a resumed training run continues the same W&B run, the project is
``$WANDB_PROJECT`` (default ``jaxapr``) and ``wandb_config`` is logged as the run's config. W&B
keeps the first value logged at a step, so steps a resumed run repeats keep their old values
there (the JSONL file and TensorBoard have the resumed ones).

In a multi-host run only one process writes: pass ``enabled=(jax.process_index() == 0)``;
a disabled writer does nothing at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

JSONL = "metrics.jsonl"
TB_DIR = "tensorboard"
WANDB_ID = "wandb_run_id"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _scalar(name: str, value: Any) -> int | float | bool | str:
    """A JSON-ready Python scalar from a number (Python, numpy, or a one-element jax array,
    bfloat16 included); non-finite floats as "nan"/"inf"/"-inf"."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    arr = None
    if not isinstance(value, (str, bytes)):
        try:
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf":
                import jax.numpy as jnp

                arr = arr.astype(np.float64) if jnp.issubdtype(arr.dtype, jnp.floating) else None
        except Exception:
            arr = None
    if arr is None or arr.size != 1:
        shape = f" of shape {arr.shape}" if arr is not None else ""
        raise ValueError(f"metric {name!r} is a {type(value).__name__}{shape}: expected a number (a scalar)")
    item = arr.reshape(()).item()
    if isinstance(item, float) and not math.isfinite(item):
        return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf")
    return item


def _decode(row: dict) -> dict:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}


def read_jsonl(path: str) -> tuple[list[dict], bool]:
    """The rows of a JSONL file of ``{"step": int, ...}`` objects and whether its last line was a
    torn (partial) write (skipped); any other line that is not such an object is a one-line
    ValueError."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    ends_clean = lines[-1] == ""
    if ends_clean:
        lines.pop()
    torn = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError
        except ValueError:
            if number == len(lines) and not ends_clean:
                torn = True  # a crash in the middle of the last write
                continue
            raise ValueError(
                f"{path}:{number} is not a metrics line: expected a JSON object with an int 'step' (got {line[:80]!r})"
            ) from None
        rows.append(row)
    return rows, torn


def read_metrics(workdir: str | os.PathLike, prefix: str | None = None) -> list[dict]:
    """The rows of ``<workdir>/metrics.jsonl`` in order (``"nan"``/``"inf"`` strings back to
    floats); with ``prefix``, only rows that have a key starting with it. A torn last line
    (a crash mid-write) is skipped."""
    path = os.path.join(os.fspath(workdir), JSONL)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {JSONL} in '{workdir}': expected a workdir written by MetricWriter")
    rows = [_decode(r) for r in read_jsonl(path)[0]]
    if prefix is not None:
        rows = [r for r in rows if any(k.startswith(prefix) for k in r if k != "step")]
    return rows


def _start_wandb(workdir: str, config: Mapping[str, Any] | None):
    """A W&B run for ``workdir`` (the same one again when the workdir already started one)."""
    try:
        import wandb
    except ImportError:
        raise ValueError(
            "wandb=True needs the wandb package: pip install 'jaxapr[wandb]' (or set --config.wandb=False)"
        ) from None
    id_path = os.path.join(workdir, WANDB_ID)
    if os.path.isfile(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "jaxapr"),
        name=os.path.basename(os.path.abspath(workdir)),
        id=run_id,
        resume="allow",
        dir=workdir,
        config=dict(config or {}),
    )


class MetricWriter:
    """Write metrics to ``<workdir>/metrics.jsonl``, TensorBoard and a progress bar.

    ``total_steps``: the length of the progress bar. ``enabled``: False makes every method a
    no-op (pass ``jax.process_index() == 0``). ``tensorboard``/``progress``: turn those parts
    off. ``resume_step``: continue a run from this step (see the module docstring). ``wandb``:
    also log to Weights & Biases, with ``wandb_config`` as the run's config.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int | None = None,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        resume_step: int | None = None,
        wandb: bool = False,
        wandb_config: Mapping[str, Any] | None = None,
    ):
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 0):
            raise ValueError(f"total_steps={total_steps!r}: expected a non-negative int or None")
        if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"resume_step={resume_step!r}: expected a non-negative int or None")
        self.workdir = os.fspath(workdir)
        self.enabled = bool(enabled)
        self.path = os.path.join(self.workdir, JSONL)
        self._file = None
        self._tb = None
        self._bar = None
        self._wandb = None
        self._closed = False
        self._last_time = time.perf_counter()
        if not self.enabled:
            return
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise ValueError(f"metrics workdir '{self.workdir}' is a file: expected a directory")
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        if wandb:  # before any file is opened: a missing package leaves nothing to close
            self._wandb = _start_wandb(self.workdir, wandb_config)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the earlier events with step >= it (a restart).
            # tensorboardX names event files by the second; the nanosecond suffix keeps a writer
            # opened within the same second as the last one from overwriting its file, and
            # still sorts after it (TensorBoard reads files in name order).
            self._tb = SummaryWriter(
                os.path.join(self.workdir, TB_DIR),
                purge_step=None if resume_step is None else resume_step + 1,
                filename_suffix=f".{time.time_ns()}",
            )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=resume_step or 0,
                file=sys.stderr,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def _truncate_after(self, step: int) -> None:
        rows, torn = read_jsonl(self.path)
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) == len(rows) and not torn:
            return
        fd, tmp = tempfile.mkstemp(prefix=JSONL + ".", suffix=".tmp", dir=self.workdir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in kept:
                    f.write(json.dumps(row, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        logger.info(
            "resuming at step %d: dropped %d metric line(s) after it from %s",
            step,
            len(rows) - len(kept) + torn,
            self.path,
        )

    def _check_open(self):
        if self._closed:
            raise ValueError(f"MetricWriter for '{self.workdir}' is closed: expected an open one")

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Append ``{"step": step, prefix + name: value, ...}`` to the JSONL file and the
        numeric values to TensorBoard (tag ``prefix + name``)."""
        self._check_open()
        if not self.enabled:
            return
        if isinstance(step, np.integer) or (hasattr(step, "shape") and getattr(step, "shape", None) == ()):
            step = int(np.asarray(step))
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r}: expected an int >= 0")
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics is a {type(metrics).__name__}: expected a dict of name -> number")
        row: dict[str, Any] = {"step": step}
        for name, value in metrics.items():
            key = f"{prefix}{name}"
            if key == "step":
                raise ValueError("metric name 'step' is reserved: expected another name (the step is the row key)")
            row[key] = _scalar(key, value)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            now = time.time()
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(key, float(_NONFINITE[value] if isinstance(value, str) else value), step, now)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(
                {k: _NONFINITE[v] if isinstance(v, str) else v for k, v in row.items() if k != "step"}, step=step
            )

    def progress(self, step: int, *, tokens: int | None = None, **postfix: Any) -> None:
        """Move the bar to ``step`` and show ``postfix`` (numbers shortened). ``tokens``: the
        tokens processed since the previous call; shown as ``tok/s`` over the wall time since
        then."""
        self._check_open()
        if self._bar is None:
            return
        now = time.perf_counter()
        shown = {}
        if tokens is not None:
            shown["tok/s"] = f"{tokens / max(now - self._last_time, 1e-9):.4g}"
        self._last_time = now
        for name, value in postfix.items():
            try:
                value = float(np.asarray(value))
                shown[name] = f"{value:.4g}"
            except (TypeError, ValueError):
                shown[name] = str(value)
        if int(step) > self._bar.n:
            self._bar.update(int(step) - self._bar.n)
        self._bar.set_postfix(shown, refresh=True)

    def flush(self) -> None:
        if self._file is not None and not self._closed:
            self._file.flush()
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files and the bar (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
