r"""The APR paper's analyses for trained checkpoints: JSON + PNG.

    python -m experiments.evaluate --workdir=/tmp/jaxapr_reproduce --out=/tmp/eval
    python -m experiments.evaluate --sosp=/tmp/sft_sosp --apr=/tmp/sft_apr --apr_rl=/tmp/rl_apr \
        --data_dir=/tmp/d --out=/tmp/eval --contexts=256,512,1024 --n_max=8

``--workdir`` is a ``reproduce`` work directory (runs ``sft_sosp``, ``sft_apr``, ``rl_apr`` and
the data in ``data``); ``--sosp/--apr/--apr_rl/--data_dir`` name runs directly (any may be
missing: its analyses are skipped). On ``--num_problems`` held-out problems of ``--split``:

1. **accuracy vs per-call context window** (greedy): SoS+ and APR at each of ``--contexts``;
2. **accuracy vs total tokens**: SoS+ ``pass@n`` and ``cons@n`` for n = 1..``n_max``
   (temperature ``--temperature``) against APR (greedy and, when the APR data was built with
   ``sub_call_budget``, each ``Sub Call Budget: b`` condition of ``--budgets``);
3. **accuracy vs sequential tokens and vs latency** (decode steps of a problem's critical
   path) for the same conditions;
4. **the effect of RL**: APR before / after GRPO at the main context (a table).

Writes ``<out>/evaluate.json`` (every condition: accuracy, total / sequential tokens,
children, latency, wall time) and ``<out>/*.png``, and prints the tables.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A reproduce work directory (runs sft_sosp, sft_apr, rl_apr; data in data/).")
flags.DEFINE_string("sosp", None, "SoS+ run workdir (overrides --workdir's).")
flags.DEFINE_string("apr", None, "APR run workdir (overrides --workdir's).")
flags.DEFINE_string("apr_rl", None, "APR + GRPO run workdir (overrides --workdir's).")
flags.DEFINE_string("data_dir", None, "gen_data output (problems/ splits); default: the runs' config.")
flags.DEFINE_string("out", None, "Output directory for evaluate.json and the plots.")
flags.DEFINE_string("split", "test", "Problem split to evaluate on.")
flags.DEFINE_integer("num_problems", 200, "Problems evaluated (the first of the split).")
flags.DEFINE_list("contexts", [], "Per-call context windows (default: the APR model's context).")
flags.DEFINE_integer("n_max", 8, "SoS+ pass@n / cons@n for n = 1..n_max.")
flags.DEFINE_list("budgets", ["1", "2", "4", "8"], "APR Sub Call Budget conditions (if the data has them).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature of pass@n / cons@n.")
flags.DEFINE_integer("num_slots", 64, "Engine slots.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("plots", True, "Write PNG plots.")

RUNS = {"sosp": "sft_sosp", "apr": "sft_apr", "apr_rl": "rl_apr"}


def resolve_runs(workdir, overrides: dict) -> dict:
    """{"sosp" | "apr" | "apr_rl": run workdir} for the runs that exist."""
    runs = {}
    for name, sub in RUNS.items():
        path = overrides.get(name) or (os.path.join(workdir, sub) if workdir else None)
        if path and os.path.isdir(os.path.join(path, "checkpoints")):
            runs[name] = path
        elif overrides.get(name):
            raise FileNotFoundError(f"--{name}={path!r} has no checkpoints/: expected a train_sft / train_rl workdir")
    if not runs:
        raise FileNotFoundError(f"no runs found (workdir={workdir!r}): expected sft_sosp/, sft_apr/ or rl_apr/ "
                                "with checkpoints, or --sosp/--apr/--apr_rl")
    return runs


def condition(policy, problems, mode: str, context: int, *, num_slots: int, prefix: str = "",
              temperature: float = 0.0, key=None) -> dict:
    """One evaluated condition: accuracy and costs (means over problems)."""
    import numpy as np

    from jaxapr import runtime

    t0 = time.perf_counter()
    res = runtime.rollout(policy, problems, mode=mode, max_context=context, num_slots=num_slots,
                          temperature=temperature, key=key, prefix=prefix)
    return {"mode": mode, "context": context, "prefix": prefix, "temperature": temperature,
            "accuracy": float(np.mean([r.success for r in res])),
            "total_tokens": float(np.mean([r.total_tokens for r in res])),
            "sequential_tokens": float(np.mean([r.sequential_tokens for r in res])),
            "latency_steps": float(np.mean([r.latency_steps for r in res])),
            "children": float(np.mean([r.num_children for r in res])),
            "seconds": time.perf_counter() - t0}


def evaluate(runs: dict, problems, *, contexts, n_max: int, budgets, temperature: float, num_slots: int,
             seed: int, log=print) -> dict:
    import jax

    from jaxapr.train import common

    policies = {name: common.load_policy(path) for name, path in runs.items()}
    for name, p in policies.items():
        log(f"{name}: {runs[name]} ({p.cfg.num_layers} layers, d_model {p.cfg.d_model}, context {p.cfg.max_len})")
    main = max(p.cfg.max_len for p in policies.values())
    contexts = sorted({min(int(c), main) for c in contexts} or {main})
    main_ctx = contexts[-1]
    out = {"problems": int(len(problems[1])), "contexts": contexts, "main_context": main_ctx, "conditions": []}

    def add(run, analysis, **kw):
        policy = policies[run]
        ctx = min(kw.pop("context", main_ctx), policy.cfg.max_len)
        r = condition(policy, problems, context=ctx, num_slots=num_slots, **kw)
        r.update(run=run, analysis=analysis)
        out["conditions"].append(r)
        log(f"  {run:7s} {analysis:9s} {r['mode']:8s} ctx {ctx:5d} {r['prefix']!r:24s} acc {r['accuracy']:.3f} "
            f"tokens {r['total_tokens']:8.1f} seq {r['sequential_tokens']:7.1f} ({r['seconds']:.0f} s)")

    key = jax.random.key(seed)
    for ctx in contexts:
        for run, mode in (("sosp", "sosp"), ("apr", "apr")):
            if run in policies:
                add(run, "context", mode=mode, context=ctx)
    if "sosp" in policies:
        for n in range(1, n_max + 1):
            for kind in ("pass", "cons"):
                add("sosp", "tokens", mode=f"{kind}@{n}", temperature=temperature, key=jax.random.fold_in(key, n))
    if "apr" in policies and _has_budgets(runs["apr"]):
        for b in budgets:
            add("apr", "tokens", mode="apr", prefix=f"Sub Call Budget: {int(b)} ")
    for run in ("apr", "apr_rl"):
        if run in policies:
            add(run, "rl", mode="apr")
    return out


def _has_budgets(run: str) -> bool:
    """Whether the run's APR data was written with ``Sub Call Budget`` prefixes."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            data_dir = json.load(f).get("data_dir", "")
        with open(os.path.join(data_dir, "apr", "manifest.json")) as f:
            return bool(json.load(f)["config"].get("sub_call_budget"))
    except (OSError, KeyError, ValueError):
        return False


