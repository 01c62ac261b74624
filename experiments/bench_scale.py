r"""The paper preset on one accelerator: SFT steps with and without remat and fused attention,
and a few GRPO steps end to end (``experiments/gpu_bench.sh`` runs it).

    python -m experiments.bench_scale --what=sft,grpo --out=/tmp/bench_scale.json
    python -m experiments.bench_scale --dry_run          # the plan of the run, nothing computed

SFT: for each ``--variants`` entry (``remat/attention``, e.g. ``block/fused``) one jitted SFT
step (random weights, fully packed rows of ``--sft_batch`` x ``--sft_seq``) is compiled, its
``memory_analysis()`` peak read, and ``--repeats`` steps timed (median): tokens/s and the
fraction of a matmul peak in the compute dtype measured in the same run (training FLOPs = 3 x
``model.flops_per_token`` at the mean context seq / 2). A variant that fails (out of memory,
no cuDNN kernel for the shapes) reports its one-line error and the others still run.
GRPO: ``--grpo_steps`` whole steps (rollouts with the engine, batch, update with
``--grpo_remat``) of ``--grpo_problems`` x ``--grpo_group`` APR rollouts at context
``--grpo_context``, random weights (outputs run to the length limit: the update's worst case);
the first step compiles and is reported apart. ``--preset=tiny`` is a CPU smoke run.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

from experiments import cli

flags.DEFINE_enum("preset", "paper", ["tiny", "mini", "paper"], "Model preset (random weights).")
flags.DEFINE_list("what", ["sft", "grpo"], "Which parts: sft, grpo.")
flags.DEFINE_list(
    "variants", ["none/blocked", "block/blocked", "none/fused", "block/fused"], "SFT: remat/attention pairs."
)
flags.DEFINE_integer("sft_batch", 4, "SFT rows per step.", lower_bound=1)
flags.DEFINE_integer("sft_seq", 4096, "SFT row length (at most the preset's context).", lower_bound=2)
flags.DEFINE_integer("repeats", 3, "Timed SFT steps per variant (median).", lower_bound=1)
flags.DEFINE_integer("grpo_steps", 3, "GRPO steps (the first compiles).", lower_bound=1)
flags.DEFINE_integer("grpo_problems", 8, "GRPO problems per step.", lower_bound=1)
flags.DEFINE_integer("grpo_group", 5, "GRPO rollouts per problem.", lower_bound=1)
flags.DEFINE_integer("grpo_context", 1024, "GRPO per-call context.", lower_bound=16)
flags.DEFINE_integer("grpo_slots", 64, "GRPO engine slots.", lower_bound=1)
flags.DEFINE_string("grpo_remat", "block", "GRPO update remat (jaxapr.model.REMATS).")
flags.DEFINE_string("out", None, "Where to write the JSON results.")
flags.DEFINE_bool("dry_run", False, "Print the plan of the run as JSON and exit (no JAX computation).")
FLAGS = flags.FLAGS


def parse_variants(items) -> list[tuple[str, str]]:
    """``["block/fused", ...]`` -> [(remat, attention), ...]; one-line error for a bad entry."""
    from jaxapr import model

    out = []
    for item in items:
        remat, _, attention = item.partition("/")
        if remat not in model.REMATS or attention not in model.ATTENTIONS:
            raise ValueError(
                f"--variants entry {item!r}: expected remat/attention with remat in {model.REMATS} "
                f"and attention in {model.ATTENTIONS}"
            )
        out.append((remat, attention))
    return out


def run_plan() -> dict:
    """What the run will do (checked flags; the ``--dry_run`` output)."""
    from jaxapr import model

    what = [w for w in FLAGS.what]
    bad = sorted(set(what) - {"sft", "grpo"})
    if bad:
        raise ValueError(f"--what={','.join(what)}: unknown parts {bad}: expected some of ['grpo', 'sft']")
    cfg = model.get_config(FLAGS.preset)
    if FLAGS.sft_seq > cfg.max_len or FLAGS.grpo_context > cfg.max_len:
        raise ValueError(f"--sft_seq / --grpo_context: at most the {FLAGS.preset} preset's context {cfg.max_len}")
    model.check_train_options(FLAGS.grpo_remat, "blocked")
    return {
        "preset": FLAGS.preset,
        "what": what,
        "sft": {
            "variants": [f"{r}/{a}" for r, a in parse_variants(FLAGS.variants)],
            "batch": FLAGS.sft_batch,
            "seq_len": FLAGS.sft_seq,
            "repeats": FLAGS.repeats,
        },
        "grpo": {
            "steps": FLAGS.grpo_steps,
            "problems": FLAGS.grpo_problems,
            "group": FLAGS.grpo_group,
            "context": FLAGS.grpo_context,
            "slots": FLAGS.grpo_slots,
            "remat": FLAGS.grpo_remat,
        },
    }


def _packed_batch(cfg, batch: int, seq_len: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    seg, pos = np.zeros((batch, seq_len), np.int32), np.zeros((batch, seq_len), np.int32)
    for r in range(batch):
        s, k = 0, 1
        while s < seq_len:  # segments of 200..400 tokens, as packed trace examples are
            n = min(int(rng.integers(200, 400)), seq_len - s)
            seg[r, s : s + n], pos[r, s : s + n] = k, np.arange(n)
            s, k = s + n, k + 1
    tokens = rng.integers(3, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens), "segment_ids": seg, "positions": pos}


def sft_variants(plan: dict, peak: float) -> list[dict]:
    import jax

    from experiments.bench_util import median_time
    from jaxapr import model, policy_io
    from jaxapr.train import sft
    from jaxapr.train.state import init_train_state, make_optimizer

    cfg = model.get_config(plan["preset"])
    b, t = plan["sft"]["batch"], plan["sft"]["seq_len"]
    batch = _packed_batch(cfg, b, t)
    flops = 3 * model.flops_per_token(cfg, t // 2)
    rows = []
    for item in plan["sft"]["variants"]:
        remat, attention = item.split("/")
        row = {"remat": remat, "attention": attention, "batch": b, "seq_len": t}
        try:
            tx, sched = make_optimizer(1e-4, total_steps=1000)
            graphdef, state = init_train_state(policy_io.make_policy(cfg, 0), tx)
            step = sft.make_sft_step(graphdef, tx, 1, sched, remat=remat, attention=attention)
            ma = step.lower(state, batch).compile().memory_analysis()
            row["compiled_peak_gib"] = (
                ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
            ) / 2**30
            box = [state]

            def run():
                box[0], m = step(box[0], batch)
                jax.block_until_ready(m["loss"])

            seconds = median_time(run, plan["sft"]["repeats"])
            tps = b * t / seconds
            row.update(step_s=seconds, tokens_per_s=tps, peak_fraction=tps * flops / peak)
            box.clear()  # free this variant's state before the next one's
            state = None
        except Exception as e:  # an out-of-memory or a missing kernel is a result here
            row["error"] = cli.one_line(f"{type(e).__name__}: {e}", 300)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def grpo_steps(plan: dict) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from envs import countdown
    from jaxapr import engine as engine_lib
    from jaxapr import model, policy_io
    from jaxapr.train import grpo
    from jaxapr.train.state import init_train_state, make_optimizer

    g = plan["grpo"]
    ctx = g["context"]
    cfg = model.get_config(plan["preset"])
    policy = policy_io.make_policy(cfg, 0)
    problems = countdown.generate_problems(jax.random.key(0), g["problems"], num_numbers=4)
    problems = tuple(np.asarray(x) for x in problems)
    gcfg = grpo.GRPOConfig(num_problems=g["problems"], group_size=g["group"], num_minibatches=2, pack_calls=True)
    tx, _ = make_optimizer(gcfg.learning_rate, total_steps=1000, schedule="constant")
    graphdef, state = init_train_state(policy, tx)
    ref = grpo.reference_params(state.params)
    engine = engine_lib.Engine(nnx.merge(graphdef, state.params), num_slots=g["slots"], max_len=ctx)
    step = grpo.make_grpo_step(graphdef, tx, gcfg, remat=g["remat"])
    rows = []
    for i in range(g["steps"]):
        t0 = time.perf_counter()
        results = grpo.rollout_groups(
            engine,
            state.params,
            problems,
            gcfg,
            key=jax.random.fold_in(jax.random.key(0), i),
            mode="apr",
            max_context=ctx,
        )
        t1 = time.perf_counter()
        batch, stats = grpo.build_batch(results, gcfg, seq_len=ctx)
        batch.pop("rollout", None)
        state, m = step(state, ref, batch, jax.random.key(100 + i))
        jax.block_until_ready(m["loss"])
        t2 = time.perf_counter()
        gen = sum(r.total_tokens for r in results)
        row = {"rollout_s": t1 - t0, "update_s": t2 - t1, "gen_tokens": gen, "rows": stats["rows"]}
        row["gen_tokens_per_s"] = gen / row["rollout_s"]
        rows.append(row)
        print(json.dumps({"grpo_step": i, **row}), flush=True)
    timed = rows[1:] or rows
    return {
        "first_step": rows[0],
        "median": {k: statistics.median(r[k] for r in timed) for k in rows[0]},
        "steps": len(rows),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    plan = run_plan()
    if FLAGS.dry_run:
        print(json.dumps(plan))
        return
    import jax

    from jaxapr import model
    from jaxapr.train.machine import matmul_peak_flops

    cfg = model.get_config(plan["preset"])
    out = {"plan": plan, "device": jax.devices()[0].device_kind}
    out["matmul_peak_flops"] = peak = matmul_peak_flops(dtype=cfg.dtype)
    print(f"matmul peak ({cfg.dtype}, {out['device']}): {peak / 1e12:.1f} TFLOP/s", flush=True)
    if "sft" in plan["what"]:
        out["sft"] = sft_variants(plan, peak)
    if "grpo" in plan["what"]:
        out["grpo"] = grpo_steps(plan)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
