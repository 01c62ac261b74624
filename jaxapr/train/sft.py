"""Supervised fine-tuning on search traces: next-token loss on the trained positions.

A batch is what ``jaxapr.data.make_loader`` yields: ``tokens``, ``loss_mask``,
``segment_ids``, ``positions`` (int32[B, L]). Token ``t+1`` is predicted from tokens ``<= t``
of the same segment; it counts when ``loss_mask[t+1] = 1`` (outputs of calls and their EOS;
prompts and join contexts are masked unless the dataset was loaded with
``train_on_prompt``). The loss is the mean over all counted tokens of the batch, so a packed
batch and the same examples unpacked give the same loss and gradients.

``make_sft_step(graphdef, tx, accum_steps)`` returns one jitted update that splits the batch
into ``accum_steps`` micro-batches (``lax.scan``), sums their gradients and applies the
optimizer once; the state is donated.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxapr.train import loop, run_config
from jaxapr.train.state import TrainState

BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


def token_logprobs(graphdef, params, tokens, positions=None, segment_ids=None, forward=None) -> jax.Array:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) as float32[B, L-1] under the policy.
    ``forward``: the training forward's options (``remat``, ``attention``: ``model.REMATS``,
    ``model.ATTENTIONS``), the same values either way."""
    policy = nnx.merge(graphdef, params)
    logits = policy(tokens, positions, segment_ids, **dict(forward or {}))[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def target_mask(batch: dict) -> jax.Array:
    """float32[B, L-1]: 1 where token t+1 is trained and is in t's segment."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (same & (batch["loss_mask"][:, 1:] > 0)).astype(jnp.float32)


def loss_sums(graphdef, params, batch: dict, forward=None) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over trained tokens, number of trained tokens)."""
    logp = token_logprobs(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"], forward)
    mask = target_mask(batch)
    return -(logp * mask).sum(), mask.sum()


def sft_loss(graphdef, params, batch: dict) -> jax.Array:
    """Mean next-token loss over the trained tokens of ``batch``."""
    total, count = loss_sums(graphdef, params, batch)
    return total / jnp.maximum(count, 1.0)


def _split(batch: dict, parts: int) -> dict:
    """[parts, B / parts, ...] micro-batches, micro-batch m holding rows m, m + parts, ...: a
    device's contiguous block of a data-split batch gives every micro-batch the same share, so
    each stays split over the data devices (contiguous micro-batches would each sit on
    1 / parts of them)."""
    b = batch["tokens"].shape[0]
    if b % parts:
        raise ValueError(f"batch size {b} is not divisible by accum_steps={parts}")
    return {k: jnp.swapaxes(batch[k].reshape(b // parts, parts, *batch[k].shape[1:]), 0, 1) for k in BATCH_KEYS}


def sft_grads(graphdef, params, batch: dict, accum_steps: int = 1, forward=None, micro_sharding=None):
    """(mean loss, gradients of it, trained-token count) with gradient accumulation;
    ``micro_sharding`` (a batch's data-split sharding on a mesh) keeps each micro-batch split."""
    grad_fn = jax.value_and_grad(lambda p, mb: loss_sums(graphdef, p, mb, forward), has_aux=True)
    micro = _split(batch, accum_steps)

    def body(carry, mb):
        total, count, grads = carry
        if micro_sharding is not None:
            mb = jax.lax.with_sharding_constraint(mb, jax.tree.map(lambda _: micro_sharding, mb))
        (t, c), g = grad_fn(params, mb)
        return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (total, count, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros), micro)
    denom = jnp.maximum(count, 1.0)
    return total / denom, jax.tree.map(lambda g: g / denom, grads), count


def make_sft_step(
    graphdef,
    tx: optax.GradientTransformation,
    accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    state_shardings=None,
    batch_sharding=None,
    remat: str = "none",
    attention: str = "blocked",
):
    """A jitted ``step(state, batch) -> (state, metrics)`` (state donated). Metrics: loss,
    grad_norm, tokens (trained tokens), lr (when ``schedule`` is given), finite. ``remat`` and
    ``attention``: the training forward's options (``model.REMATS``, ``model.ATTENTIONS``). On a
    mesh (``state_shardings``) each micro-batch is split like ``batch_sharding`` (default: the
    mesh's data sharding)."""
    from jaxapr import model as model_lib
    from jaxapr import sharding

    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps!r}: expected a positive int")
    model_lib.check_train_options(remat, attention)
    forward = {"remat": remat, "attention": attention}
    micro_sharding = sharding.rows_sharding(state_shardings, batch_sharding)

    def step(state: TrainState, batch: dict):
        loss, grads, count = sft_grads(graphdef, state.params, batch, accum_steps, forward, micro_sharding)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves the state unchanged (the caller stops the run).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
        )
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count, "finite": finite}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return new, metrics

    kw: dict[str, Any] = {"donate_argnums": (0,)}
    if state_shardings is not None:
        kw["in_shardings"] = (state_shardings, batch_sharding)
        kw["out_shardings"] = (state_shardings, None)
    return jax.jit(step, **kw)


def make_eval_step(graphdef):
    """A jitted ``eval(params, batch) -> (loss sum, token count)`` (no gradients)."""
    return jax.jit(lambda params, batch: loss_sums(graphdef, params, batch))


# --------------------------------------------------------------------------------------
# The run: data -> jitted steps -> validation, checkpoints, metrics (jaxapr.train.loop)
# --------------------------------------------------------------------------------------
def init_params(init_from: str, which: str, cfg):
    """The parameters of ``init_from`` (a train_sft / train_rl workdir or an exported ``.npz``)
    for a run whose model config is ``cfg``; a different model is a one-line error."""
    from jaxapr import policy_io

    init_cfg, params, _ = policy_io.load_params(init_from, which=which)
    if init_cfg != cfg:
        diff = [
            f"{k}={getattr(init_cfg, k)!r} (run: {getattr(cfg, k)!r})"
            for k in cfg.__dataclass_fields__
            if getattr(init_cfg, k) != getattr(cfg, k)
        ]
        raise ValueError(
            f"config.init_from={init_from!r} is a different model: {', '.join(diff)}; expected the run's config.model"
        )
    return params


class SFTTask(loop.Task):
    """Supervised fine-tuning in the run skeleton: packed batches of one dataset kind, the
    masked next-token loss; validation loss on ``eval_batches`` batches and greedy rollouts
    on ``eval_problems`` problems. Checkpoints hold every process's data-loader position."""

    def resolve(self) -> None:
        from jaxapr import data as data_lib
        from jaxapr.train import plan

        config = self.config
        run_config.check_counts(
            config,
            positive=("num_steps", "batch_size", "accum_steps", "log_every", "checkpoint_every", "keep"),
            non_negative=("eval_every", "eval_problems", "eval_batches", "max_train_seconds"),
        )
        self.cfg = run_config.model_config(config)
        if config.kind not in data_lib.KINDS:
            raise ValueError(f"config.kind={config.kind!r}: expected one of {data_lib.KINDS}")
        if not config.data_dir:
            raise ValueError("config.data_dir is required: expected a directory written by experiments.gen_data")
        self.data_dir = os.path.join(config.data_dir, config.kind)
        data_lib.load_manifest(self.data_dir)  # one-line errors for a missing / stale dataset
        if config.seq_len > self.cfg.max_len:
            raise ValueError(
                f"config.seq_len={config.seq_len}: longer than the model's context max_len={self.cfg.max_len}"
            )
        self.processes = jax.process_count()
        if config.batch_size % self.processes:
            raise ValueError(f"batch_size={config.batch_size}: expected a multiple of the {self.processes} processes")
        plan.check_run(config, "sft", log=self.log)  # one line naming the field to change if it does not fit
        self.best_metric = "val/accuracy" if config.eval_problems else ("val/loss" if config.eval_batches else None)
        self.best_mode = "max" if config.eval_problems else "min"

    def build(self, resuming: bool):
        from envs import countdown
        from jaxapr import data as data_lib
        from jaxapr import distributed, policy_io
        from jaxapr.train import machine
        from jaxapr.train import mesh as mesh_lib

        config, cfg, log = self.config, self.cfg, self.log
        self.mesh = mesh_lib.make_run_mesh(config)
        rules = mesh_lib.run_rules(config, cfg)
        mesh_lib.check_batch_fits(config.batch_size, config.accum_steps, self.mesh)
        process, local_batch = jax.process_index(), config.batch_size // self.processes
        loader = data_lib.make_loader(
            self.data_dir,
            "train",
            batch_size=local_batch,
            seq_len=config.seq_len,
            seed=config.seed,
            shard_index=process,
            num_shards=self.processes,
            train_on_prompt=config.train_on_prompt,
            kind_repeats=dict(config.get("kind_repeats", None) or {}),
        )
        if loader.num_dropped:  # a serial policy with this window could not produce them either; say so once
            log(
                f"{loader.num_dropped} training examples are longer than seq_len={config.seq_len} tokens and are "
                f"left out ({loader.num_examples} examples per epoch remain)"
            )
        self.it = iter(loader)
        self.val_batches = []
        if config.eval_batches:
            val = data_lib.make_loader(
                self.data_dir,
                "val",
                batch_size=local_batch,
                seq_len=config.seq_len,
                seed=0,
                num_epochs=1,
                shard_index=process,
                num_shards=self.processes,
                train_on_prompt=config.train_on_prompt,
            )
            self.val_batches = list(itertools.islice(iter(val), config.eval_batches))
            if self.processes > 1:  # every process must run the same number of global eval steps
                self.val_batches = self.val_batches[: int(distributed.allgather(len(self.val_batches)).min())]
        self.eval_problems = None
        if config.eval_problems:
            numbers, targets = countdown.ProblemSplits.load(os.path.join(config.data_dir, "problems"))[
                config.eval_split
            ]
            self.eval_problems = (numbers[: config.eval_problems], targets[: config.eval_problems])

        tx, schedule = run_config.make_optimizer(config)
        policy = policy_io.make_policy(cfg, config.seed)
        init_from = config.get("init_from", "").replace("{kind}", config.kind)
        if init_from and not resuming:  # fine-tuning (a curriculum stage): another run's parameters, a fresh optimizer
            policy = nnx.merge(nnx.split(policy)[0], init_params(init_from, config.get("init_which", "best"), cfg))
        self.graphdef, state, shardings = mesh_lib.init_state_on_mesh(policy, tx, self.mesh, rules)
        self.step_fn = make_sft_step(
            self.graphdef,
            tx,
            config.accum_steps,
            schedule,
            state_shardings=shardings,
            remat=config.get("remat", "none"),
            attention=config.get("attention", "blocked"),
        )
        self.eval_fn = make_eval_step(self.graphdef)
        self.engine = None
        self.peak = machine.matmul_peak_flops(dtype=cfg.dtype)
        self.flops_per_token = 3 * model_flops(cfg, config.seq_len)
        self.window_t, self.window_tokens = time.perf_counter(), 0.0
        self.slot_tokens = 0.0  # all processes' non-pad tokens up to the last logged window
        return state

    def resume(self, state, extra: dict) -> int:
        saved = int(extra.get("data_processes", 1))
        if saved == self.processes:
            self.it.set_state(extra["data_by_process"][jax.process_index()] if self.processes > 1 else extra["data"])
        else:  # each process reads 1/P of the data: positions do not carry over to another P
            self.log(
                f"warning: the checkpoint was written by {saved} processes, this run has {self.processes}: "
                "parameters and optimizer state are restored, the data loaders start a new pass"
            )
        self.slot_tokens = float(extra.get("slot_tokens", 0.0))
        return super().resume(state, extra)

    def checkpoint_extra(self) -> dict:  # every process's loader position (the meta JSON is process 0's)
        from jaxapr import distributed

        pending = self.window_tokens  # a checkpoint between two logged windows
        if self.processes > 1:
            pending = distributed.sum_across({"tokens": pending})["tokens"]
        extra = {"data": self.it.get_state(), "slot_tokens": self.slot_tokens + pending}
        if self.processes > 1:
            extra.update(data_processes=self.processes, data_by_process=distributed.allgather_json(extra["data"]))
        return extra

    def train_step(self, state, step: int):
        from jaxapr import distributed
        from jaxapr.train import mesh as mesh_lib

        local_batch = next(self.it)
        state, m = self.step_fn(state, mesh_lib.batch_to_device(local_batch, self.mesh))
        m = mesh_lib.host(m)
        loop.check_finite(m, step + 1)
        step += 1
        self.window_tokens += float(np.sum(local_batch["segment_ids"] > 0))
        if step % self.config.log_every and step != self.config.num_steps:
            return state, {}, {}
        elapsed = time.perf_counter() - self.window_t
        tokens = self.window_tokens
        if self.processes > 1:
            tokens = distributed.sum_across({"tokens": tokens})["tokens"]
        tps = tokens / max(elapsed, 1e-9)
        self.window_t, self.window_tokens = time.perf_counter(), 0.0
        self.slot_tokens += tokens
        metrics = {
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "lr": m["lr"],
            "trained_tokens": m["tokens"],
            "tokens_per_s": tps,  # this window's (evaluation and checkpoints in it included)
            "slot_tokens": self.slot_tokens,  # the run's so far: over train_seconds, its mean rate
            "peak_fraction": tps * self.flops_per_token / self.peak,
        }
        return state, metrics, {"loss": f"{m['loss']:.3f}", "tok_s": f"{tps:,.0f}"}

    def evaluate(self, state, step: int) -> dict:
        from jaxapr import distributed, evaluation
        from jaxapr import engine as engine_lib
        from jaxapr.train import mesh as mesh_lib

        out = {}
        if self.val_batches:
            sums = [self.eval_fn(state.params, mesh_lib.batch_to_device(b, self.mesh)) for b in self.val_batches]
            total, count = (float(sum(s[i] for s in sums)) for i in (0, 1))
            out["val/loss"] = total / max(count, 1.0)
        if self.eval_problems is not None:
            params = distributed.process_local(state.params)  # the engine is per process
            if self.engine is None:
                self.engine = engine_lib.Engine(
                    nnx.merge(self.graphdef, params),
                    num_slots=self.config.eval_num_slots,
                    max_len=self.config.eval_max_context or self.cfg.max_len,
                )
            self.engine.update_params(params)
            r = evaluation.rollout_metrics(
                None,
                self.eval_problems,
                mode=self.config.kind,
                max_context=self.engine.max_len,
                num_slots=self.config.eval_num_slots,
                engine=self.engine,
            )
            out.update({f"val/{k}": v for k, v in r.items()})
        return out


def train(config, workdir: str, log=print) -> dict:
    """Runs SFT as ``config`` says (``experiments/configs/sft.py``) in ``workdir``, resuming
    from its newest checkpoint when there is one (``jaxapr.train.loop``); returns the summary.

    Writes ``workdir/config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and
    ``summary.json``. A resumed run continues exactly (same batches, same parameters, same
    loss values) as if it had not stopped.
    """
    return loop.run(SFTTask(config, log), workdir)


def model_flops(cfg, seq_len: int) -> float:
    """Forward FLOPs per token of a packed row of ``seq_len`` (average context seq_len / 2)."""
    from jaxapr import model as model_lib

    return model_lib.flops_per_token(cfg, seq_len // 2)
