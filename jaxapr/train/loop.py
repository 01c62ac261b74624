"""The run skeleton that SFT and GRPO share: one work directory, one writer, resumable.

``run(task, workdir)`` does, in order:

1. **work directory**: created if missing; a file or an unwritable path is a one-line error;
2. **lock** (``jaxapr.train.lock``): one writer per directory, a second run fails at once;
3. **fresh run on request**: ``config.overwrite=True`` deletes the previous run's outputs
   (checkpoints, metrics, TensorBoard events, config.json, summary.json) first;
4. **task**: ``task.build(resuming)`` checks the config and builds data, model, mesh and the
   initial train state;
5. **resume**: the newest checkpoint that restores (corrupt ones are skipped and later moved
   aside, see ``checkpoint``) must have been written by the same run: its config equals this
   one on every field but ``run_config.RESUMABLE``, else one line lists the differing fields;
6. **loop**: ``task.train_step`` until ``config.num_steps`` (or ``config.max_train_seconds``
   of training), metrics to ``metrics.jsonl`` and TensorBoard, ``task.evaluate`` every
   ``config.eval_every`` steps, at checkpoints when the task keeps a best checkpoint, and at
   the end; a checkpoint every ``config.checkpoint_every`` steps and at the end;
7. **summary**: ``summary.json`` (the last training metrics, the last validation row, and
   ``resumed_from``: the step this invocation began at, 0 when it ran from the start).

Every process runs the skeleton; process 0 writes the shared files. A :class:`Task` (``sft``,
``rl``) says only what differs: its config checks, data, state, step and evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np

from jaxapr import distributed
from jaxapr.train import lock as lock_lib
from jaxapr.train import run_config

# What a run writes into its work directory (a fresh run deletes these and nothing else).
OUTPUTS = ("checkpoints", "tensorboard", "metrics.jsonl", "val_records.jsonl", "config.json", "summary.json")


class TrainingError(RuntimeError):
    """A run stopped on purpose (NaN loss, bad data); the last good checkpoint is intact."""


class Task:
    """One kind of training run plugged into :func:`run`. Subclasses set the class fields and
    implement the methods; ``self.config`` is the run config, ``self.log`` prints on process 0,
    ``self.workdir`` is the run's directory (set by :func:`run`)."""

    counter = "step"  # the summary key of the run's step counter
    counter_label = "step"  # how log lines name it
    prefix = "train/"  # of the per-step metrics
    best_metric: str | None = None  # keep the best checkpoint by this validation metric
    best_mode = "max"

    def __init__(self, config, log=print):
        self.config, self.log = config, log
        self.workdir: str | None = None

    def resolve(self) -> None:
        """Check the config and fill what follows from it (cheap: the checkpoint identity is
        this config)."""

    def build(self, resuming: bool) -> Any:
        """Data, model, mesh and optimizer; returns the train state at step 0."""
        raise NotImplementedError

    def resume(self, state, extra: dict) -> int:
        """Continue from a checkpoint's state and ``extra`` (data positions); returns the
        counter to continue from (saved in ``extra`` under :attr:`counter`)."""
        return int(extra[self.counter]) if self.counter in extra else int(state.step)

    def checkpoint_extra(self) -> dict:
        """What a resumed run needs besides the state (JSON data)."""
        return {}

    def train_step(self, state, step: int) -> tuple[Any, dict, dict]:
        """Counter ``step`` -> ``step + 1``: (new state, metrics to log now or {}, progress
        bar postfix). Raises :class:`TrainingError` on a non-finite loss."""
        raise NotImplementedError

    def evaluate(self, state, step: int) -> dict:
        """Validation metrics (``val/...``) of ``state``; {} when the run has none."""
        return {}


def check_finite(metrics: dict, step: int) -> None:
    """A :class:`TrainingError` when the step's loss (or its ``finite`` flag) is not finite."""
    loss = float(metrics.get("loss", 0.0))
    if not bool(metrics.get("finite", True)) or not np.isfinite(loss):
        raise TrainingError(
            f"non-finite loss {loss} at step {step}: stopped (the update was not applied; the last "
            "good checkpoint is intact) - lower the learning rate (a fresh run: a new workdir or "
            "--config.overwrite=True) or check the data"
        )


def prepare_workdir(workdir: str | None, what: str = "workdir") -> str:
    """``workdir`` created if missing and checked writable; one-line errors otherwise."""
    if not workdir:
        raise ValueError(f"--{what} is required: expected a directory for checkpoints and metrics")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--{what}={workdir!r} is a file: expected a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--{what}={workdir!r} cannot be created ({e.strerror}): expected a writable path") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ValueError(f"--{what}={workdir!r} cannot be written (Permission denied): expected a writable directory")
    return workdir


