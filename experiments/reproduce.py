r"""The whole pipeline at one preset: data -> SFT (SoS+ and APR) -> GRPO (APR) -> evaluation.

    python -m experiments.reproduce --preset=mini --workdir=/tmp/jaxapr_reproduce
    python -m experiments.reproduce --preset=tiny --workdir=/tmp/r --sft_config.num_steps=500

Stages write into ``--workdir``: ``data/`` (``gen_data``), ``sft_sosp/`` and ``sft_apr/``
(``train_sft``), ``rl_apr/`` (``train_rl`` from ``sft_apr``'s best checkpoint), ``eval/``
(``evaluate``: JSON, tables, PNG plots) and ``reproduce.json`` (the final table). A finished
stage (its ``summary.json`` / manifest exists) is skipped and an interrupted one resumes, so the
same command continues a stopped pipeline. Configs: ``experiments/configs/{data,sft,rl}.py`` at
``--preset``, each overridable (``--sft_config.num_steps=...``, ``--data_config.problems.train=...``,
``--rl_config.grpo.num_problems=...``) or replaced (``--sft_config=path.py:preset``).
``--preset=paper`` is the APR paper's scale, for GPU/TPU.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from jaxapr import distributed


def _preset_in_argv(default: str = "mini") -> str:
    """--preset picks the default config files, so it is read before absl parses the flags
    (the config flags' overrides need their file at definition time)."""
    for i, a in enumerate(sys.argv[1:], 1):
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
        if a == "--preset" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return default


_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_PRESET = _preset_in_argv()
FLAGS = flags.FLAGS
distributed.define_flags()  # many hosts: see jaxapr.distributed / experiments.launch
flags.DEFINE_enum("preset", "mini", ["tiny", "mini", "paper"], "Scale of every stage.")
flags.DEFINE_string("workdir", None, "Work directory (created; an existing one is continued).")
config_flags.DEFINE_config_file("data_config", f"{_CONFIGS}/data.py:{_PRESET}", "Dataset config (file:preset).")
config_flags.DEFINE_config_file("sft_config", f"{_CONFIGS}/sft.py:{_PRESET}", "SFT config (file:preset).")
config_flags.DEFINE_config_file("rl_config", f"{_CONFIGS}/rl.py:{_PRESET}", "GRPO config (file:preset).")
flags.DEFINE_bool("rl", True, "Run the GRPO stage.")
flags.DEFINE_integer("eval_problems", 200, "Held-out (test) problems of the final evaluation.")
flags.DEFINE_list("eval_contexts", [], "Per-call context windows evaluated (default: the model's).")
flags.DEFINE_integer("eval_n_max", 4, "SoS+ pass@n / cons@n up to n.")


def run(workdir: str, data_config, sft_config, rl_config, *, rl: bool = True, eval_problems: int = 200,
        eval_contexts=(), eval_n_max: int = 4, log=print) -> dict:
    from envs import countdown
    from experiments import analysis as evaluate
    from experiments import gen_data
    from jaxapr.train import sft
    from jaxapr.train import rl as rl_lib

    if not workdir:
        raise ValueError("--workdir is required: expected a directory for the pipeline's stages")
    os.makedirs(workdir, exist_ok=True)
    times = {}
    data_dir = os.path.join(workdir, "data")
    t0 = time.perf_counter()
    if not all(os.path.isfile(os.path.join(data_dir, k, "manifest.json")) for k in ("sosp", "apr")):
        log("== data")
        gen_data.run(data_config, data_dir, overwrite=True, log=log)
    times["data"] = time.perf_counter() - t0
    summaries = {}
    for kind in ("sosp", "apr"):
        stage = os.path.join(workdir, f"sft_{kind}")
        c = sft_config.copy_and_resolve_references()
        c.kind, c.data_dir = kind, data_dir
        t0 = time.perf_counter()
        summaries[f"sft_{kind}"] = _stage(stage, lambda c=c, stage=stage: sft.train(c, stage, log=log), log,
                                          f"SFT {kind}")
        times[f"sft_{kind}"] = time.perf_counter() - t0
    if rl:
        stage = os.path.join(workdir, "rl_apr")
        c = rl_config.copy_and_resolve_references()
        c.kind, c.data_dir, c.init_from = "apr", data_dir, os.path.join(workdir, "sft_apr")
        t0 = time.perf_counter()
        summaries["rl_apr"] = _stage(stage, lambda: rl_lib.train(c, stage, log=log), log, "GRPO apr")
        times["rl_apr"] = time.perf_counter() - t0
    log("== evaluation")
    t0 = time.perf_counter()
    runs = evaluate.resolve_runs(workdir, {})
    numbers, targets = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))["test"]
    n = min(eval_problems, len(targets))
    result = evaluate.evaluate(runs, (numbers[:n], targets[:n]), contexts=[int(x) for x in eval_contexts],
                               n_max=eval_n_max, budgets=["1", "2", "4", "8"], temperature=1.0,
                               num_slots=int(sft_config.eval_num_slots), seed=0, log=log)
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    result.update(runs=runs, data_dir=data_dir, split="test", plots=evaluate.plot(result, out))
    with open(os.path.join(out, "evaluate.json"), "w") as f:
        json.dump(result, f, indent=2)
    times["evaluate"] = time.perf_counter() - t0
    table = headline(result)
    report = {"headline": table, "times": times, "summaries": summaries, "eval": os.path.join(out, "evaluate.json")}
    with open(os.path.join(workdir, "reproduce.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    log(evaluate.tables(result))
    log("\n" + format_headline(table))
    return report


def _stage(stage: str, fn, log, name: str) -> dict:
    done = os.path.join(stage, "summary.json")
    if os.path.isfile(done):
        log(f"== {name}: done ({done})")
        with open(done) as f:
            return json.load(f)
    log(f"== {name}")
    return fn()


def headline(result: dict) -> list[dict]:
    """APR vs SoS+ (and APR + GRPO) at the main context, greedy: the paper's comparison."""
    rows = []
    for c in result["conditions"]:
        if c["analysis"] == "rl" or (c["analysis"] == "context" and c["run"] == "sosp"
                                     and c["context"] == result["main_context"]):
            rows.append({k: c[k] for k in ("run", "mode", "context", "accuracy", "total_tokens",
                                           "sequential_tokens", "children", "latency_steps", "seconds")})
    return rows


def format_headline(rows: list[dict]) -> str:
    names = {"sosp": "SoS+", "apr": "APR (SFT)", "apr_rl": "APR + GRPO"}
    lines = [f"{'policy':12s} {'context':>7s} {'accuracy':>8s} {'total tok':>9s} {'seq tok':>8s} {'children':>8s} "
             f"{'wall s':>7s}"]
    for r in rows:
        lines.append(f"{names[r['run']]:12s} {r['context']:7d} {r['accuracy']:8.1%} {r['total_tokens']:9.0f} "
                     f"{r['sequential_tokens']:8.0f} {r['children']:8.2f} {r['seconds']:7.1f}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_or_exit()  # before any JAX computation
    from jaxapr.train import common

    common.quiet_logs()
    data_config, sft_config, rl_config = FLAGS.data_config, FLAGS.sft_config, FLAGS.rl_config
    for name, c in (("data", data_config), ("sft", sft_config), ("rl", rl_config)):
        print(f"resolved {name} config:\n{c}")
    try:
        run(FLAGS.workdir, data_config, sft_config, rl_config, rl=FLAGS.rl, eval_problems=FLAGS.eval_problems,
            eval_contexts=FLAGS.eval_contexts, eval_n_max=FLAGS.eval_n_max)
    except (ValueError, FileNotFoundError, KeyError, common.TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
