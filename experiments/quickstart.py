r"""The main job: APR vs serial search on a laptop, in minutes.

    python -m experiments.quickstart [--workdir=/tmp/jaxapr_quickstart] [--preset=mini|tiny] [--from_scratch]

With the policies shipped in ``experiments/checkpoints/`` (default ``--preset=mini``: 4-number
Countdown, 0.9M parameters, SoS+ and APR SFT made by ``experiments.reproduce --preset=mini``
and further rounds of its SFT; see the README there), on a 2-core CPU in about ten
minutes:

1. **data**: the preset's dataset (``experiments/configs/data.py:<preset>``, seed 0: the
   problems and demonstrations the shipped policies were trained on; ``test`` is held out);
2. **SoS+ vs APR**: both policies, greedy, on ``--problems`` held-out problems at each
   per-call context window of ``--contexts`` (the paper's comparison at equal context; mini:
   768 and 1,024 tokens, windows that serial search runs out of);
3. **GRPO**: ``--rl_steps`` GRPO steps on the APR policy (``experiments/configs/rl.py:<preset>``),
   then the same evaluation;
4. **from scratch**: a ``--scratch_steps``-step SFT run of a fresh SoS+ policy on the same
   data (the first minutes of the path that made the shipped policies), evaluated likewise;
5. **results**: a table (accuracy, total and sequential tokens, children per problem, wall
   time), ``quickstart.json`` and PNG plots in ``--workdir``.

``--preset=tiny`` does the same with the tiny pair (3-number Countdown, contexts 256 / 384 /
512: serial traces mostly fit the window there, so APR has little to gain), in about ten minutes.

``--from_scratch`` instead runs the whole pipeline (``experiments.reproduce`` at the preset:
data, SoS+ and APR SFT, GRPO) without the shipped policies and evaluates what it trained the
same way: about two hours on 2 CPU cores. Every number printed is measured in this run;
nothing is stored or assumed.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments import cli

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = ("mini", "tiny")
# The shipped policies of each preset (experiments/checkpoints/README.md says how each was made).
SHIPPED = {p: {k: os.path.join(HERE, "checkpoints", f"{p}_{k}_sft.npz") for k in ("sosp", "apr")} for p in PRESETS}
# Per preset: the comparison's contexts, GRPO steps and the from-scratch demo's SFT steps.
PRESET_INFO = {
    "tiny": dict(contexts=(256, 384, 512), rl_steps=4, scratch_steps=200),
    "mini": dict(contexts=(768, 1024), rl_steps=2, scratch_steps=40),
}
NAMES = {"sosp": "SoS+ (SFT)", "apr": "APR (SFT)", "apr_rl": "APR + GRPO", "scratch": "SoS+ from scratch"}
MODES = {"sosp": "sosp", "apr": "apr", "apr_rl": "apr", "scratch": "sosp"}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/jaxapr_quickstart", "Where data, runs, quickstart.json and the plots go.")
flags.DEFINE_enum("preset", "mini", list(PRESETS), "Problem distribution and shipped policies: mini (4 numbers, "
                  "1,024-token calls) or tiny (3 numbers).")
flags.DEFINE_bool("from_scratch", False, "Train everything (experiments.reproduce at the preset, ~2 h on "
                  "2 cores) instead of starting from the shipped policies.")
flags.DEFINE_integer("problems", 200, "Held-out (test) problems evaluated.")
flags.DEFINE_list("contexts", None, "Per-call context windows (tokens) of the comparison (default: tiny "
                  "256,384,512; mini 768,1024).")
flags.DEFINE_integer("rl_steps", None, "GRPO steps on the APR policy (default: tiny 4, mini 2).")
flags.DEFINE_integer("rl_problems", 4, "GRPO problems per step (x --rl_group rollouts).")
flags.DEFINE_integer("rl_group", 8, "GRPO rollouts per problem.")
flags.DEFINE_integer("scratch_steps", None, "SFT steps of the from-scratch demo (0: skip it; default: tiny 200, "
                     "mini 40).")
flags.DEFINE_string("sosp", None, "SoS+ policy: an exported .npz or a train_sft workdir (default: the preset's shipped one).")
flags.DEFINE_string("apr", None, "APR policy: an exported .npz or a train_sft workdir (default: the preset's shipped one).")
flags.DEFINE_integer("num_slots", 64, "Engine slots (rows decoded together).")
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_bool("progress", True, "Progress bars.")


def _configs(preset: str, scratch_steps: int, rl_steps: int, rl_problems: int, rl_group: int, num_slots: int):
    from experiments.configs import data as data_cfg
    from experiments.configs import rl as rl_cfg
    from experiments.configs import sft as sft_cfg

    d = data_cfg.get_config(preset)
    s = sft_cfg.get_config(preset)
    s.init_from = ""  # the from-scratch demo starts from random weights (mini's SFT starts from tiny's)
    s.eval_problems, s.eval_num_slots = 0, num_slots  # the quickstart evaluates on its own, on test
    if scratch_steps:
        s.num_steps = scratch_steps
        s.optim.warmup_steps = min(s.optim.warmup_steps, max(1, scratch_steps // 4))
        s.checkpoint_every = s.eval_every = scratch_steps
    r = rl_cfg.get_config(preset)
    r.num_steps = rl_steps
    r.grpo.num_problems, r.grpo.group_size = rl_problems, rl_group
    r.eval_problems, r.eval_at_start, r.num_slots = 0, False, num_slots
    r.checkpoint_every = max(rl_steps, 1)
    return d, s, r


def check_args(*, problems: int, contexts, rl_steps: int, rl_problems: int, rl_group: int, scratch_steps: int,
               num_slots: int, policies: dict, preset: str = "mini") -> list[int]:
    """Validates the quickstart's arguments before anything runs; returns the contexts."""
    try:
        ctx = sorted({int(c) for c in contexts})
    except ValueError:
        raise ValueError(f"--contexts={','.join(map(str, contexts))}: expected comma-separated integers") from None
    if not ctx or ctx[0] < 32:
        raise ValueError(f"--contexts={ctx}: expected at least one window of >= 32 tokens")
    for name, value, low in (("problems", problems, 1), ("rl_steps", rl_steps, 0), ("rl_problems", rl_problems, 1),
                             ("rl_group", rl_group, 2), ("scratch_steps", scratch_steps, 0), ("num_slots", num_slots, 1)):
        if value < low:
            raise ValueError(f"--{name}={value}: expected >= {low}")
    for name, path in policies.items():
        if not (os.path.isfile(path) and path.endswith(".npz")) and not os.path.isdir(os.path.join(path, "checkpoints")):
            raise FileNotFoundError(f"--{name}={path!r}: expected an exported policy .npz or a train_sft workdir "
                                    "(the shipped ones are in experiments/checkpoints/)")
        trained_on = _exported_preset(name, path) if path.endswith(".npz") else None
        if trained_on not in (None, preset):
            raise ValueError(f"--{name}={path!r} was trained on the {trained_on!r} distribution: the quickstart "
                             f"evaluates on the {preset!r} one (--preset)")
    return ctx


