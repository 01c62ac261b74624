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

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxapr.train.state import TrainState

BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


def token_logprobs(graphdef, params, tokens, positions=None, segment_ids=None) -> jax.Array:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) as float32[B, L-1] under the policy."""
    policy = nnx.merge(graphdef, params)
    logits = policy(tokens, positions, segment_ids)[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def target_mask(batch: dict) -> jax.Array:
    """float32[B, L-1]: 1 where token t+1 is trained and is in t's segment."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (same & (batch["loss_mask"][:, 1:] > 0)).astype(jnp.float32)


def loss_sums(graphdef, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over trained tokens, number of trained tokens)."""
    logp = token_logprobs(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    mask = target_mask(batch)
    return -(logp * mask).sum(), mask.sum()


def sft_loss(graphdef, params, batch: dict) -> jax.Array:
    """Mean next-token loss over the trained tokens of ``batch``."""
    total, count = loss_sums(graphdef, params, batch)
    return total / jnp.maximum(count, 1.0)


def _split(batch: dict, parts: int) -> dict:
    b = batch["tokens"].shape[0]
    if b % parts:
        raise ValueError(f"batch size {b} is not divisible by accum_steps={parts}")
    return {k: batch[k].reshape(parts, b // parts, *batch[k].shape[1:]) for k in BATCH_KEYS}


def sft_grads(graphdef, params, batch: dict, accum_steps: int = 1):
    """(mean loss, gradients of it, trained-token count) with gradient accumulation."""
    grad_fn = jax.value_and_grad(lambda p, mb: loss_sums(graphdef, p, mb), has_aux=True)
    micro = _split(batch, accum_steps)

    def body(carry, mb):
        total, count, grads = carry
        (t, c), g = grad_fn(params, mb)
        return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (total, count, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros), micro)
    denom = jnp.maximum(count, 1.0)
    return total / denom, jax.tree.map(lambda g: g / denom, grads), count


def make_sft_step(graphdef, tx: optax.GradientTransformation, accum_steps: int = 1,
                  schedule: optax.Schedule | None = None, state_shardings=None, batch_sharding=None):
    """A jitted ``step(state, batch) -> (state, metrics)`` (state donated). Metrics: loss,
    grad_norm, tokens (trained tokens), lr (when ``schedule`` is given), finite."""
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps!r}: expected a positive int")

    def step(state: TrainState, batch: dict):
        loss, grads, count = sft_grads(graphdef, state.params, batch, accum_steps)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves the state unchanged (the caller stops the run).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state))
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
# The run: data -> jitted steps -> validation, checkpoints, metrics (resumable)
# --------------------------------------------------------------------------------------
def init_params(init_from: str, which: str, cfg):
    """The parameters of ``init_from`` (a train_sft / train_rl workdir or an exported ``.npz``)
    for a run whose model config is ``cfg``; a different model is a one-line error."""
    from jaxapr.train import common

    init_cfg, params, _ = common.load_params(init_from, which=which)
    if init_cfg != cfg:
        diff = [f"{k}={getattr(init_cfg, k)!r} (run: {getattr(cfg, k)!r})" for k in cfg.__dataclass_fields__
                if getattr(init_cfg, k) != getattr(cfg, k)]
        raise ValueError(f"config.init_from={init_from!r} is a different model: {', '.join(diff)}; "
                         "expected the run's config.model")
    return params


def train(config, workdir: str, log=print) -> dict:
    """Runs SFT as ``config`` says (``experiments/configs/sft.py``), resuming from the newest
    checkpoint in ``workdir`` when there is one; returns the final metrics.

    Writes ``workdir/config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and
    ``summary.json``. A resumed run continues exactly (same batches, same parameters, same
    loss values) as if it had not stopped.
    """
    import os
    import time

    import numpy as np

    from envs import countdown
    from jaxapr import data as data_lib
    from jaxapr import distributed
    from jaxapr import engine as engine_lib
    from jaxapr import evaluation
    from jaxapr.train import common
    from jaxapr.train.checkpoint import Checkpointer
    from jaxapr.train.metrics import MetricWriter

    workdir = common.ensure_workdir(workdir)
    cfg = common.model_config(config)
    if config.kind not in data_lib.KINDS:
        raise ValueError(f"config.kind={config.kind!r}: expected one of {data_lib.KINDS}")
    if not config.data_dir:
        raise ValueError("config.data_dir is required: expected a directory written by experiments.gen_data")
    data_dir = os.path.join(config.data_dir, config.kind)
    data_lib.load_manifest(data_dir)  # one-line errors for a missing / stale dataset
    seq_len = int(config.seq_len)
    if seq_len > cfg.max_len:
        raise ValueError(f"config.seq_len={seq_len}: longer than the model's context max_len={cfg.max_len}")
    mesh = common.make_run_mesh(config)
    rules = common.run_rules(config, cfg)
    common.check_batch_fits(config.batch_size, config.accum_steps, mesh)
    common.check_memory(cfg, config.batch_size, seq_len, config.accum_steps)
    process, processes = jax.process_index(), jax.process_count()
    if config.batch_size % processes:
        raise ValueError(f"batch_size={config.batch_size}: expected a multiple of the {processes} processes")
    loader = data_lib.make_loader(data_dir, "train", batch_size=config.batch_size // processes, seq_len=seq_len,
                                  seed=config.seed, shard_index=process, num_shards=processes,
                                  train_on_prompt=config.train_on_prompt,
                                  kind_repeats=dict(config.get("kind_repeats", None) or {}))
    if loader.num_dropped:  # a serial policy with this window could not produce them either; say so once
        log(f"{loader.num_dropped} training examples are longer than seq_len={seq_len} tokens and are left out "
            f"({loader.num_examples} examples per epoch remain)")
    val_batches = []
    if config.eval_batches:
        val = data_lib.make_loader(data_dir, "val", batch_size=config.batch_size // processes, seq_len=seq_len,
                                   seed=0, num_epochs=1, shard_index=process, num_shards=processes,
                                   train_on_prompt=config.train_on_prompt)
        val_it = iter(val)
        for _ in range(config.eval_batches):
            try:
                val_batches.append(next(val_it))
            except StopIteration:
                break
        if processes > 1:  # every process must run the same number of global eval steps
            val_batches = val_batches[:int(distributed.allgather(len(val_batches)).min())]
    eval_problems = None
    if config.eval_problems:
        numbers, targets = countdown.ProblemSplits.load(os.path.join(config.data_dir, "problems"))[config.eval_split]
        eval_problems = (numbers[:config.eval_problems], targets[:config.eval_problems])

    tx, schedule = common.make_run_optimizer(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config=common.to_dict(config), keep=config.keep,
                        best_metric="val/accuracy" if eval_problems is not None else "val/loss",
                        best_mode="max" if eval_problems is not None else "min",
                        async_save=config.async_checkpoint)
    resuming = ckpt.latest_step() is not None
    policy = common.make_policy(cfg, config.seed)
    init_from = config.get("init_from", "").replace("{kind}", config.kind)
    if init_from and not resuming:  # fine-tuning (a curriculum stage): another run's parameters, a fresh optimizer
        policy = nnx.merge(nnx.split(policy)[0], init_params(init_from, config.get("init_which", "best"), cfg))
    graphdef, state, shardings = common.init_state_on_mesh(policy, tx, mesh, rules)
    it = iter(loader)
    train_seconds, start = 0.0, 0
    if resuming:
        state, extra = ckpt.restore(state)
        saved_processes = int(extra.get("data_processes", 1))
        if saved_processes == processes:
            it.set_state(extra["data_by_process"][process] if processes > 1 else extra["data"])
        else:  # each process reads 1/P of the data: positions do not carry over to another P
            log(f"warning: the checkpoint was written by {saved_processes} processes, this run has {processes}: "
                "parameters and optimizer state are restored, the data loaders start a new pass")
        train_seconds, start = float(extra["train_seconds"]), int(state.step)
        log(f"resumed from step {start} ({train_seconds:.0f} s of training so far)")
    if process == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:  # after the checkpoint's config check
            f.write(config.to_json(indent=2))
    writer = MetricWriter(workdir, total_steps=config.num_steps, enabled=process == 0,
                          progress=config.progress, resume_step=start)
    step_fn = make_sft_step(graphdef, tx, config.accum_steps, schedule, state_shardings=shardings,
                            batch_sharding=None)
    eval_fn = make_eval_step(graphdef)
    engine = None
    peak = common.matmul_peak_flops(dtype=cfg.dtype)
    flops_per_token = 3 * model_flops(cfg, seq_len)

    def evaluate(step):
        nonlocal engine
        out = {}
        if val_batches:
            sums = [eval_fn(state.params, common.batch_to_device(b, mesh)) for b in val_batches]
            total, count = (float(sum(s[i] for s in sums)) for i in (0, 1))
            out["val/loss"] = total / max(count, 1.0)
        if eval_problems is not None:
            params = distributed.process_local(state.params)  # the engine is per process
            if engine is None:
                engine = engine_lib.Engine(nnx.merge(graphdef, params), num_slots=config.eval_num_slots,
                                           max_len=config.eval_max_context or cfg.max_len)
            engine.update_params(params)
            r = evaluation.rollout_metrics(None, eval_problems, mode=config.kind, max_context=engine.max_len,
                                       num_slots=config.eval_num_slots, engine=engine)
            out.update({f"val/{k}": v for k, v in r.items()})
        if out:
            out["train_seconds"] = train_seconds
            writer.write(step, out)
            log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
        return out

    def data_extra(seconds):  # every process's loader position (the meta JSON is process 0's)
        extra = {"data": it.get_state(), "train_seconds": seconds}
        if processes > 1:
            from jaxapr.train.checkpoint import decode_json, encode_json

            states = distributed.allgather_json(encode_json(extra["data"], "data state"))
            extra.update(data_processes=processes, data_by_process=[decode_json(x) for x in states])
        return extra

    if start == 0 and config.eval_at_start:
        evaluate(0)
    last = {}
    window_t, window_tokens = time.perf_counter(), 0.0
    while int(state.step) < config.num_steps:
        if config.max_train_seconds and train_seconds >= config.max_train_seconds:
            log(f"time budget of {config.max_train_seconds} s reached at step {int(state.step)}")
            break
        t0 = time.perf_counter()
        local_batch = next(it)
        batch = common.batch_to_device(local_batch, mesh)
        state, m = step_fn(state, batch)
        m = common.host(m)
        step = int(state.step)
        common.check_finite(m, step + (0 if m["finite"] else 1))
        dt = time.perf_counter() - t0
        train_seconds += dt
        window_tokens += float(np.sum(local_batch["segment_ids"] > 0))
        if step % config.log_every == 0 or step == config.num_steps:
            elapsed = time.perf_counter() - window_t
            if processes > 1:
                window_tokens = distributed.sum_across({"tokens": window_tokens})["tokens"]
            tps = window_tokens / max(elapsed, 1e-9)
            last = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"], "trained_tokens": m["tokens"],
                    "tokens_per_s": tps, "peak_fraction": tps * flops_per_token / peak, "train_seconds": train_seconds}
            writer.write(step, {f"train/{k}": v for k, v in last.items()})
            writer.progress(step, loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}")
            window_t, window_tokens = time.perf_counter(), 0.0
        ev = {}
        if config.eval_every and step % config.eval_every == 0 and step < config.num_steps:
            ev = evaluate(step)
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            if step == config.num_steps:
                ev = evaluate(step)
            ckpt.save(step, state, extra=data_extra(train_seconds), metrics=ev or None,
                      force=step == config.num_steps)
    final = {"step": int(state.step), "train_seconds": train_seconds, **last}
    if int(state.step) < config.num_steps:  # stopped by the time budget: evaluate and keep it
        final.update(evaluate(int(state.step)))
        ckpt.save(int(state.step), state, extra=data_extra(train_seconds), metrics=final, force=True)
    ckpt.wait()
    ckpt.close()
    writer.close()
    summary = {**final, **{k: v for k, v in (common.read_last_eval(workdir) or {}).items()}}
    if process == 0:
        import json

        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def model_flops(cfg, seq_len: int) -> float:
    """Forward FLOPs per token of a packed row of ``seq_len`` (average context seq_len / 2)."""
    from jaxapr import model as model_lib

    return model_lib.flops_per_token(cfg, seq_len // 2)
