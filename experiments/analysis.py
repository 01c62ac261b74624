"""The APR paper's analyses as functions (``experiments/evaluate.py`` and
``experiments/reproduce.py`` are their command lines): evaluate trained runs under each
condition, print the tables, draw the plots."""
from __future__ import annotations

import json
import os

RUNS = {"sosp": "sft_sosp", "apr": "sft_apr", "apr_rl": "rl_apr"}


def resolve_runs(workdir, overrides: dict) -> dict:
    """{"sosp" | "apr" | "apr_rl": run workdir or exported ``.npz``} for the runs that exist."""
    runs = {}
    for name, sub in RUNS.items():
        path = overrides.get(name) or (os.path.join(workdir, sub) if workdir else None)
        if path and (os.path.isdir(os.path.join(path, "checkpoints")) or (path.endswith(".npz") and os.path.isfile(path))):
            runs[name] = path
        elif overrides.get(name):
            raise FileNotFoundError(f"--{name}={path!r} is neither a run with checkpoints/ nor an exported .npz: "
                                    "expected a train_sft / train_rl workdir or a file written by export_policy")
    if not runs:
        raise FileNotFoundError(f"no runs found (workdir={workdir!r}): expected sft_sosp/, sft_apr/ or rl_apr/ "
                                "with checkpoints, or --sosp/--apr/--apr_rl")
    return runs


def condition(policy, problems, mode: str, context: int, *, num_slots: int, prefix: str = "",
              temperature: float = 0.0, key=None) -> dict:
    """One evaluated condition: accuracy and costs (means over problems; see
    ``jaxapr.evaluation``, which also splits problems over processes)."""
    from jaxapr import evaluation

    r = evaluation.rollout_metrics(policy, problems, mode=mode, max_context=context, num_slots=num_slots,
                               prefix=prefix, temperature=temperature, key=key)
    return {"mode": mode, "context": context, "prefix": prefix, "temperature": temperature, **r}


def evaluate(runs: dict, problems, *, contexts, n_max: int, budgets, temperature: float, num_slots: int,
             seed: int, log=print) -> dict:
    import jax

    from jaxapr import evaluation
    from jaxapr import policy_io

    policies = {name: policy_io.load_policy(path) for name, path in runs.items()}
    for name, p in policies.items():
        log(f"{name}: {runs[name]} ({p.cfg.num_layers} layers, d_model {p.cfg.d_model}, context {p.cfg.max_len})")
    main = max(p.cfg.max_len for p in policies.values())
    contexts = sorted({min(int(c), main) for c in contexts} or {main})
    main_ctx = contexts[-1]
    out = {"problems": int(len(problems[1])), "contexts": contexts, "main_context": main_ctx, "conditions": []}

    def record(r, run, analysis, note=""):
        r.update(run=run, analysis=analysis)
        out["conditions"].append(r)
        log(f"  {run:7s} {analysis:9s} {r['mode']:8s} ctx {r['context']:5d} {r['prefix']!r:24s} "
            f"acc {r['accuracy']:.3f} tokens {r['total_tokens']:8.1f} seq {r['sequential_tokens']:7.1f} "
            f"({note}{r['seconds']:.0f} s)")

    def add(run, analysis, **kw):
        policy = policies[run]
        ctx = min(kw.pop("context", main_ctx), policy.cfg.max_len)
        record(condition(policy, problems, context=ctx, num_slots=num_slots, **kw), run, analysis)

    key = jax.random.key(seed)
    for ctx in contexts:
        for run, mode in (("sosp", "sosp"), ("apr", "apr")):
            if run in policies:
                add(run, "context", mode=mode, context=ctx)
    if "sosp" in policies and n_max > 0:  # one rollout of n_max samples per problem answers every pass@n / cons@n
        modes = [f"{kind}@{n}" for n in range(1, n_max + 1) for kind in ("pass", "cons")]
        ctx = min(main_ctx, policies["sosp"].cfg.max_len)
        rows = evaluation.sampled_metrics(policies["sosp"], problems, modes=modes, max_context=ctx, num_slots=num_slots,
                                      temperature=temperature, key=key)
        for mode in modes:
            r = {"mode": mode, "context": ctx, "prefix": "", "temperature": temperature, **rows[mode],
                 "samples_drawn": n_max}
            record(r, "sosp", "tokens", note=f"first {mode.split('@')[1]} of {n_max} samples; all: ")
    if "apr" in policies and _has_budgets(runs["apr"]):
        for b in budgets:
            add("apr", "tokens", mode="apr", prefix=f"Sub Call Budget: {int(b)} ")
    for run in ("apr", "apr_rl"):
        if run in policies:
            same = [c for c in out["conditions"] if c["run"] == run and c["analysis"] == "context"
                    and c["context"] == min(main_ctx, policies[run].cfg.max_len)]
            if same:  # greedy is deterministic: the context analysis already ran this condition
                out["conditions"].append(dict(same[0], analysis="rl"))
            else:
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
    joins = list({(r["run"], r["context"], r["prefix"]): r for r in conds if "child_solved" in r}.values())
    if joins:  # runtime.join_diagnostics: shares of problems, children per problem
        lines.append("\nAPR joins (shares of problems: a root child solved its sub-problem / the rollout still failed"
                     " / a call after a join ran out of room; children: all / distinct / solved)")
        lines.append(f"{'run':8s} {'context':>7s} {'prefix':>22s} {'accuracy':>8s} {'child ok':>8s} {'lost':>6s} "
                     f"{'overflow':>8s} {'children':>8s} {'distinct':>8s} {'solved':>6s}")
        for r in joins:
            lines.append(f"{r['run']:8s} {r['context']:7d} {r['prefix'].strip():>22s} {r['accuracy']:8.3f} "
                         f"{r['child_solved']:8.3f} {r['lost_at_join']:6.3f} {r['join_overflow']:8.3f} "
                         f"{r['children']:8.2f} {r['distinct_children']:8.2f} {r['solved_children']:6.2f}")
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
