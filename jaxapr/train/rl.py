"""The GRPO run: an SFT checkpoint -> rollouts in-process -> jitted GRPO updates, resumable.

``train(config, workdir)`` (``experiments/train_rl.py``, configs in ``experiments/configs/rl.py``):

- starts from ``config.init_from`` (an SFT or GRPO workdir, its best checkpoint by default, or
  an exported policy ``.npz`` such as the shipped ``experiments/checkpoints/*.npz``)
  and takes the model config from it; the frozen KL reference is that checkpoint's parameters;
- each step draws ``grpo.num_problems`` training problems (from ``(seed, step)``: the data
  position is the step), samples ``group_size`` rollouts of each with one ``engine.Engine``
  that decodes with the trainer's current parameters (``update_params``: the same arrays, no
  copy), builds the batch (``grpo.build_batch``) and applies ``grpo.make_grpo_step``;
- logs per step: reward, success, children per problem, total / sequential tokens, KL, clip
  fraction, loss, grad norm, rollout and update seconds; validates greedily on held-out
  problems every ``eval_every`` steps; checkpoints (orbax) every ``checkpoint_every`` steps.

Randomness: the step's problems and keys come from ``(seed, step)`` alone, so a run resumed
from a checkpoint continues exactly.

Many hosts (``jaxapr.distributed``): process i of N rolls out problems ``[i P/N, (i+1) P/N)``
of the step (whole groups) on its own engine with a process-local copy of the parameters, its
samples' keys drawn from their indices among all P (so they do not depend on N); every
process pads its rows to the same bucket (``rows_per_process``, from the most rows any
process needs) and the update runs on the global batch of all processes' rows
(``process_batch``). Logged metrics are over all processes.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from flax import nnx

from jaxapr import distributed, evaluation
from jaxapr.train import common, grpo


def grpo_config(config) -> grpo.GRPOConfig:
    return grpo.GRPOConfig(**common.to_dict(config.grpo)).check()


def step_problems(problems, num: int, seed: int, step: int):
    """The ``num`` training problems of RL step ``step`` (without replacement within a step)."""
    numbers, targets = problems
    if num > len(targets):
        raise ValueError(f"grpo.num_problems={num}: the training split has only {len(targets)} problems")
    idx = np.random.default_rng([seed, step]).choice(len(targets), num, replace=False)
    return numbers[idx], targets[idx]


def rows_per_process(max_rows: int, num_minibatches: int, ways: int, processes: int) -> int:
    """Rows of every process's part of the step's batch: the bucket of the most rows any
    process needs (``grpo.rows_needed``), such that the global batch (processes x rows)
    splits into ``num_minibatches`` minibatches divisible by ``ways`` (= data x fsdp) and each
    part into ``num_minibatches``."""
    q = num_minibatches * ways
    multiple = math.lcm(num_minibatches, q // math.gcd(q, processes))
    return grpo.bucket_rows(max_rows, multiple)


def process_batch(results, gcfg: grpo.GRPOConfig, *, seq_len: int, num_rows: int, processes: int):
    """This process's rows of the step's global batch (``grpo.build_batch`` of its groups;
    every process has the same number of rollouts, so a call's weight 1 / (calls x all
    rollouts) is the local weight / ``processes``)."""
    batch, stats = grpo.build_batch(results, gcfg, seq_len=seq_len, num_rows=num_rows)
    batch = {k: v for k, v in batch.items() if k != "rollout"}
    if processes > 1:
        for k in ("weights", "token_weights"):
            if k in batch:
                batch[k] = batch[k] / np.float32(processes)
    return batch, stats


def train(config, workdir: str, log=print) -> dict:
    """Runs GRPO as ``config`` says; see the module docstring. Returns the final metrics."""
    from envs import countdown
    from jaxapr import engine as engine_lib
    from jaxapr.train.checkpoint import Checkpointer
    from jaxapr.train.metrics import MetricWriter

    workdir = common.ensure_workdir(workdir)
    if not config.init_from:
        raise ValueError("config.init_from is required: expected the workdir of a train_sft run or an exported .npz")
    if config.kind not in ("apr", "sosp"):
        raise ValueError(f"config.kind={config.kind!r}: expected 'apr' or 'sosp'")
    if not config.data_dir:
        raise ValueError("config.data_dir is required: expected a directory written by experiments.gen_data")
    cfg, init_params, init_config = common.load_params(config.init_from, which=config.init_which)
    with config.unlocked():
        config.model = init_config.model  # the policy is the checkpoint's
    gcfg = grpo_config(config)
    splits = countdown.ProblemSplits.load(os.path.join(config.data_dir, "problems"))
    train_problems = splits["train"]
    eval_problems = None
    if config.eval_problems:
        n, t = splits[config.eval_split]
        eval_problems = (n[:config.eval_problems], t[:config.eval_problems])
    max_context = int(config.max_context or cfg.max_len)
    if max_context > cfg.max_len:
        raise ValueError(f"config.max_context={max_context}: longer than the model's context max_len={cfg.max_len}")
    mesh = common.make_run_mesh(config)
    rules = common.run_rules(config, cfg)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]  # rows of every minibatch split over them
    process, processes = jax.process_index(), jax.process_count()
    if gcfg.num_problems % processes:  # whole groups per process: advantages never straddle processes
        raise ValueError(f"grpo.num_problems={gcfg.num_problems}: expected a multiple of the {processes} processes")
    mine = distributed.share(gcfg.num_problems)
    rows_guess = gcfg.num_problems * gcfg.group_size * 2
    micro_rows = grpo.micro_chunks(-(-rows_guess // gcfg.num_minibatches), max_context, gcfg.micro_batch_tokens)[1]
    common.check_memory(cfg, micro_rows, max_context, 1, what="GRPO")
    if config.optim.learning_rate != gcfg.learning_rate:
        raise ValueError(f"config.optim.learning_rate={config.optim.learning_rate} differs from "
                         f"config.grpo.learning_rate={gcfg.learning_rate}: set both (the GRPO rate is the optimizer's)")
    tx, schedule = common.make_run_optimizer(common.optimizer_config(config))
    policy = common.make_policy(cfg, 0)
    graphdef, _ = nnx.split(policy)
    policy = nnx.merge(graphdef, init_params)
    graphdef, state, shardings = common.init_state_on_mesh(policy, tx, mesh, rules)
    ref_params = grpo.reference_params(state.params) if gcfg.beta else None
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config=common.to_dict(config), keep=config.keep,
                        best_metric="val/accuracy" if eval_problems is not None else None,
                        async_save=config.async_checkpoint)
    start, train_seconds = 0, 0.0
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state)
        start, train_seconds = int(extra["rl_step"]), float(extra["train_seconds"])
        log(f"resumed from RL step {start} ({train_seconds:.0f} s of training so far)")
    if process == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:  # after the checkpoint's config check
            f.write(config.to_json(indent=2))
    writer = MetricWriter(workdir, total_steps=config.num_steps, enabled=process == 0,
                          progress=config.progress, resume_step=start)
    step_fn = grpo.make_grpo_step(graphdef, tx, gcfg, schedule, state_shardings=shardings)
    # One engine per process, on its local devices, decoding with a process-local copy of the params.
    engine = engine_lib.Engine(nnx.merge(graphdef, distributed.process_local(state.params)),
                               num_slots=config.num_slots, max_len=max_context)
    rollout_kw = dict(max_context=max_context, max_depth=config.max_depth, decode_chunk=config.decode_chunk)

    def evaluate(step):
        engine.update_params(distributed.process_local(state.params))
        r = evaluation.rollout_metrics(None, eval_problems, mode=config.kind, max_context=max_context,
                                   num_slots=config.num_slots, engine=engine)
        out = {f"val/{k}": v for k, v in r.items()}
        out["train_seconds"] = train_seconds
        writer.write(step, out)
        log(f"RL step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
        return out

    if start == 0 and eval_problems is not None and config.eval_at_start:
        evaluate(0)
    last: dict = {}
    done = start
    base_key = jax.random.key(config.seed)
    for step in range(start, config.num_steps):
        if config.max_train_seconds and train_seconds >= config.max_train_seconds:
            log(f"time budget of {config.max_train_seconds} s reached at RL step {step}")
            break
        k_roll, k_upd = jax.random.split(jax.random.fold_in(base_key, step))
        t0 = time.perf_counter()
        numbers, targets = step_problems(train_problems, gcfg.num_problems, config.seed, step)
        problems = (numbers[mine.start:mine.stop], targets[mine.start:mine.stop])  # this process's groups
        results = grpo.rollout_groups(engine, distributed.process_local(state.params), problems, gcfg,
                                      key=k_roll, problem_ids=np.arange(mine.start, mine.stop), mode=config.kind,
                                      **rollout_kw)
        t1 = time.perf_counter()
        needed = grpo.rows_needed(results, max_context, gcfg.pack_calls, keep=grpo.rollout_mask(results, gcfg))
        max_rows = int(distributed.allgather(needed).max())  # every process's part has the same rows
        batch, stats = process_batch(results, gcfg, seq_len=max_context, processes=processes,
                                     num_rows=rows_per_process(max_rows, gcfg.num_minibatches, ways, processes))
        state, m = step_fn(state, ref_params, common.batch_to_device(batch, mesh), k_upd)
        m = common.host(m)
        common.check_finite(m, step + 1)
        t2 = time.perf_counter()
        train_seconds += t2 - t0
        r = grpo.rewards(results, gcfg)
        local = [r.sum(), sum(x.success for x in results), stats["zero_groups"] * len(results) / gcfg.group_size,
                 stats["calls"], stats["trained_calls"], sum(x.num_children for x in results),
                 sum(x.total_tokens for x in results), sum(x.sequential_tokens for x in results), len(results)]
        (reward, success, zero, calls, trained_calls, children, gen, seq, n), rollout_seconds = (
            distributed.allgather(np.array(local, np.float64)).sum(axis=0), distributed.max_across(t1 - t0))
        last = {
            "reward": reward / n, "success": success / n, "zero_groups": zero / (n / gcfg.group_size),
            "children_per_problem": children / n, "total_tokens": gen / n, "sequential_tokens": seq / n,
            "calls": int(calls), "trained_calls": int(trained_calls), "kl": m["kl"],
            "clip_fraction": m["clip_fraction"], "loss": m["loss"],
            "grad_norm": m["grad_norm"], "lr": m.get("lr", gcfg.learning_rate), "rollout_seconds": rollout_seconds,
            "update_seconds": t2 - t1, "gen_tokens_per_s": gen / max(rollout_seconds, 1e-9),
            "train_seconds": train_seconds,
        }
        done = step + 1
        writer.write(done, {f"rl/{k}": v for k, v in last.items()})
        writer.progress(done, reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.2e}")
        ev = None
        if eval_problems is not None and (done % config.eval_every == 0 or done == config.num_steps):
            ev = evaluate(done)
        if done % config.checkpoint_every == 0 or done == config.num_steps:
            if eval_problems is not None and ev is None:
                ev = evaluate(done)
            ckpt.save(done, state, extra={"rl_step": done, "train_seconds": train_seconds}, metrics=ev,
                      force=done == config.num_steps)
    ckpt.wait()
    ckpt.close()
    writer.close()
    summary = {"rl_step": done, "train_seconds": train_seconds, **last,
               **(common.read_last_eval(workdir) or {})}
    if process == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