def _exported_preset(name: str, path: str) -> str | None:
    """The data preset an exported policy was trained on (its metadata), or None if unknown."""
    from jaxapr import policy_io

    try:
        meta = policy_io.exported_meta(path)
    except ValueError as e:
        raise ValueError(f"--{name}: {e}") from None
    return meta.get("extra", {}).get("data_preset")


def evaluate_policies(policies: dict, problems, contexts, *, num_slots: int, log=print, progress: bool = True) -> list:
    """Greedy rollouts of each policy at each per-call context: one row per (policy, context)."""
    from tqdm.auto import tqdm

    from jaxapr import evaluation

    jobs = [(name, ctx) for name in policies for ctx in contexts]
    rows = []
    bar = tqdm(jobs, desc="evaluating", unit="condition", disable=not progress, leave=False)
    log = bar.write if progress and log is print else log  # lines above the bar, not through it
    for name, ctx in bar:
        policy = policies[name]
        if ctx > policy.cfg.max_len:
            log(f"  {NAMES.get(name, name)}: context {ctx} exceeds the model's {policy.cfg.max_len}; skipped")
            continue
        r = evaluation.rollout_metrics(policy, problems, mode=MODES.get(name, name), max_context=ctx,
                                       num_slots=num_slots)
        r.update(run=name, context=ctx, mode=MODES.get(name, name))
        rows.append(r)
        log(f"  {NAMES.get(name, name):18s} context {ctx:4d}: solved {r['accuracy']:6.1%}  tokens {r['total_tokens']:6.0f}"
            f"  sequential {r['sequential_tokens']:5.0f}  children {r['children']:4.2f}  ({r['seconds']:.0f} s)"
            + (f"\n  {'':18s} a child solved {r['child_solved']:6.1%}  lost at the join {r['lost_at_join']:6.1%}"
               f"  join out of context {r['join_overflow']:6.1%}" if "lost_at_join" in r else ""))
    return rows


