r"""The main job: APR vs serial search on a laptop, in minutes.

    python -m experiments.quickstart [--workdir=/tmp/jaxapr_quickstart] [--preset=mini|tiny] [--from_scratch]

With the policies shipped in ``experiments/checkpoints/`` (default ``--preset=mini``: 4-number
Countdown, 0.9M parameters, the tiny model's dimensions; for each method the policy that
validation chose among the SFT and GRPO outputs of ``experiments.reproduce --preset=mini``, as
``manifest.json`` records):

1. **data**: the preset's dataset (``experiments/configs/data.py:<preset>``, seed 0: the
   problems and demonstrations the shipped policies were trained on; ``test`` is held out);
2. **SoS+ vs APR**: both policies, greedy, on ``--problems`` held-out problems at each
   per-call context window of ``--contexts`` (the paper's comparison at equal context; mini:
   1,024 tokens, a window that serial search runs out of), with 95% intervals and APR's lead
   with its paired interval;
3. **GRPO**: ``--rl_steps`` GRPO steps on the APR policy (``experiments/configs/rl.py:<preset>``)
   and their reward and children per problem (``--rl_eval`` also evaluates the result);
4. **from scratch** (``--scratch_steps=N``; default tiny 200 steps, mini off): an N-step SFT
   run of a fresh SoS+ policy on the same data (the first minutes of the path that made the
   shipped policies), evaluated likewise. Off for mini by default: a 4-number policy after a
   few dozen steps solves nothing and decodes every call to the window, which costs the main
   job minutes and shows only that training starts;
5. **results**: a table (accuracy, total and sequential tokens, children per problem, wall
   time), one solved APR search drawn as a tree (terminal and ``trace.html``),
   ``quickstart.json`` (with each stage's wall time) and PNG plots in ``--workdir``.

``--preset=tiny`` does the same with the tiny pair (3-number Countdown, contexts 256 / 384 /
512: serial traces mostly fit the window there, so APR has little to gain).

``--from_scratch`` instead runs the whole pipeline (``experiments.reproduce`` at the preset:
data, SoS+ and APR SFT, GRPO) without the shipped policies and evaluates what it trained the
same way (hours on 2 CPU cores). Every number printed is measured in this run; nothing is
stored or assumed. BUILD_NOTES.md records how long each takes on which machine.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments import cli

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = ("mini", "tiny")
CHECKPOINTS = os.path.join(HERE, "checkpoints")
# Per preset: the comparison's contexts, GRPO steps and the from-scratch demo's SFT steps.
PRESET_INFO = {
    "tiny": dict(contexts=(256, 384, 512), rl_steps=4, scratch_steps=200),
    "mini": dict(contexts=(1024,), rl_steps=2, scratch_steps=0),
}
NAMES = {"sosp": "SoS+", "apr": "APR", "apr_rl": "APR + GRPO (demo)", "scratch": "SoS+ from scratch"}
MODES = {"sosp": "sosp", "apr": "apr", "apr_rl": "apr", "scratch": "sosp"}


def shipped_policies(preset: str) -> dict:
    """{"sosp": path, "apr": path}: the shipped policies of ``preset``. Where the checkpoints'
    manifest holds the preset's reproduce run, each method's policy is the one validation chose
    (SFT or GRPO, the manifest's ``choice``); otherwise the preset's SFT pair."""
    manifest_path = os.path.join(CHECKPOINTS, "manifest.json")
    choice = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("preset") == preset:
            choice = {k: v["best"] for k, v in manifest.get("choice", {}).items()}
    return {k: os.path.join(CHECKPOINTS, f"{preset}_{k}_{choice.get(k, 'sft')}.npz") for k in ("sosp", "apr")}


def _label(name: str, path: str | None) -> str:
    """A row's name: the method, and for a shipped file its stage."""
    base = NAMES.get(name, name)
    if path and path.endswith(".npz") and name in ("sosp", "apr"):
        stage = "GRPO" if path.endswith("_grpo.npz") else "SFT"
        return f"{base} ({stage})"
    return base


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/jaxapr_quickstart", "Where data, runs, quickstart.json and the plots go.")
flags.DEFINE_enum(
    "preset",
    "mini",
    list(PRESETS),
    "Problem distribution and shipped policies: mini (4 numbers, 1,024-token calls) or tiny (3 numbers).",
)
flags.DEFINE_bool(
    "from_scratch",
    False,
    "Train everything (experiments.reproduce at the preset: hours on "
    "2 cores) instead of starting from the shipped policies.",
)
flags.DEFINE_integer("problems", 200, "Held-out (test) problems evaluated.")
flags.DEFINE_list(
    "contexts",
    None,
    "Per-call context windows (tokens) of the comparison (default: tiny "
    "256,384,512; mini 1024; e.g. 768,1024 adds a tighter window).",
)
flags.DEFINE_integer("rl_steps", None, "GRPO steps on the APR policy (default: tiny 4, mini 2).")
flags.DEFINE_integer("rl_problems", 2, "GRPO problems per step (x --rl_group rollouts).")
flags.DEFINE_bool(
    "rl_eval",
    False,
    "Also evaluate the GRPO demo's policy (a few steps barely move it; the "
    "shipped APR policy already had reproduce's GRPO stage when validation chose it).",
)
flags.DEFINE_integer("rl_group", 8, "GRPO rollouts per problem.")
flags.DEFINE_integer(
    "scratch_steps",
    None,
    "SFT steps of the from-scratch demo (0: skip it; default: tiny 200, mini 0; mini 40 shows the first steps).",
)
flags.DEFINE_string(
    "sosp", None, "SoS+ policy: an exported .npz or a train_sft workdir (default: the preset's shipped one)."
)
flags.DEFINE_string(
    "apr", None, "APR policy: an exported .npz or a train_sft workdir (default: the preset's shipped one)."
)
flags.DEFINE_integer("num_slots", 64, "Engine slots (rows decoded together).")
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_bool("progress", True, "Progress bars.")


def _configs(preset: str, scratch_steps: int, rl_steps: int, rl_problems: int, rl_group: int, num_slots: int):
    from experiments.configs import data as data_cfg
    from experiments.configs import rl as rl_cfg
    from experiments.configs import sft as sft_cfg

    d = data_cfg.get_config(preset)
    # The shipped policies need only the problems (test to evaluate, train for GRPO); the
    # from-scratch demo trains on SoS+ demonstrations. --from_scratch runs reproduce's own data.
    d.kinds = ("sosp",) if scratch_steps else ()
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


def check_args(
    *,
    problems: int,
    contexts,
    rl_steps: int,
    rl_problems: int,
    rl_group: int,
    scratch_steps: int,
    num_slots: int,
    policies: dict,
    preset: str = "mini",
) -> list[int]:
    """Validates the quickstart's arguments before anything runs; returns the contexts."""
    try:
        ctx = sorted({int(c) for c in contexts})
    except ValueError:
        raise ValueError(f"--contexts={','.join(map(str, contexts))}: expected comma-separated integers") from None
    if not ctx or ctx[0] < 32:
        raise ValueError(f"--contexts={ctx}: expected at least one window of >= 32 tokens")
    for name, value, low in (
        ("problems", problems, 1),
        ("rl_steps", rl_steps, 0),
        ("rl_problems", rl_problems, 1),
        ("rl_group", rl_group, 2),
        ("scratch_steps", scratch_steps, 0),
        ("num_slots", num_slots, 1),
    ):
        if value < low:
            raise ValueError(f"--{name}={value}: expected >= {low}")
    for name, path in policies.items():
        if not (os.path.isfile(path) and path.endswith(".npz")) and not os.path.isdir(
            os.path.join(path, "checkpoints")
        ):
            raise FileNotFoundError(
                f"--{name}={path!r}: expected an exported policy .npz or a train_sft workdir "
                "(the shipped ones are in experiments/checkpoints/)"
            )
        trained_on = _exported_preset(name, path) if path.endswith(".npz") else None
        if trained_on not in (None, preset):
            raise ValueError(
                f"--{name}={path!r} was trained on the {trained_on!r} distribution: the quickstart "
                f"evaluates on the {preset!r} one (--preset)"
            )
    return ctx


def _exported_preset(name: str, path: str) -> str | None:
    """The data preset an exported policy was trained on (its metadata), or None if unknown."""
    from jaxapr import policy_io

    try:
        meta = policy_io.exported_meta(path)
    except ValueError as e:
        raise ValueError(f"--{name}: {e}") from None
    return meta.get("extra", {}).get("data_preset")


def evaluate_policies(
    policies: dict,
    problems,
    contexts,
    *,
    num_slots: int,
    log=print,
    progress: bool = True,
    labels: dict | None = None,
    keep: dict | None = None,
) -> list:
    """Greedy rollouts of each policy at each per-call context: one row per (policy, context),
    with the per-problem verdicts (``solved``) and children counts. ``keep``: a dict that
    receives the "apr" policy's rollouts per context, {context: [RolloutResult, ...]}."""
    labels = labels or {}
    from tqdm.auto import tqdm

    from jaxapr import evaluation

    jobs = [(name, ctx) for name in policies for ctx in contexts]
    rows = []
    bar = tqdm(jobs, desc="evaluating", unit="condition", disable=not progress, leave=False)
    log = bar.write if progress and log is print else log  # lines above the bar, not through it
    for name, ctx in bar:
        policy = policies[name]
        if ctx > policy.cfg.max_len:
            log(
                f"  {labels.get(name, NAMES.get(name, name))}: context {ctx} exceeds the model's {policy.cfg.max_len}; skipped"
            )
            continue
        results = []
        r, records = evaluation.evaluate_rollouts(
            policy, problems, mode=MODES.get(name, name), max_context=ctx, num_slots=num_slots, results=results
        )
        if keep is not None and name == "apr":
            keep[ctx] = results
        sched = results[0].schedule if results else {}  # the whole batch's (this process's share)
        r.update(
            run=name,
            label=labels.get(name, NAMES.get(name, name)),
            context=ctx,
            mode=MODES.get(name, name),
            solved=records["success"],
            children_per_problem=records["children"],
            schedule={k: sched[k] for k in SCHEDULE if k in sched},
        )
        rows.append(r)
        log(
            f"  {r['label']:18s} context {ctx:4d}: solved {r['accuracy']:6.1%} "
            f"[{r['accuracy_low']:.1%}, {r['accuracy_high']:.1%}]  tokens {r['total_tokens']:6.0f}"
            f"  sequential {r['sequential_tokens']:5.0f}  children {r['children']:4.2f}  ({r['seconds']:.0f} s)"
            + (
                f"\n  {'':18s} a child solved {r['child_solved']:6.1%}  lost at the join {r['lost_at_join']:6.1%}"
                f"  join out of context {r['join_overflow']:6.1%}"
                if "lost_at_join" in r
                else ""
            )
            + (f"\n  {'':18s} {_schedule_line(sched)}" if "attention_window_entries" in sched else "")
        )
    return rows


# The evaluation's schedule figures kept per row (runtime's ``schedule``): where its time went.
SCHEDULE = (
    "steps",
    "useful_slot_steps",
    "num_slots",
    "prefill_tokens",
    "prefill_s",
    "decode_s",
    "wall_s",
    "attention_window_entries",
    "attention_prefix_entries",
)


def _schedule_line(s: dict) -> str:
    """One line on a batch's decode: steps, useful slot-steps, blocked seconds, and how many
    cache entries attention read against what the calls' own prefixes hold."""
    useful = s["useful_slot_steps"] / max(1, s["num_slots"] * s["steps"])
    reads = s["attention_window_entries"] / max(1, s["attention_prefix_entries"])
    return (
        f"decode {s['steps']} steps ({useful:.0%} of slot-steps useful, {s['decode_s']:.0f} s), prefill"
        f" {s['prefill_tokens']} tokens ({s['prefill_s']:.0f} s); attention read {reads:.2f}x the calls' prefixes"
    )


def run(
    workdir: str,
    *,
    preset: str = "mini",
    from_scratch: bool = False,
    problems: int = 200,
    contexts=None,
    rl_steps: int | None = None,
    rl_problems: int = 2,
    rl_group: int = 8,
    rl_eval: bool = False,
    scratch_steps: int | None = None,
    sosp: str | None = None,
    apr: str | None = None,
    num_slots: int = 64,
    plots: bool = True,
    progress: bool = True,
    log=print,
) -> dict:
    """The quickstart (see the module docstring); returns what it writes to ``quickstart.json``.
    ``contexts``, ``rl_steps``, ``scratch_steps``, ``sosp`` and ``apr`` default to the preset's."""
    import jax

    from envs import countdown
    from experiments import gen_data, pipeline
    from jaxapr import policy_io
    from jaxapr.train import loop, sft
    from jaxapr.train import rl as rl_lib
    from jaxapr.train.metrics import read_metrics

    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {list(PRESETS)}")
    info = PRESET_INFO[preset]
    contexts = info["contexts"] if contexts is None else contexts
    scratch_steps = info["scratch_steps"] if scratch_steps is None else scratch_steps
    rl_steps = info["rl_steps"] if rl_steps is None else rl_steps
    shipped = shipped_policies(preset)
    policies_in = {} if from_scratch else {"sosp": sosp or shipped["sosp"], "apr": apr or shipped["apr"]}
    labels = {name: _label(name, path) for name, path in policies_in.items()}
    contexts = check_args(
        problems=problems,
        contexts=contexts,
        rl_steps=rl_steps,
        rl_problems=rl_problems,
        rl_group=rl_group,
        scratch_steps=scratch_steps,
        num_slots=num_slots,
        policies=policies_in,
        preset=preset,
    )
    workdir = loop.prepare_workdir(workdir)
    data_config, sft_config, rl_config = _configs(preset, scratch_steps, rl_steps, rl_problems, rl_group, num_slots)
    t_start = time.perf_counter()
    times, out = (
        {},
        {
            "preset": preset,
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "contexts": contexts,
            "from_scratch": from_scratch,
            "workdir": workdir,
        },
    )
    log(f"jaxapr quickstart on {jax.default_backend()} ({jax.device_count()} device(s)); work directory {workdir}")

    data_dir = os.path.join(workdir, "data")
    p = data_config.problems
    log(
        f"\n[1/5] data: the {preset} dataset ({p.num_numbers} numbers in 1..{p.max_number}, targets "
        f"{p.min_target}..{p.max_target}; test problems are held out)"
    )
    t0 = time.perf_counter()
    if from_scratch:
        log(
            f"  --from_scratch: experiments.reproduce's pipeline at the {preset} preset (data, SoS+ and APR SFT, GRPO; "
            "hours on 2 cores)"
        )
        from experiments.configs import sft as sft_cfg

        s = sft_cfg.get_config(preset)
        s.eval_num_slots = num_slots
        from experiments.configs import evaluate as eval_cfg

        e = eval_cfg.get_config(preset)
        e.problems = 0  # the quickstart evaluates on its own, below
        report = pipeline.run(
            os.path.join(workdir, "reproduce"), data_config, s, rl_config, e, rl=rl_steps > 0, log=log
        )
        data_dir = os.path.join(workdir, "reproduce", "data")
        out["reproduce"] = report
        runs = {
            "sosp": os.path.join(workdir, "reproduce", "sft_sosp"),
            "apr": os.path.join(workdir, "reproduce", "sft_apr"),
        }
        if rl_steps > 0:
            runs["apr_rl"] = os.path.join(workdir, "reproduce", "rl_apr")
    else:  # reused only when it holds this preset's data (gen_data's recorded identity)
        gen_data.prepare(data_config, data_dir, log=lambda *a: None, progress=progress)
    times["data"] = time.perf_counter() - t0
    splits = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))
    numbers, targets = splits["test"]
    n = min(problems, len(targets))
    test = (numbers[:n], targets[:n])
    out["problems"] = n
    log(
        f"  {len(splits['train'][1])} training problems, evaluating on {n} held-out test problems ({times['data']:.0f} s)"
    )

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
    rollouts = {}  # APR's evaluation rollouts: the example below draws one of them
    rows = evaluate_policies(
        {k: policies[k] for k in ("sosp", "apr")},
        test,
        contexts,
        num_slots=num_slots,
        log=log,
        progress=progress,
        labels=labels,
        keep=rollouts,
    )
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
        curves["grpo"] = [
            {"step": r["step"], "reward": r["rl/reward"], "kl": r["rl/kl"], "children": r["rl/children_per_problem"]}
            for r in rl_rows
        ]
        for p_ in curves["grpo"]:
            log(
                f"  step {p_['step']}: mean reward {p_['reward']:.3f}, {p_['children']:.2f} children per problem, "
                f"KL {p_['kl']:.2e}"
            )
        times["grpo"] = time.perf_counter() - t0
        if rl_eval or from_scratch:
            t0 = time.perf_counter()
            rows += evaluate_policies(
                {"apr_rl": policies["apr_rl"]}, test, contexts, num_slots=num_slots, log=log, progress=progress
            )
            times["grpo_evaluate"] = time.perf_counter() - t0
    else:
        log("\n[3/5] GRPO: skipped (--rl_steps=0)")

    if scratch_steps and not from_scratch:
        log(
            f"\n[4/5] from scratch: {scratch_steps} SFT steps of a fresh SoS+ policy on the {preset} data "
            + (
                "(the shipped one trained 2,000 steps)"
                if preset == "tiny"
                else "(the shipped one: tiny's 2,000 steps, then reproduce's SFT stage on these data)"
            )
        )
        t0 = time.perf_counter()
        scratch_dir = os.path.join(workdir, "sft_scratch")
        c = sft_config.copy_and_resolve_references()
        c.kind, c.data_dir, c.progress = "sosp", data_dir, progress
        summary = sft.train(c, scratch_dir, log=lambda *a: None)
        sft_rows = read_metrics(scratch_dir, prefix="train/")
        curves["sft"] = [{"step": r["step"], "loss": r["train/loss"]} for r in sft_rows]
        log(
            f"  loss {curves['sft'][0]['loss']:.3f} (step {curves['sft'][0]['step']}) -> {curves['sft'][-1]['loss']:.3f} "
            f"(step {curves['sft'][-1]['step']}); {summary.get('tokens_per_s', 0):,.0f} tokens/s"
        )
        times["scratch_sft"] = time.perf_counter() - t0
        scratch = policy_io.load_policy(scratch_dir, which="latest")
        rows += evaluate_policies(
            {"scratch": scratch}, test, [max(contexts)], num_slots=num_slots, log=log, progress=progress
        )
        out["policies"]["scratch"] = scratch_dir
        times["scratch"] = time.perf_counter() - t0
    elif from_scratch:
        curves["sft"] = [
            {"step": r["step"], "loss": r["train/loss"]} for r in read_metrics(runs["sosp"], prefix="train/")
        ]
        log("\n[4/5] from scratch: every policy above was trained in this run")
    else:
        log(
            "\n[4/5] from scratch: skipped (--scratch_steps=0; e.g. --scratch_steps=40 trains and evaluates a fresh policy)"
        )

    out.update(rows=rows, curves=curves, comparison=comparison(rows))
    log("\n[5/5] results")
    log(table(rows))
    log("\n" + verdict(out["comparison"], preset))
    t0 = time.perf_counter()
    example = example_trace(rows, rollouts, workdir)
    if example:
        out["example"] = example
        log(f"\nOne APR search from the table, as a tree (and as {example['html']}):\n{example['text']}")
    times["example"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    out["times"] = times
    if plots:
        out["plots"] = plot(out, workdir)
    with open(os.path.join(workdir, "quickstart.json"), "w") as f:
        json.dump(out, f, indent=2, default=float)
    log(
        f"\nwrote {os.path.join(workdir, 'quickstart.json')}"
        + (f" and {len(out.get('plots', []))} plots" if plots else "")
        + f" in {workdir} ({times['total'] / 60:.1f} min in all)"
    )
    return out


def example_trace(rows: list, rollouts: dict, workdir: str) -> dict | None:
    """Draws the first test problem APR solved with the most children (at the largest context
    evaluated), from the evaluation's own rollout (``rollouts``: ``evaluate_policies``'
    ``keep``): {"problem", "numbers", "target", "solved", "text", "html"}; None if APR solved
    none."""
    from jaxapr.trace_view import render_text, write_html

    apr = [r for r in rows if r["run"] == "apr"]
    if not apr:
        return None
    row = max(apr, key=lambda r: r["context"])
    solved = [i for i, ok in enumerate(row["solved"]) if ok]
    if not solved:
        return None
    i = max(solved, key=lambda j: (row["children_per_problem"][j], -j))
    result = rollouts[row["context"]][i]
    html = write_html(result, os.path.join(workdir, "trace.html"))
    return {
        "problem": int(i),
        "numbers": [int(x) for x in result.nums],
        "target": int(result.target),
        "solved": bool(result.success),
        "text": render_text(result),
        "html": html,
    }


def comparison(rows: list) -> dict:
    """APR vs SoS+ at each context both were evaluated at: accuracies and APR's lead (points)
    with its paired-bootstrap 95% interval over the problems."""
    from jaxapr import stats

    by = {(r["run"], r["context"]): r for r in rows}
    res = {}
    for (run, ctx), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if run == "sosp" and ("apr", ctx) in by:
            apr = by[("apr", ctx)]
            best = max((by[(k, ctx)] for k in ("apr", "apr_rl") if (k, ctx) in by), key=lambda x: x["accuracy"])
            d = stats.paired_bootstrap(best["solved"], r["solved"])
            lead, low, high = d["diff"], d["low"], d["high"]
            res[str(ctx)] = {
                "sosp": r["accuracy"],
                "apr": apr["accuracy"],
                "apr_rl": by[("apr_rl", ctx)]["accuracy"] if ("apr_rl", ctx) in by else None,
                "apr_lead_points": 100 * lead,
                "apr_lead_low": 100 * low,
                "apr_lead_high": 100 * high,
            }
    return res


WHY_NOT = {
    "tiny": "Why, at the tiny preset: 3-number serial traces mostly fit the window, and APR's parent "
    "holds its own spawn block plus the children's results, so its longest call is only ~10% "
    "shorter than a serial trace; APR's edge needs problems whose serial search outgrows the window "
    "(4 numbers: --preset=mini; BUILD_NOTES.md, Known limits).",
    "mini": "Why, at the mini preset: the small policies imitate demonstrators that themselves solve only "
    "~57% (APR) and ~36% (SoS+) of the validation problems within 1,024-token calls (gen_data's table), "
    "after 450 SFT steps each (experiments/checkpoints/manifest.json); BUILD_NOTES.md, Known limits.",
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
    lines = [
        "APR vs SoS+ at equal per-call context (greedy): "
        + "; ".join(
            f"{c}: {v['apr_lead_points']:+.1f} points [{v['apr_lead_low']:+.1f}, {v['apr_lead_high']:+.1f}]"
            for c, v in comp.items()
        )
        + " (paired 95% intervals)."
    ]
    better = better_of(b)
    met = meets(b)
    lines.append(
        f"Target (APR >= 10 points ahead, the better >= 40%): {'met' if met else 'not met'} "
        f"(lead {b['apr_lead_points']:+.1f} at context {best_ctx}: "
        f"{'at least' if b['apr_lead_points'] >= 10 else 'under'} 10; the better solves {better:.1%} there)."
    )
    if not met:
        lines.append(WHY_NOT[preset])
    return "\n".join(lines)


def table(rows: list) -> str:
    """One line per evaluated condition: policy, context, accuracy, total and sequential
    tokens, children per problem, wall seconds."""
    w = max([12] + [len(r.get("label", r["run"])) for r in rows])
    lines = [
        f"{'policy':{w}s} {'context':>7s} {'accuracy [95% interval]':>24s} {'total tok':>9s} {'seq tok':>8s} "
        f"{'children':>8s} {'wall s':>7s}"
    ]
    for r in rows:
        acc = f"{r['accuracy']:.1%} [{r['accuracy_low']:.1%}, {r['accuracy_high']:.1%}]"
        lines.append(
            f"{r.get('label', r['run']):{w}s} {r['context']:7d} {acc:>24s} "
            f"{r['total_tokens']:9.0f} {r['sequential_tokens']:8.0f} {r['children']:8.2f} {r['seconds']:7.1f}"
        )
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
            label = rs[0].get("label", NAMES[run])
            axes[0].plot([r["context"] for r in rs], [r["accuracy"] for r in rs], style, label=label)
            axes[1].plot([r["sequential_tokens"] for r in rs], [r["accuracy"] for r in rs], style, label=label)
    axes[0].set(
        xlabel="per-call context window (tokens)",
        ylabel="solved (held-out)",
        ylim=(0, 1),
        title="Accuracy vs context window",
    )
    axes[1].set(
        xlabel="sequential tokens per problem",
        ylabel="solved (held-out)",
        ylim=(0, 1),
        title="Accuracy vs sequential tokens",
    )
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
            ax.set(
                xlabel="step",
                ylabel=key,
                title={"sft": "SFT from scratch: training loss", "grpo": "GRPO on APR: mean reward"}[name],
            )
            ax.grid(alpha=0.3)
        save(fig, "training.png")
    return files


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cli.quiet_logs()
    try:
        run(
            FLAGS.workdir,
            preset=FLAGS.preset,
            from_scratch=FLAGS.from_scratch,
            problems=FLAGS.problems,
            contexts=FLAGS.contexts,
            rl_steps=FLAGS.rl_steps,
            rl_problems=FLAGS.rl_problems,
            rl_group=FLAGS.rl_group,
            rl_eval=FLAGS.rl_eval,
            scratch_steps=FLAGS.scratch_steps,
            sosp=FLAGS.sosp,
            apr=FLAGS.apr,
            num_slots=FLAGS.num_slots,
            plots=FLAGS.plots,
            progress=FLAGS.progress,
        )
    except Exception as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.run(main)
