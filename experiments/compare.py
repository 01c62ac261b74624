r"""A paired comparison of two conditions from two ``experiments.evaluate`` outputs.

    python -m experiments.compare --a=/tmp/eval_750:apr --b=/tmp/eval_450:apr
    python -m experiments.compare --a=/tmp/ev:apr_rl#6 --b=/tmp/ev:sosp/cons@4

Each side is ``<evaluate --out directory>:<run>`` with optional ``/<mode>`` (a SoS+ run's
``pass@n`` or ``cons@n``; default: the run's greedy rollout) and ``#<b>`` (an APR run's
``Sub Call Budget: b`` condition), read from
that directory's ``records.json`` at ``--context`` (default: the largest both have). Evaluations
made separately compare only on the same problems, in the same order: the two files' problem
lists must match for the first n both evaluated, or the command stops with a one-line error.
A side may also be ``<train_rl workdir>@<step>``: that GRPO run's greedy validation at RL step
``step`` (its ``val_records.jsonl``; the problems are the first ``eval_problems`` of its data's
``eval_split``), so a run's learning curve compares paired with its start or with an
evaluation of the same validation problems:

    python -m experiments.compare --a=/tmp/rl_apr@30 --b=/tmp/rl_apr@0

Prints each condition's accuracy with its 95% Wilson interval and the paired-bootstrap interval
of A - B over problems for success, children and total tokens; ``--json`` writes them.
``experiments.evaluate`` already states the comparisons inside one evaluation; this is for two
evaluations (e.g. a policy trained further, evaluated later on the same problems)."""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import cli
from jaxapr.traces import spawn_join

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "a", None, "Condition A: <evaluate out dir>:<run>[/<mode>][#<budget>] or <train_rl workdir>@<step>."
)
flags.DEFINE_string("b", None, "Condition B, the same form.")
flags.DEFINE_integer("context", 0, "Per-call window of both conditions (0: the largest both have).")
flags.DEFINE_string("json", None, "Also write the comparison to this JSON file.")

FIELDS = ("success", "children", "total_tokens")


SPEC = "<evaluate out dir>:<run>[/<mode>][#<budget>] or <train_rl workdir>@<step>"


def parse(spec: str) -> tuple[str, str, str, str]:
    """``<dir>:<run>[/<mode>][#<b>]`` -> (dir, run, mode, prefix): mode defaults to the run's
    greedy one (``apr`` for APR runs, ``sosp`` for SoS+), ``#b`` is the ``Sub Call Budget: b ``
    prefix."""
    if not spec or ":" not in spec:
        raise ValueError(f"condition {spec!r}: expected {SPEC}")
    directory, rest = spec.rsplit(":", 1)
    rest, _, budget = rest.partition("#")
    run, _, mode = rest.partition("/")
    if run not in ("sosp", "apr", "sosp_rl", "apr_rl"):
        raise ValueError(f"condition {spec!r}: run {run!r}, expected sosp, apr, sosp_rl or apr_rl after ':'")
    if budget and not budget.isdigit():
        raise ValueError(f"condition {spec!r}: budget {budget!r}, expected an integer after '#'")
    prefix = spawn_join.budget_prefix(int(budget)) if budget else ""
    return directory, run, mode or run.removesuffix("_rl"), prefix


def load(directory: str) -> dict:
    path = os.path.join(directory, "records.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: expected an experiments.evaluate --out directory")
    with open(path) as f:
        return json.load(f)


def run_step(spec: str) -> tuple[dict, dict] | None:
    """``<train_rl workdir>@<step>`` -> (records in ``load``'s form, the condition): the run's
    validation records at that RL step; None for a spec of the other form."""
    directory, at, step = spec.rpartition("@")
    if not at or not step.isdigit() or not os.path.isfile(os.path.join(directory, "config.json")):
        return None
    from envs import countdown
    from jaxapr.train import rl

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    records = rl.read_val_records(directory)
    if int(step) not in records:
        raise ValueError(
            f"condition {spec!r}: the run has no validation records at RL step {step}: it has {sorted(records)}"
        )
    rec = records[int(step)]
    numbers, targets = countdown.ProblemSplits.load(os.path.join(config["data_dir"], "problems"))[config["eval_split"]]
    n = len(rec["success"])
    condition = {
        "run": os.path.basename(os.path.normpath(directory)) + f"@{step}",
        "mode": config["kind"],
        "prefix": "",
        "context": int(config["max_context"]),
        "problems": n,
        "records": rec,
    }
    problems = {"numbers": numbers[:n].tolist(), "targets": targets[:n].tolist()}
    return {"problems": problems, "conditions": [condition]}, condition