def run(workdir: str, *, preset: str = "mini", from_scratch: bool = False, problems: int = 200, contexts=None,
        rl_steps: int | None = None, rl_problems: int = 4, rl_group: int = 8, scratch_steps: int | None = None,
        sosp: str | None = None, apr: str | None = None, num_slots: int = 64, plots: bool = True,
        progress: bool = True, log=print) -> dict:
    """The quickstart (see the module docstring); returns what it writes to ``quickstart.json``.
    ``contexts``, ``rl_steps``, ``scratch_steps``, ``sosp`` and ``apr`` default to the preset's."""
    import jax

    from envs import countdown
    from experiments import gen_data
    from experiments import pipeline
    from jaxapr import policy_io
    from jaxapr.train import loop
    from jaxapr.train import rl as rl_lib
    from jaxapr.train import sft
    from jaxapr.train.metrics import read_metrics

    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {list(PRESETS)}")
    info = PRESET_INFO[preset]
    contexts = info["contexts"] if contexts is None else contexts
    scratch_steps = info["scratch_steps"] if scratch_steps is None else scratch_steps
    rl_steps = info["rl_steps"] if rl_steps is None else rl_steps
    policies_in = {} if from_scratch else {"sosp": sosp or SHIPPED[preset]["sosp"], "apr": apr or SHIPPED[preset]["apr"]}
    contexts = check_args(problems=problems, contexts=contexts, rl_steps=rl_steps, rl_problems=rl_problems,
                          rl_group=rl_group, scratch_steps=scratch_steps, num_slots=num_slots, policies=policies_in,
                          preset=preset)
    workdir = loop.prepare_workdir(workdir)
    data_config, sft_config, rl_config = _configs(preset, scratch_steps, rl_steps, rl_problems, rl_group, num_slots)
    t_start = time.perf_counter()
    times, out = {}, {"preset": preset, "backend": jax.default_backend(), "devices": jax.device_count(), "contexts": contexts,
                      "from_scratch": from_scratch, "workdir": workdir}
    log(f"jaxapr quickstart on {jax.default_backend()} ({jax.device_count()} device(s)); work directory {workdir}")

    data_dir = os.path.join(workdir, "data")
    p = data_config.problems
    log(f"\n[1/5] data: the {preset} dataset ({p.num_numbers} numbers in 1..{p.max_number}, targets "
        f"{p.min_target}..{p.max_target}; test problems are held out)")
    t0 = time.perf_counter()
    if from_scratch:
        log(f"  --from_scratch: experiments.reproduce's pipeline at the {preset} preset (data, SoS+ and APR SFT, GRPO; "
            "~2 h on 2 cores)")
        from experiments.configs import sft as sft_cfg
        s = sft_cfg.get_config(preset)
        s.eval_num_slots = num_slots
        from experiments.configs import evaluate as eval_cfg

        e = eval_cfg.get_config(preset)
        e.problems = 0  # the quickstart evaluates on its own, below
        report = pipeline.run(os.path.join(workdir, "reproduce"), data_config, s, rl_config, e, rl=rl_steps > 0,
                              log=log)
        data_dir = os.path.join(workdir, "reproduce", "data")
        out["reproduce"] = report
        runs = {"sosp": os.path.join(workdir, "reproduce", "sft_sosp"),
                "apr": os.path.join(workdir, "reproduce", "sft_apr")}
        if rl_steps > 0:
            runs["apr_rl"] = os.path.join(workdir, "reproduce", "rl_apr")
    else:  # reused only when it holds this preset's data (gen_data's recorded identity)
        gen_data.prepare(data_config, data_dir, log=lambda *a: None)
    times["data"] = time.perf_counter() - t0
    splits = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))
    numbers, targets = splits["test"]
    n = min(problems, len(targets))
    test = (numbers[:n], targets[:n])
    out["problems"] = n
    log(f"  {len(splits['train'][1])} training problems, evaluating on {n} held-out test problems ({times['data']:.0f} s)")

    if from_scratch:
        policies = {name: policy_io.load_policy(path) for name, path in runs.items()}
        out["policies"] = runs
    else:
        policies, out["policies"] = {}, dict(policies_in)
        for name, path in policies_in.items():
            if not path.endswith(".npz"):
                policies[name] = policy_io.load_policy(path)
                continue
            policies[name], _ = policy_io.load_exported(path)  # its data preset was checked above
    log(f"\n[2/5] SoS+ vs APR, greedy, at per-call contexts {contexts}")
    t0 = time.perf_counter()
    rows = evaluate_policies({k: policies[k] for k in ("sosp", "apr")}, test, contexts, num_slots=num_slots, log=log,
                             progress=progress)
    times["evaluate"] = time.perf_counter() - t0

    curves = {}
    if rl_steps > 0:
        log(f"\n[3/5] GRPO on the APR policy: {rl_steps} steps of {rl_problems} problems x {rl_group} rollouts")
        t0 = time.perf_counter()
        if not from_scratch:
            rl_dir = os.path.join(workdir, "rl_apr")
            c = rl_config.copy_and_resolve_references()
            c.init_from, c.data_dir, c.progress = policies_in["apr"], data_dir, progress
            rl_lib.train(c, rl_dir, log=lambda *a: None)  # a finished run in rl_dir is resumed: nothing to do
            policies["apr_rl"] = policy_io.load_policy(rl_dir, which="latest")
            out["policies"]["apr_rl"] = rl_dir
        rl_rows = read_metrics(out["policies"]["apr_rl"], prefix="rl/")
        curves["grpo"] = [{"step": r["step"], "reward": r["rl/reward"], "kl": r["rl/kl"],
                           "children": r["rl/children_per_problem"]} for r in rl_rows]
        times["grpo"] = time.perf_counter() - t0
        rows += evaluate_policies({"apr_rl": policies["apr_rl"]}, test, contexts, num_slots=num_slots, log=log,
                                  progress=progress)
        times["grpo+evaluate"] = time.perf_counter() - t0
    else:
        log("\n[3/5] GRPO: skipped (--rl_steps=0)")

    if scratch_steps and not from_scratch:
        log(f"\n[4/5] from scratch: {scratch_steps} SFT steps of a fresh SoS+ policy on the {preset} data "
            + ("(the shipped one trained 2,000 steps, ~1 h on 2 cores)" if preset == "tiny" else
               "(the shipped one: tiny's 2,000 steps, then 30 + 45 min on these data)"))
        t0 = time.perf_counter()
        scratch_dir = os.path.join(workdir, "sft_scratch")
        c = sft_config.copy_and_resolve_references()
        c.kind, c.data_dir, c.progress = "sosp", data_dir, progress
        summary = sft.train(c, scratch_dir, log=lambda *a: None)
        sft_rows = read_metrics(scratch_dir, prefix="train/")
        curves["sft"] = [{"step": r["step"], "loss": r["train/loss"]} for r in sft_rows]
        log(f"  loss {curves['sft'][0]['loss']:.3f} (step {curves['sft'][0]['step']}) -> {curves['sft'][-1]['loss']:.3f} "
            f"(step {curves['sft'][-1]['step']}); {summary.get('tokens_per_s', 0):,.0f} tokens/s")
        times["scratch_sft"] = time.perf_counter() - t0
        scratch = policy_io.load_policy(scratch_dir, which="latest")
        rows += evaluate_policies({"scratch": scratch}, test, [max(contexts)], num_slots=num_slots, log=log,
                                  progress=progress)
        out["policies"]["scratch"] = scratch_dir
        times["scratch"] = time.perf_counter() - t0
    elif from_scratch:
        curves["sft"] = [{"step": r["step"], "loss": r["train/loss"]}
                         for r in read_metrics(runs["sosp"], prefix="train/")]
        log("\n[4/5] from scratch: every policy above was trained in this run")
    else:
        log("\n[4/5] from scratch: skipped (--scratch_steps=0)")

    times["total"] = time.perf_counter() - t_start
    out.update(rows=rows, curves=curves, times=times, comparison=comparison(rows))
    log("\n[5/5] results")
    log(table(rows))
    log("\n" + verdict(out["comparison"], preset))
    if plots:
        out["plots"] = plot(out, workdir)
    with open(os.path.join(workdir, "quickstart.json"), "w") as f:
        json.dump(out, f, indent=2, default=float)
    log(f"\nwrote {os.path.join(workdir, 'quickstart.json')}" + (f" and {len(out.get('plots', []))} plots" if plots else "")
        + f" in {workdir} ({times['total'] / 60:.1f} min in all)")
    return out


