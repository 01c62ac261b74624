r"""The APR paper's analyses for trained policies: JSON + tables + PNG.

    python -m experiments.evaluate --workdir=/tmp/jaxapr_reproduce --out=/tmp/eval
    python -m experiments.evaluate --sosp=/tmp/sft_sosp --apr=/tmp/sft_apr --apr_rl=/tmp/rl_apr \
        --data_dir=/tmp/d --out=/tmp/eval --contexts=768,1024 --n_max=8 --budgets=2,4,6

``--workdir`` is a ``reproduce`` work directory (runs ``sft_sosp``, ``sft_apr``, ``rl_sosp``,
``rl_apr`` and the data in ``data``); ``--sosp/--apr/--sosp_rl/--apr_rl/--data_dir`` name runs
directly (any may be missing: its analyses are skipped); each may also be an exported policy,
e.g. the shipped ``--apr=experiments/checkpoints/mini_apr_sft.npz`` (then ``--data_dir`` is
required). On ``--num_problems`` problems of ``--split`` (``experiments/analysis.py`` defines
every condition):

1. **accuracy vs per-call context window** (greedy) for every run at each of ``--contexts``;
2. **accuracy vs total tokens** on the first ``--sweep_problems``: SoS+ ``pass@n`` / ``cons@n``
   for n = 1..``n_max`` (one sampled rollout of n_max per problem) and APR with each
   ``Sub Call Budget: b`` of ``--budgets`` (when the APR data has budgets);
3. with ``--spawn_problems``, **spawn decisions**: each APR policy's probability of spawning
   after an expansion's k-th node, teacher-forced on the demonstrations' root calls, against
   their own rate, for the calls without a budget prefix and for those of each ``--budgets``
   (whether the policy reads its budget);
4. **paired comparisons** (APR vs SoS+, each method + GRPO vs itself, children under GRPO,
   matched total tokens, the largest budget before / after GRPO), each with a 95%
   paired-bootstrap interval over problems; every accuracy carries its 95% Wilson interval.

Writes ``<out>/evaluate.json``, ``<out>/records.json`` (the problems with each one's exact
solution count, and every condition's per-problem values) and the plots (children and accuracy
vs that difficulty among them), and prints the tables. With ``--cache_dir`` each finished
condition of an exported policy is stored there and a rerun reuses it, so an evaluation of many
conditions can be stopped and resumed (the store is keyed by the policy file's sha256, the
problems and the condition, not by the code: use a fresh directory after changing the
evaluation).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import cli
from jaxapr import distributed

FLAGS = flags.FLAGS
distributed.define_flags()  # many hosts: see jaxapr.distributed / experiments.launch
flags.DEFINE_string("workdir", None, "A reproduce work directory (runs sft_sosp, sft_apr, rl_apr; data in data/).")
flags.DEFINE_string("sosp", None, "SoS+ run workdir or exported .npz (overrides --workdir's).")
flags.DEFINE_string("apr", None, "APR run workdir or exported .npz (overrides --workdir's).")
flags.DEFINE_string("sosp_rl", None, "SoS+ + GRPO run workdir or exported .npz (overrides --workdir's).")
flags.DEFINE_string("apr_rl", None, "APR + GRPO run workdir or exported .npz (overrides --workdir's).")
flags.DEFINE_string("data_dir", None, "gen_data output (problems/ splits); default: the runs' config.")
flags.DEFINE_string("out", None, "Output directory for evaluate.json and the plots.")
flags.DEFINE_string("split", "test", "Problem split to evaluate on.")
flags.DEFINE_integer("num_problems", 200, "Problems evaluated (the first of the split).")
flags.DEFINE_list("contexts", [], "Per-call context windows (default: the APR model's context).")
flags.DEFINE_integer("n_max", 8, "SoS+ pass@n / cons@n for n = 1..n_max.")
flags.DEFINE_list("budgets", ["2", "3", "4", "5", "6"], "APR Sub Call Budget conditions (if the data has them).")
flags.DEFINE_integer("sweep_problems", 0, "Problems of the pass@n / cons@n and budget sweeps (0: all).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature of pass@n / cons@n.")
flags.DEFINE_integer("num_slots", 64, "Engine slots.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_enum(
    "checkpoint",
    "best",
    ["best", "latest"],
    "Which checkpoint of a training work directory: its best by validation (a GRPO run's best is chosen on"
    " its validation problems) or its latest (a run's end). An exported .npz has one.",
)
flags.DEFINE_integer(
    "spawn_problems",
    0,
    "Also measure the APR policies' spawn decisions, teacher-forced on the demonstrations of this many of the"
    " problems (experiments/analysis.py: spawn_decisions; 0: off).",
)
flags.DEFINE_string(
    "cache_dir",
    None,
    "Store each finished condition of an exported (.npz) policy here; a rerun on the same policy files and"
    " problems reuses it, so a long evaluation that is stopped resumes (default: no store).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_or_exit()  # before any JAX computation
    from envs import countdown
    from experiments import analysis
    from jaxapr import policy_io

    cli.quiet_logs()
    try:
        if not FLAGS.out:
            raise ValueError("--out is required: expected a directory for evaluate.json and the plots")
        if FLAGS.cache_dir and os.path.exists(FLAGS.cache_dir) and not os.path.isdir(FLAGS.cache_dir):
            raise ValueError(f"--cache_dir={FLAGS.cache_dir!r} is not a directory: expected a directory for the store")
        if FLAGS.spawn_problems < 0:
            raise ValueError(f"--spawn_problems={FLAGS.spawn_problems}: expected >= 0 (0: off)")
        if FLAGS.workdir and not os.path.isdir(FLAGS.workdir):
            raise FileNotFoundError(f"--workdir={FLAGS.workdir!r} does not exist")
        runs = analysis.resolve_runs(FLAGS.workdir, {name: getattr(FLAGS, name) for name in analysis.RUNS})
        data_dir = FLAGS.data_dir or (os.path.join(FLAGS.workdir, "data") if FLAGS.workdir else None)
        if not data_dir:
            run = next((r for r in runs.values() if not r.endswith(".npz")), None)
            if run is None:
                raise ValueError("--data_dir is required with exported (.npz) policies: expected a gen_data output")
            with open(os.path.join(run, "config.json")) as f:
                data_dir = json.load(f)["data_dir"]
        numbers, targets = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))[FLAGS.split]
        n = min(FLAGS.num_problems, len(targets))
        if n < 1:
            raise ValueError(f"--num_problems={FLAGS.num_problems}: expected >= 1")
        try:
            contexts = tuple(int(c) for c in FLAGS.contexts)
            budgets = tuple(int(b) for b in FLAGS.budgets)
        except ValueError:
            raise ValueError(f"--contexts={FLAGS.contexts} / --budgets={FLAGS.budgets}: expected integers") from None
        if not contexts:
            contexts = (max(policy_io.load_policy(r, which=FLAGS.checkpoint).cfg.max_len for r in runs.values()),)
        plan = analysis.Plan(
            contexts=contexts,
            n_max=FLAGS.n_max,
            budgets=budgets,
            sweep_problems=FLAGS.sweep_problems,
            temperature=FLAGS.temperature,
            num_slots=FLAGS.num_slots,
            seed=FLAGS.seed,
        ).check()
        os.makedirs(FLAGS.out, exist_ok=True)
        result = analysis.evaluate(
            runs, (numbers[:n], targets[:n]), plan, cache_dir=FLAGS.cache_dir, which=FLAGS.checkpoint
        )
        if FLAGS.spawn_problems > 0:
            result["spawn_decisions"] = analysis.spawn_decisions_of(
                runs,
                data_dir,
                (numbers[: FLAGS.spawn_problems], targets[: FLAGS.spawn_problems]),
                budgets,
                which=FLAGS.checkpoint,
            )
    except Exception as e:
        cli.fail(e)
    result.update(data_dir=data_dir, split=FLAGS.split)
    analysis.save(
        result, FLAGS.out, (numbers[:n], targets[:n]), plots=FLAGS.plots, rl_metrics=analysis.rl_metrics_of(runs)
    )
    print(analysis.tables(result))
    print(
        f"\nwrote {os.path.join(FLAGS.out, 'evaluate.json')}"
        + (f" and {len(result.get('plots', []))} plots" if FLAGS.plots else "")
    )


if __name__ == "__main__":
    cli.run(main)
