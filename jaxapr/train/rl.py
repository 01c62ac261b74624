"""The GRPO run: an SFT checkpoint -> rollouts in-process -> jitted GRPO updates, resumable.

``train(config, workdir)`` (``experiments/train_rl.py``, configs in ``experiments/configs/rl.py``):

- starts from ``config.init_from`` (an SFT or GRPO workdir, its best checkpoint by default, or
  an exported policy ``.npz`` such as the shipped ``experiments/checkpoints/*.npz``)
  and takes the model config from it; the frozen KL reference is that checkpoint's parameters;
- each step draws ``grpo.num_problems`` training problems (from ``(seed, step)``: the data
  position is the step), samples ``group_size`` rollouts of each with one ``engine.Engine``
  that decodes with the trainer's current parameters (``update_params``: the same arrays, no
  copy), builds the batch (``grpo.build_batch``) and applies ``grpo.make_grpo_step``; a step
  where no call is trained (every group's rewards equal: no advantage) runs no update, its
  parameters and optimizer state unchanged and its update metrics 0;
- logs per step: reward, success, children per problem, total / sequential tokens, KL, clip
  fraction, loss, grad norm, rollout and update seconds; validates greedily on held-out
  problems every ``eval_every`` steps (the scalars in ``metrics.jsonl``, each problem's
  success, children and tokens in ``val_records.jsonl``, so two validations of the run compare
  paired: :func:`read_val_records`); checkpoints (orbax) every ``checkpoint_every`` steps.

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
from jaxapr.train import grpo, loop, run_config
from jaxapr.train.metrics import read_jsonl

VAL_RECORDS = "val_records.jsonl"


def read_val_records(workdir: str) -> dict[int, dict]:
    """{RL step: that step's validation records ({field: per-problem list}: every
    ``evaluation.problem_records`` field, for APR runs with ``runtime.join_diagnostics``'
    fields, so a run's join losses need no second evaluation)} from
    ``<workdir>/val_records.jsonl`` (``metrics.read_jsonl``: a torn last line is skipped); a
    step written twice (a resumed run evaluates it again) keeps its last row; {} when the run
    wrote none."""
    path = os.path.join(workdir, VAL_RECORDS)
    if not os.path.isfile(path):
        return {}
    return {row["step"]: {k: v for k, v in row.items() if k != "step"} for row in read_jsonl(path)[0]}


def grpo_config(config) -> grpo.GRPOConfig:
    return grpo.GRPOConfig(**run_config.to_dict(config.grpo)).check()


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


class GRPOTask(loop.Task):
    """GRPO in the run skeleton: each RL step rolls out its problems with the current
    parameters and applies ``grpo.make_grpo_step``; validation is greedy rollouts on
    ``eval_problems`` problems. The counter is the RL step (the state's ``step`` counts
    optimizer updates); a step's problems and keys come from ``(seed, step)`` alone."""

    counter, counter_label, prefix = "rl_step", "RL step", "rl/"

    def resolve(self) -> None:
        from jaxapr import policy_io
        from jaxapr.train import plan

        config = self.config
        run_config.check_counts(
            config,
            positive=("num_steps", "num_slots", "decode_chunk", "checkpoint_every", "keep", "max_depth"),
            non_negative=("eval_every", "eval_problems", "max_train_seconds"),
        )
        if not config.init_from:
            raise ValueError(
                "config.init_from is required: expected the workdir of a train_sft run or an exported .npz"
            )
        if config.kind not in ("apr", "sosp"):
            raise ValueError(f"config.kind={config.kind!r}: expected 'apr' or 'sosp'")
        if not config.data_dir:
            raise ValueError("config.data_dir is required: expected a directory written by experiments.gen_data")
        self.cfg, self.init_params, init_config = policy_io.load_params(config.init_from, which=config.init_which)
        with config.unlocked():
            config.model = init_config.model  # the policy is the checkpoint's
        if not 2 <= config.max_context <= self.cfg.max_len:
            raise ValueError(
                f"config.max_context={config.max_context}: expected a per-call context window of 2.."
                f"{self.cfg.max_len} tokens (the model's max_len)"
            )
        self.gcfg = grpo_config(config)
        self.processes = jax.process_count()
        if self.gcfg.num_problems % self.processes:  # whole groups per process: advantages never straddle processes
            raise ValueError(
                f"grpo.num_problems={self.gcfg.num_problems}: expected a multiple of the {self.processes} processes"
            )
        # The update, the reference and the engine's KV cache per device (jaxapr.train.plan): one
        # line naming the field to change if they do not fit.
        plan.check_run(config, "rl", log=self.log)
        if config.optim.learning_rate != self.gcfg.learning_rate:
            raise ValueError(
                f"config.optim.learning_rate={config.optim.learning_rate} differs from "
                f"config.grpo.learning_rate={self.gcfg.learning_rate}: set both (the GRPO rate is the "
                "optimizer's)"
            )
        self.best_metric = "val/accuracy" if config.eval_problems else None

    def build(self, resuming: bool):
        from envs import countdown
        from jaxapr import engine as engine_lib
        from jaxapr import policy_io, sharding
        from jaxapr.train import mesh as mesh_lib

        config, gcfg = self.config, self.gcfg
        splits = countdown.ProblemSplits.load(os.path.join(config.data_dir, "problems"))
        self.train_problems = splits["train"]
        self.eval_problems = None
        if config.eval_problems:
            n, t = splits[config.eval_split]
            self.eval_problems = (n[: config.eval_problems], t[: config.eval_problems])
        self.mesh = mesh_lib.make_run_mesh(config)
        rules = mesh_lib.run_rules(config, self.cfg)
        self.ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]  # rows of every minibatch split over them
        self.mine = distributed.share(gcfg.num_problems)
        tx, schedule = run_config.make_optimizer(run_config.optimizer_config(config))
        self.schedule = schedule
        graphdef = nnx.split(policy_io.make_policy(self.cfg, 0))[0]
        policy = nnx.merge(graphdef, self.init_params)
        graphdef, state, shardings = mesh_lib.init_state_on_mesh(policy, tx, self.mesh, rules)
        self.ref_params = grpo.reference_params(state.params) if gcfg.beta else None
        self.step_fn = grpo.make_grpo_step(
            graphdef,
            tx,
            gcfg,
            schedule,
            state_shardings=shardings,
            remat=config.get("remat", "none"),
            attention=config.get("attention", "blocked"),
        )
        # One engine per process, on its local devices, decoding with a process-local copy of the
        # params; with shard_slots its slots (and KV cache) are split over the data devices.
        engine_mesh = None
        if config.get("shard_slots", False):
            engine_mesh = self.mesh if self.processes == 1 else sharding.make_mesh(data=-1, devices=jax.local_devices())
        self.engine = engine_lib.Engine(
            nnx.merge(graphdef, distributed.process_local(state.params)),
            num_slots=config.num_slots,
            max_len=config.max_context,
            mesh=engine_mesh,
            rules=rules if engine_mesh is self.mesh else None,
        )
        self.base_key = jax.random.key(config.seed)
        self.generated = {"generated_tokens": 0.0, "generation_seconds": 0.0}  # the run's so far
        return state

    def resume(self, state, extra: dict) -> int:
        self.generated = {k: float(extra.get(k, 0.0)) for k in self.generated}
        return super().resume(state, extra)

    def checkpoint_extra(self) -> dict:
        return dict(self.generated)

    def train_step(self, state, step: int):
        from jaxapr.train import mesh as mesh_lib

        config, gcfg, mine = self.config, self.gcfg, self.mine
        k_roll, k_upd = jax.random.split(jax.random.fold_in(self.base_key, step))
        t0 = time.perf_counter()
        numbers, targets = step_problems(self.train_problems, gcfg.num_problems, config.seed, step)
        problems = (numbers[mine.start : mine.stop], targets[mine.start : mine.stop])  # this process's groups
        results = grpo.rollout_groups(
            self.engine,
            distributed.process_local(state.params),
            problems,
            gcfg,
            key=k_roll,
            problem_ids=np.arange(mine.start, mine.stop),
            mode=config.kind,
            max_context=config.max_context,
            max_depth=config.max_depth,
            decode_chunk=config.decode_chunk,
        )
        t1 = time.perf_counter()
        needed = grpo.rows_needed(results, config.max_context, gcfg.pack_calls, keep=grpo.rollout_mask(results, gcfg))
        max_rows = int(distributed.allgather(needed).max())  # every process's part has the same rows
        batch, stats = process_batch(
            results,
            gcfg,
            seq_len=config.max_context,
            processes=self.processes,
            num_rows=rows_per_process(max_rows, gcfg.num_minibatches, self.ways, self.processes),
        )
        if max_rows:
            state, m = self.step_fn(state, self.ref_params, mesh_lib.batch_to_device(batch, self.mesh), k_upd)
            m = mesh_lib.host(m)
            loop.check_finite(m, step + 1)
        else:  # no trained call on any process (every group's rewards were equal): nothing to update
            m = {"kl": 0.0, "clip_fraction": 0.0, "loss": 0.0, "grad_norm": 0.0, "lr": float(self.schedule(state.step))}
        t2 = time.perf_counter()
        r = grpo.rewards(results, gcfg)
        local = [
            r.sum(),
            sum(x.success for x in results),
            stats["zero_groups"] * len(results) / gcfg.group_size,
            stats["calls"],
            stats["trained_calls"],
            sum(x.num_children for x in results),
            sum(x.total_tokens for x in results),
            sum(x.sequential_tokens for x in results),
            len(results),
        ]
        (reward, success, zero, calls, trained_calls, children, gen, seq, n), rollout_seconds = (
            distributed.allgather(np.array(local, np.float64)).sum(axis=0),
            distributed.max_across(t1 - t0),
        )
        self.generated["generated_tokens"] += gen
        self.generated["generation_seconds"] += rollout_seconds
        metrics = {
            "reward": reward / n,
            "success": success / n,
            "zero_groups": zero / (n / gcfg.group_size),
            "children_per_problem": children / n,
            "total_tokens": gen / n,
            "sequential_tokens": seq / n,
            "calls": int(calls),
            "trained_calls": int(trained_calls),
            "kl": m["kl"],
            "clip_fraction": m["clip_fraction"],
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "lr": m.get("lr", gcfg.learning_rate),
            "rollout_seconds": rollout_seconds,
            "update_seconds": t2 - t1,
            "gen_tokens_per_s": gen / max(rollout_seconds, 1e-9),  # this step's
            **self.generated,  # the run's: their ratio is its mean generation rate
        }
        return state, metrics, {"reward": f"{metrics['reward']:.3f}", "kl": f"{metrics['kl']:.2e}"}

    def evaluate(self, state, step: int) -> dict:
        if self.eval_problems is None:
            return {}
        self.engine.update_params(distributed.process_local(state.params))
        r, records = evaluation.evaluate_rollouts(
            None,
            self.eval_problems,
            mode=self.config.kind,
            max_context=self.config.max_context,
            num_slots=self.config.num_slots,
            engine=self.engine,
        )
        if self.workdir and distributed.is_main():
            with open(os.path.join(self.workdir, VAL_RECORDS), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **records}) + "\n")
        return {f"val/{k}": v for k, v in r.items()}


def train(config, workdir: str, log=print) -> dict:
    """Runs GRPO as ``config`` says in ``workdir`` (``jaxapr.train.loop``; see the module
    docstring), resuming from its newest checkpoint; returns the summary."""
    return loop.run(GRPOTask(config, log), workdir)