def tables(result: dict) -> str:
    lines = []
    conds = result["conditions"]

    def fmt(rows, title):
        if not rows:
            return
        lines.append(f"\n{title}")
        lines.append(f"{'run':8s} {'mode':9s} {'context':>7s} {'prefix':>22s} {'accuracy':>8s} {'tokens':>8s} "
                     f"{'sequential':>10s} {'latency':>8s} {'children':>8s}")
        for r in rows:
            lines.append(f"{r['run']:8s} {r['mode']:9s} {r['context']:7d} {r['prefix'].strip():>22s} {r['accuracy']:8.3f} "
                         f"{r['total_tokens']:8.1f} {r['sequential_tokens']:10.1f} {r['latency_steps']:8.1f} "
                         f"{r['children']:8.2f}")

    fmt([r for r in conds if r["analysis"] == "context"], "Accuracy vs per-call context window (greedy)")
    fmt([r for r in conds if r["analysis"] == "tokens"], "Accuracy vs total tokens (SoS+ pass@n / cons@n, APR budgets)")
    fmt([r for r in conds if r["analysis"] == "rl"], "Effect of RL (APR before / after GRPO, greedy)")
    return "\n".join(lines)


def plot(result: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = result["conditions"]
    files = []

    def save(fig, name):
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)

    ctx_rows = [r for r in conds if r["analysis"] == "context"]
    if ctx_rows:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for run in ("sosp", "apr"):
            rows = sorted((r for r in ctx_rows if r["run"] == run), key=lambda r: r["context"])
            if rows:
                ax.plot([r["context"] for r in rows], [r["accuracy"] for r in rows], "o-", label=_label(run))
        ax.set(xlabel="per-call context window (tokens)", ylabel="accuracy", xscale="log", ylim=(0, 1),
               title="Accuracy vs context window")
        ax.legend()
        save(fig, "accuracy_vs_context.png")
    tok_rows = [r for r in conds if r["analysis"] in ("tokens", "rl")]
    for x, name, label in (("total_tokens", "accuracy_vs_total_tokens.png", "total tokens per problem"),
                           ("sequential_tokens", "accuracy_vs_sequential_tokens.png", "sequential tokens per problem"),
                           ("latency_steps", "accuracy_vs_latency.png", "latency (decode steps)")):
        if not tok_rows:
            break
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for series, pred in (("SoS+ pass@n", lambda r: r["mode"].startswith("pass@")),
                             ("SoS+ cons@n", lambda r: r["mode"].startswith("cons@")),
                             ("APR (budgets)", lambda r: r["run"] == "apr" and r["prefix"]),
                             ("APR", lambda r: r["run"] == "apr" and r["analysis"] == "rl"),
                             ("APR + GRPO", lambda r: r["run"] == "apr_rl")):
            rows = sorted((r for r in tok_rows if pred(r)), key=lambda r: r[x])
            if rows:
                ax.plot([r[x] for r in rows], [r["accuracy"] for r in rows], "o-" if len(rows) > 1 else "s",
                        label=series)
        ax.set(xlabel=label, ylabel="accuracy", ylim=(0, 1), title=f"Accuracy vs {label.split(' per')[0]}")
        ax.legend(fontsize=8)
        save(fig, name)
    return files