def comparison(rows: list) -> dict:
    """APR vs SoS+ at each context both were evaluated at: accuracies and APR's lead (points)."""
    by = {(r["run"], r["context"]): r["accuracy"] for r in rows}
    res = {}
    for (run, ctx), acc in sorted(by.items(), key=lambda kv: kv[0][1]):
        if run == "sosp" and ("apr", ctx) in by:
            best_apr = max(by[("apr", ctx)], by.get(("apr_rl", ctx), 0.0))
            res[str(ctx)] = {"sosp": acc, "apr": by[("apr", ctx)], "apr_rl": by.get(("apr_rl", ctx)),
                             "apr_lead_points": 100 * (best_apr - acc)}
    return res


WHY_NOT = {
    "tiny": "Why, at the tiny preset: 3-number serial traces mostly fit the window, and APR's parent "
            "holds its own spawn block plus the children's results, so its longest call is only ~10% "
            "shorter than a serial trace; APR's edge needs problems whose serial search outgrows the window "
            "(4 numbers: --preset=mini; BUILD_NOTES.md, Known limits).",
    "mini": "Why, at the mini preset: the small policies imitate demonstrators that themselves solve only "
            "~57% (APR, beams 4 written best first) and ~32% (SoS+) of these problems within 1,024-token calls, "
            "and they fall short of them after ~2 hours of training each: APR's children find a solution for "
            "about half of the problems, and over a quarter of its children repeat a sibling's state "
            "(BUILD_NOTES.md, 'Where mini APR loses', 'Best-first expansions').",
}


