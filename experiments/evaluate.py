r"""The APR paper's analyses for trained checkpoints: JSON + PNG.

    python -m experiments.evaluate --workdir=/tmp/jaxapr_reproduce --out=/tmp/eval
    python -m experiments.evaluate --sosp=/tmp/sft_sosp --apr=/tmp/sft_apr --apr_rl=/tmp/rl_apr \
        --data_dir=/tmp/d --out=/tmp/eval --contexts=256,512,1024 --n_max=8

``--workdir`` is a ``reproduce`` work directory (runs ``sft_sosp``, ``sft_apr``, ``rl_apr`` and
the data in ``data``); ``--sosp/--apr/--apr_rl/--data_dir`` name runs directly (any may be
missing: its analyses are skipped); each may also be an exported policy, e.g. the shipped
``--sosp=experiments/checkpoints/tiny_sosp_sft.npz`` (then ``--data_dir`` is required). On ``--num_problems`` held-out problems of ``--split``:

1. **accuracy vs per-call context window** (greedy): SoS+ and APR at each of ``--contexts``;
2. **accuracy vs total tokens**: SoS+ ``pass@n`` and ``cons@n`` for n = 1..``n_max``
   (temperature ``--temperature``; one rollout of ``n_max`` samples per problem, each n judged
   on the first n samples, so the curves share samples) against APR (greedy and, when the
   APR data was built with ``sub_call_budget``, each ``Sub Call Budget: b`` condition of
   ``--budgets``);
3. **accuracy vs sequential tokens and vs latency** (decode steps of a problem's critical
   path) for the same conditions;
4. **the effect of RL**: APR before / after GRPO at the main context (a table).

Writes ``<out>/evaluate.json`` (every condition: accuracy, total / sequential tokens,
children, latency, wall time) and ``<out>/*.png``, and prints the tables.
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
flags.DEFINE_string("apr_rl", None, "APR + GRPO run workdir or exported .npz (overrides --workdir's).")
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

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_or_exit()  # before any JAX computation
    from envs import countdown
    from experiments.analysis import evaluate, plot, resolve_runs, tables
    cli.quiet_logs()
    try:
        if not FLAGS.out:
            raise ValueError("--out is required: expected a directory for evaluate.json and the plots")
        if FLAGS.workdir and not os.path.isdir(FLAGS.workdir):
            raise FileNotFoundError(f"--workdir={FLAGS.workdir!r} does not exist")
        runs = resolve_runs(FLAGS.workdir, {"sosp": FLAGS.sosp, "apr": FLAGS.apr, "apr_rl": FLAGS.apr_rl})
        data_dir = FLAGS.data_dir or (os.path.join(FLAGS.workdir, "data") if FLAGS.workdir else None)
        if not data_dir:
            run = next((r for r in runs.values() if not r.endswith(".npz")), None)
            if run is None:
                raise ValueError("--data_dir is required with exported (.npz) policies: expected a gen_data output")
            with open(os.path.join(run, "config.json")) as f:
                data_dir = json.load(f)["data_dir"]
        numbers, targets = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))[FLAGS.split]
        if FLAGS.n_max < 0:
            raise ValueError(f"--n_max={FLAGS.n_max}: expected >= 0 (0 skips SoS+ pass@n / cons@n)")
        n = min(FLAGS.num_problems, len(targets))
        if n < 1:
            raise ValueError(f"--num_problems={FLAGS.num_problems}: expected >= 1")
        os.makedirs(FLAGS.out, exist_ok=True)
        result = evaluate(runs, (numbers[:n], targets[:n]), contexts=[int(c) for c in FLAGS.contexts],
                          n_max=FLAGS.n_max, budgets=FLAGS.budgets, temperature=FLAGS.temperature,
                          num_slots=FLAGS.num_slots, seed=FLAGS.seed)
    except Exception as e:  # noqa: BLE001 - cli.fail: user errors one line, bugs raised again
        cli.fail(e)
    result.update(runs=runs, data_dir=data_dir, split=FLAGS.split)
    if FLAGS.plots:
        result["plots"] = plot(result, FLAGS.out)
    with open(os.path.join(FLAGS.out, "evaluate.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(tables(result))
    print(f"\nwrote {os.path.join(FLAGS.out, 'evaluate.json')}" + (f" and {len(result.get('plots', []))} plots" if FLAGS.plots else ""))


if __name__ == "__main__":
    cli.run(main)