def _label(run: str) -> str:
    return {"sosp": "SoS+", "apr": "APR", "apr_rl": "APR + GRPO"}[run]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from envs import countdown
    from jaxapr.train import common

    common.quiet_logs()
    try:
        if not FLAGS.out:
            raise ValueError("--out is required: expected a directory for evaluate.json and the plots")
        if FLAGS.workdir and not os.path.isdir(FLAGS.workdir):
            raise FileNotFoundError(f"--workdir={FLAGS.workdir!r} does not exist")
        runs = resolve_runs(FLAGS.workdir, {"sosp": FLAGS.sosp, "apr": FLAGS.apr, "apr_rl": FLAGS.apr_rl})
        data_dir = FLAGS.data_dir or (os.path.join(FLAGS.workdir, "data") if FLAGS.workdir else None)
        if not data_dir:
            with open(os.path.join(next(iter(runs.values())), "config.json")) as f:
                data_dir = json.load(f)["data_dir"]
        numbers, targets = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))[FLAGS.split]
        n = min(FLAGS.num_problems, len(targets))
        if n < 1:
            raise ValueError(f"--num_problems={FLAGS.num_problems}: expected >= 1")
        os.makedirs(FLAGS.out, exist_ok=True)
        result = evaluate(runs, (numbers[:n], targets[:n]), contexts=[int(c) for c in FLAGS.contexts],
                          n_max=FLAGS.n_max, budgets=FLAGS.budgets, temperature=FLAGS.temperature,
                          num_slots=FLAGS.num_slots, seed=FLAGS.seed)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    result.update(runs=runs, data_dir=data_dir, split=FLAGS.split)
    if FLAGS.plots:
        result["plots"] = plot(result, FLAGS.out)
    with open(os.path.join(FLAGS.out, "evaluate.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(tables(result))
    print(f"\nwrote {os.path.join(FLAGS.out, 'evaluate.json')}" + (f" and {len(result.get('plots', []))} plots" if FLAGS.plots else ""))


if __name__ == "__main__":
    app.run(main)
