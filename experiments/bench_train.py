"""Training benchmarks (``experiments/bench.py --suite=train``).

    python -m experiments.bench --suite=train [--quick] --out=bench_train.json

1. SFT: tokens/s of the jitted SFT step (forward + backward + AdamW) on fully packed rows at
   the presets of ``--train_presets`` (tiny and mini; paper on a GPU/TPU), and its fraction of
   a matmul peak in the model's compute dtype measured in the same run (training FLOPs = 3 x
   the forward FLOPs of ``model.flops_per_token`` at the mean context of a row, seq_len / 2).
2. GRPO: one step of the tiny preset split into the rollout (engine + runtime, temperature 1)
   and the update (one jitted step over all calls, inner epochs x minibatches).
"""

from __future__ import annotations

import statistics
import time

from experiments.bench_util import median_time, print_table


def _sft_row(preset: str, batch: int, seq_len: int, accum: int, repeats: int, peak: float, impl: str = "auto") -> dict:
    import jax
    import numpy as np

    from jaxapr import kernels, model, policy_io
    from jaxapr.train import sft
    from jaxapr.train.state import init_train_state, make_optimizer

    cfg = model.get_config(preset)
    tx, sched = make_optimizer(1e-4, total_steps=1000)
    graphdef, state = init_train_state(policy_io.make_policy(cfg, 0), tx)
    rng = np.random.default_rng(0)
    # Fully packed rows: segments of 200..400 tokens, as packed trace examples are.
    seg = np.zeros((batch, seq_len), np.int32)
    pos = np.zeros((batch, seq_len), np.int32)
    for r in range(batch):
        s, k = 0, 1
        while s < seq_len:
            n = min(int(rng.integers(200, 400)), seq_len - s)
            seg[r, s : s + n], pos[r, s : s + n] = k, np.arange(n)
            s, k = s + n, k + 1
    b = {
        "tokens": rng.integers(3, cfg.vocab_size, (batch, seq_len)).astype(np.int32),
        "loss_mask": np.ones((batch, seq_len), np.int32),
        "segment_ids": seg,
        "positions": pos,
    }
    step = sft.make_sft_step(graphdef, tx, accum, sched)
    box = [state]

    def run():
        box[0], m = step(box[0], b)
        jax.block_until_ready(m["loss"])

    saved, kernels.IMPL = kernels.IMPL, impl  # read when the step is traced (its first run)
    try:
        seconds = median_time(run, max(1, repeats))
    finally:
        kernels.IMPL = saved
    tps = batch * seq_len / seconds
    flops = 3 * model.flops_per_token(cfg, seq_len // 2)
    return {
        "preset": preset,
        "kernels": kernels.resolve(impl),
        "batch": batch,
        "seq_len": seq_len,
        "accum": accum,
        "step_s": seconds,
        "tokens_per_s": tps,
        "train_gflops": tps * flops / 1e9,
        "peak_fraction": tps * flops / peak,
        "params": model.param_count(cfg),
    }


# SFT shapes per model preset: (batch, seq_len, accum); paper is for a GPU/TPU (bfloat16
# compute). tiny at 16 x 1,024 is what `experiments/configs/sft.py:mini` trains (the mini
# pipeline uses the tiny model's dimensions).
SFT_SHAPES = {"tiny": [(16, 512, 1), (16, 1024, 1)], "mini": [(16, 512, 1), (16, 1024, 2)], "paper": [(4, 2048, 1)]}


def suite_train(quick: bool, repeats: int, presets=("tiny", "mini"), grpo: bool = True, **grpo_kw) -> dict:
    """SFT rows of ``presets`` and the GRPO step; ``grpo_kw``: ``_grpo``'s policy options."""
    import jax

    from jaxapr import model
    from jaxapr.train import machine

    for p in presets:
        if p not in SFT_SHAPES:
            raise ValueError(f"--train_presets: unknown preset {p!r}: expected some of {sorted(SFT_SHAPES)}")
    peaks = {}
    for dtype in sorted({model.PRESETS[p].dtype for p in presets}):
        peaks[dtype] = machine.matmul_peak_flops(1024 if quick else None, dtype=dtype)
        print(
            f"\nmatmul peak ({dtype} jnp.dot on {jax.devices()[0].device_kind}, same run): "
            f"{peaks[dtype] / 1e9:,.1f} GFLOP/s"
        )
    shapes = [(p, *shape) for p in presets for shape in SFT_SHAPES[p]]
    if quick:
        shapes = [(p, 8, 256, 1) for p in presets]
    rows = []
    for p, b, L, a in shapes:
        rows.append(_sft_row(p, b, L, a, repeats, peaks[model.PRESETS[p].dtype]))
        if rows[-1]["kernels"] == "cpu":  # the baseline in the same run: XLA's own backwards
            rows.append(_sft_row(p, b, L, a, repeats, peaks[model.PRESETS[p].dtype], impl="xla"))
            rows[-2]["speedup"] = rows[-1]["step_s"] / rows[-2]["step_s"]
    out = {"matmul_peak_flops": peaks, "sft": rows}
    print(
        "\nSFT step (forward + backward + AdamW), fully packed rows of random tokens; kernels: jaxapr.kernels "
        "(cpu: hand-written backwards, xla: XLA's own), speedup of cpu over xla"
    )
    print_table(
        [
            {
                **r,
                "params": f"{r['params'] / 1e6:.2f}M",
                "peak_fraction": f"{r['peak_fraction']:.1%}",
                "speedup": f"{r['speedup']:.2f}x" if "speedup" in r else "",
            }
            for r in rows
        ],
        [
            "preset",
            "params",
            "kernels",
            "batch",
            "seq_len",
            "accum",
            "step_s",
            "tokens_per_s",
            "train_gflops",
            "peak_fraction",
            "speedup",
        ],
    )
    if grpo:
        out["grpo"] = _grpo(quick, repeats, **grpo_kw)
    return out


def _grpo(
    quick: bool,
    repeats: int,
    policy_path: str | None = None,
    data_dir: str | None = None,
    num_problems: int | None = None,
    group_size: int = 4,
    context: int | None = None,
) -> dict:
    """One GRPO step split into rollout and update time, the update both with one call per
    row and with calls packed (``GRPOConfig.pack_calls``) on the same rollouts. Default: the
    tiny preset with random weights (outputs run to the length limit: the worst case for the
    update, and little to pack); ``policy_path`` (a run or an exported ``.npz``) with
    ``data_dir`` (its ``gen_data`` output: training problems) measures a trained policy. Every
    repeat rolls out the same problems with the same key from the same parameters (so the
    row buckets, hence the compiles, repeat); the first repeat compiles and is not counted."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from envs import countdown
    from experiments import cli
    from jaxapr import engine as engine_lib
    from jaxapr import model, policy_io
    from jaxapr.train import grpo
    from jaxapr.train.state import init_train_state, make_optimizer

    p = num_problems or (4 if quick else 16)
    g = group_size
    if policy_path:  # with data_dir (experiments.bench checks both flags before any suite runs)
        cli.quiet_logs()  # orbax's restore lines
        policy = policy_io.load_policy(policy_path)
        ctx = context or policy.cfg.max_len
        numbers, targets = countdown.ProblemSplits.load(f"{data_dir}/problems")["train"]
        problems = (np.asarray(numbers[:p]), np.asarray(targets[:p]))
        what = f"{policy_path} ({policy.cfg.d_model} d_model)"
    else:
        ctx = context or (256 if quick else 512)
        policy = policy_io.make_policy(model.get_config("tiny", max_len=ctx), 0)
        problems = countdown.generate_problems(
            jax.random.key(0), p, num_numbers=3, min_target=1, max_target=30, max_number=20
        )
        problems = tuple(np.asarray(x) for x in problems)
        what = "tiny preset (random weights)"
    gcfg = grpo.GRPOConfig(num_problems=p, group_size=g, num_minibatches=2)
    tx, _ = make_optimizer(gcfg.learning_rate, total_steps=1000, schedule="constant")
    graphdef, state = init_train_state(policy, tx)
    ref = grpo.reference_params(state.params)
    engine = engine_lib.Engine(nnx.merge(graphdef, state.params), num_slots=64, max_len=ctx)
    steps = {pack: grpo.make_grpo_step(graphdef, tx, gcfg.replace(pack_calls=pack)) for pack in (False, True)}
    rows = []
    for i in range(1 + max(1, repeats)):
        t0 = time.perf_counter()
        results = grpo.rollout_groups(
            engine, state.params, problems, gcfg, key=jax.random.key(0), mode="apr", max_context=ctx
        )
        t1 = time.perf_counter()
        row = {
            "rollout_s": t1 - t0,
            "calls": sum(1 for r in results for c in r.calls if len(c.output_tokens)),
            "gen_tokens": sum(r.total_tokens for r in results),
        }
        for pack, name in ((False, "per_call"), (True, "packed")):
            batch, stats = grpo.build_batch(results, gcfg.replace(pack_calls=pack), seq_len=ctx)
            batch.pop("rollout", None)
            t2 = time.perf_counter()
            _, m = steps[pack](jax.tree.map(jnp.copy, state), ref, batch, jax.random.key(100))
            jax.block_until_ready(m["loss"])
            row[f"update_{name}_s"], row[f"rows_{name}"] = time.perf_counter() - t2, stats["rows"]
        if i:
            rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["update_speedup"] = med["update_per_call_s"] / med["update_packed_s"]
    med["rollout_share"] = med["rollout_s"] / (med["rollout_s"] + med["update_packed_s"])
    print(
        f"\nGRPO step, {what}, {p} problems x {g} rollouts (APR), context {ctx}, {gcfg.inner_epochs} epochs x "
        f"{gcfg.num_minibatches} minibatches; update with one call per row vs packed rows; medians of {len(rows)}"
    )
    shown = {**med, "rollout_share": f"{med['rollout_share']:.0%}", "update_speedup": f"{med['update_speedup']:.2f}x"}
    print_table(
        [shown],
        [
            "rollout_s",
            "update_per_call_s",
            "update_packed_s",
            "update_speedup",
            "rollout_share",
            "calls",
            "rows_per_call",
            "rows_packed",
            "gen_tokens",
        ],
    )
    return med