def remove_outputs(workdir: str, log=print) -> None:
    """Delete a previous run's outputs from ``workdir`` (:data:`OUTPUTS`); other files stay."""
    gone = []
    for name in OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        gone.append(name)
    if gone:
        log(f"config.overwrite: deleted the previous run's {', '.join(gone)} in {workdir}")


def read_last_eval(workdir: str) -> dict:
    """The newest line of ``metrics.jsonl`` with validation metrics (``val/...``), or {}."""
    from jaxapr.train.metrics import read_metrics

    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return {}
    rows = read_metrics(workdir, prefix="val/")
    return rows[-1] if rows else {}


def run(task: Task, workdir: str) -> dict:
    """Runs ``task`` in ``workdir`` (see the module docstring); returns the summary."""
    workdir = prepare_workdir(workdir)
    with lock_lib.hold(workdir, log=task.log):
        if task.config.get("overwrite", False) and distributed.is_main():
            remove_outputs(workdir, task.log)
        if distributed.process_count() > 1:
            distributed.barrier("run outputs ready")
        task.resolve()
        return _Loop(task, workdir).run()


class _Loop:
    """The state of one :func:`run` between its steps."""

    def __init__(self, task: Task, workdir: str):
        from jaxapr.train.checkpoint import Checkpointer

        self.task, self.config, self.log, self.workdir = task, task.config, task.log, workdir
        task.workdir = workdir
        self.main = distributed.is_main()
        self.ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            config=run_config.to_dict(self.config),
            keep=self.config.keep,
            best_metric=task.best_metric,
            best_mode=task.best_mode,
            async_save=self.config.async_checkpoint,
            compare_keys=None,
            ignore_keys=run_config.RESUMABLE,
        )
        self.train_seconds = 0.0
        self.writer = None

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.ckpt.close()
            if self.writer is not None:
                self.writer.close()

    def _run(self) -> dict:
        from jaxapr.train.metrics import MetricWriter

        task, config = self.task, self.config
        resuming = self.ckpt.latest_step() is not None
        state = task.build(resuming)
        step = 0
        if resuming:
            state, extra = self.ckpt.restore(state)
            step = task.resume(state, extra)
            self.train_seconds = float(extra.get("train_seconds", 0.0))
            self.log(f"resumed from {task.counter_label} {step} ({self.train_seconds:.0f} s of training so far)")
        resumed_from = step  # where this invocation began: its wall time covers only the steps after
        if self.main:  # after the checkpoint's identity check
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=2))
        self.writer = MetricWriter(
            self.workdir,
            total_steps=config.num_steps,
            enabled=self.main,
            progress=config.progress,
            resume_step=step,
            wandb=config.get("wandb", False),
            wandb_config=run_config.to_dict(config),
        )
        if step == 0 and config.get("eval_at_start", False):
            self._evaluate(state, 0)
        last: dict = {}
        while step < config.num_steps:
            if config.max_train_seconds and self.train_seconds >= config.max_train_seconds:
                self.log(f"time budget of {config.max_train_seconds} s reached at {task.counter_label} {step}")
                break
            t0 = time.perf_counter()
            state, metrics, postfix = task.train_step(state, step)
            step += 1
            self.train_seconds += time.perf_counter() - t0
            if metrics:
                last = {**metrics, "train_seconds": self.train_seconds}
                self.writer.write(step, {f"{task.prefix}{k}": v for k, v in last.items()})
                self.writer.progress(step, **postfix)
            save = step % config.checkpoint_every == 0 or step == config.num_steps
            ev = {}
            if (
                (config.eval_every and step % config.eval_every == 0)
                or step == config.num_steps
                or (save and task.best_metric is not None)
            ):
                ev = self._evaluate(state, step)
            if save:
                self._save(state, step, ev, force=step == config.num_steps)
        final = {task.counter: step, "train_seconds": self.train_seconds, "resumed_from": resumed_from, **last}
        if step < config.num_steps:  # stopped by the time budget: evaluate and keep it
            ev = self._evaluate(state, step)
            if self.ckpt.latest_step() != step:
                self._save(state, step, ev, force=True)
        self.ckpt.wait()
        self.writer.close()
        summary = {**final, **read_last_eval(self.workdir)}
        if self.main:
            with open(os.path.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary

    def _evaluate(self, state, step: int) -> dict:
        out = self.task.evaluate(state, step)
        if out:
            out["train_seconds"] = self.train_seconds
            self.writer.write(step, out)
            self.log(f"{self.task.counter_label} {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
        return out

    def _save(self, state, step: int, ev: dict, force: bool) -> None:
        extra = {**self.task.checkpoint_extra(), self.task.counter: step, "train_seconds": self.train_seconds}
        self.ckpt.save(step, state, extra=extra, metrics=ev or None, force=force)