def _name(c: dict) -> str:
    budget = spawn_join.prompt_budget(c["prefix"])
    return f"{c['run']}/{c['mode']}" + ("" if budget is None else f"#{budget}")


def compare(spec_a: str, spec_b: str, context: int = 0) -> dict:
    from jaxapr import stats

    sides = []  # (spec, records, the condition's entries by context)
    for spec in (spec_a, spec_b):
        at_step = run_step(spec)
        if at_step is not None:
            records, condition = at_step
            sides.append((spec, records, {condition["context"]: condition}))
            continue
        directory, run, mode, prefix = parse(spec)
        records = load(directory)
        by_context = {}  # where two analyses hold the condition: the one over more problems
        for c in records["conditions"]:
            if (c["run"], c["mode"], c["prefix"]) == (run, mode, prefix):
                if c["context"] not in by_context or c["problems"] > by_context[c["context"]]["problems"]:
                    by_context[c["context"]] = c
        if not by_context:
            have = sorted({_name(c) for c in records["conditions"]})
            raise ValueError(f"condition {spec!r} is not in its records.json: it has {have}")
        sides.append((spec, records, by_context))
    if not context:
        common = set(sides[0][2]) & set(sides[1][2])
        if not common:
            raise ValueError(f"conditions {spec_a!r} and {spec_b!r} share no context window")
        context = max(common)
    for spec, _, by_context in sides:
        if context not in by_context:
            raise ValueError(
                f"condition {spec!r} has no context {context} in its records.json: it has {sorted(by_context)}"
            )
    conds = [by_context[context] for _, _, by_context in sides]
    n = min(len(c["records"]["success"]) for c in conds)
    (_, ra, *_), (_, rb, *_) = sides
    for key in ("numbers", "targets"):
        if ra["problems"][key][:n] != rb["problems"][key][:n]:
            raise ValueError(
                f"{spec_a!r} and {spec_b!r} were evaluated on different problems (their first {n} {key} "
                "differ): expected evaluations of the same split and problems"
            )
    out = {"a": spec_a, "b": spec_b, "context": context, "n": n, "accuracy": {}, "paired": {}}
    for name, c in zip("ab", conds):
        wins = int(sum(c["records"]["success"][:n]))
        low, high = stats.wilson_interval(wins, n)
        out["accuracy"][name] = {"accuracy": wins / n, "low": low, "high": high}
    for field in FIELDS:
        a, b = (c["records"].get(field) for c in conds)
        if a is not None and b is not None:
            out["paired"][field] = stats.paired_bootstrap(a[:n], b[:n])
    return out


def format_comparison(result: dict) -> str:
    from jaxapr import stats

    lines = [f"{result['n']} problems, per-call window {result['context']}"]
    for name in "ab":
        acc = result["accuracy"][name]
        lines.append(
            f"  {name.upper()} {result[name]}: {stats.format_interval(acc['accuracy'], acc['low'], acc['high'])}"
        )
    for field, r in result["paired"].items():
        percent = field == "success"
        scale, unit = (100, " points") if percent else (1, "")
        lines.append(
            f"  A - B {field}: {scale * r['diff']:+.2f}{unit} [{scale * r['low']:+.2f}, {scale * r['high']:+.2f}] "
            f"(paired bootstrap, P(A better) {r['p_a_better']:.3f})"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cli.quiet_logs()
    try:
        if not FLAGS.a or not FLAGS.b:
            raise ValueError(f"--a and --b are required: expected {SPEC}")
        if FLAGS.context < 0:
            raise ValueError(f"--context={FLAGS.context}: expected a window > 0 (0: the largest both have)")
        result = compare(FLAGS.a, FLAGS.b, FLAGS.context)
    except Exception as e:
        cli.fail(e)
    print(format_comparison(result))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