def verdict(comp: dict, preset: str = "mini") -> str:
    """One honest paragraph: where APR leads, by how much, against the issue's target."""
    if not comp:
        return "No context had both SoS+ and APR evaluated."
    def better_of(v):
        return max(v["sosp"], v["apr"], v["apr_rl"] or 0.0)

    def meets(v):
        return v["apr_lead_points"] >= 10 and better_of(v) >= 0.40

    # The context that meets the target if one does, else the largest lead (ties: the context
    # where the better policy solves more).
    best_ctx = max(comp, key=lambda c: (meets(comp[c]), round(comp[c]["apr_lead_points"], 6), better_of(comp[c])))
    b = comp[best_ctx]
    lines = ["APR vs SoS+ at equal per-call context (greedy): " + "; ".join(
        f"{c}: {v['apr_lead_points']:+.1f} points" for c, v in comp.items()) + "."]
    better = better_of(b)
    met = meets(b)
    lines.append(f"Target (APR >= 10 points ahead, the better >= 40%): {'met' if met else 'not met'} "
                 f"(lead {b['apr_lead_points']:+.1f} at context {best_ctx}: "
                 f"{'at least' if b['apr_lead_points'] >= 10 else 'under'} 10; the better solves {better:.1%} there).")
    if not met:
        lines.append(WHY_NOT[preset])
    return "\n".join(lines)


def table(rows: list) -> str:
    """One line per evaluated condition: policy, context, accuracy, total and sequential
    tokens, children per problem, wall seconds."""
    w = max([12] + [len(NAMES.get(r["run"], r["run"])) for r in rows])
    lines = [f"{'policy':{w}s} {'context':>7s} {'accuracy':>8s} {'total tok':>9s} {'seq tok':>8s} {'children':>8s} "
             f"{'wall s':>7s}"]
    for r in rows:
        lines.append(f"{NAMES.get(r['run'], r['run']):{w}s} {r['context']:7d} {r['accuracy']:8.1%} "
                     f"{r['total_tokens']:9.0f} {r['sequential_tokens']:8.0f} {r['children']:8.2f} {r['seconds']:7.1f}")
    return "\n".join(lines)


def plot(out: dict, workdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = out["rows"]

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(workdir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, style in (("sosp", "o-"), ("apr", "s-"), ("apr_rl", "^--"), ("scratch", "x")):
        rs = sorted((r for r in rows if r["run"] == run), key=lambda r: r["context"])
        if rs:
            axes[0].plot([r["context"] for r in rs], [r["accuracy"] for r in rs], style, label=NAMES[run])
            axes[1].plot([r["sequential_tokens"] for r in rs], [r["accuracy"] for r in rs], style, label=NAMES[run])
    axes[0].set(xlabel="per-call context window (tokens)", ylabel="solved (held-out)", ylim=(0, 1),
                title="Accuracy vs context window")
    axes[1].set(xlabel="sequential tokens per problem", ylabel="solved (held-out)", ylim=(0, 1),
                title="Accuracy vs sequential tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "accuracy.png")
    curves = out["curves"]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
        for ax, (name, pts) in zip(axes[0], sorted(curves.items())):
            key = "loss" if name == "sft" else "reward"
            ax.plot([p["step"] for p in pts], [p[key] for p in pts], "o-" if len(pts) < 20 else "-")
            ax.set(xlabel="step", ylabel=key, title={"sft": "SFT from scratch: training loss",
                                                     "grpo": "GRPO on APR: mean reward"}[name])
            ax.grid(alpha=0.3)
        save(fig, "training.png")
    return files


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cli.quiet_logs()
    try:
        run(FLAGS.workdir, preset=FLAGS.preset, from_scratch=FLAGS.from_scratch, problems=FLAGS.problems, contexts=FLAGS.contexts,
            rl_steps=FLAGS.rl_steps, rl_problems=FLAGS.rl_problems, rl_group=FLAGS.rl_group,
            scratch_steps=FLAGS.scratch_steps, sosp=FLAGS.sosp, apr=FLAGS.apr, num_slots=FLAGS.num_slots,
            plots=FLAGS.plots, progress=FLAGS.progress)
    except Exception as e:  # noqa: BLE001 - cli.fail: user errors one line, bugs raised again
        cli.fail(e)


if __name__ == "__main__":
    cli.run(main)
