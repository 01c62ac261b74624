"""The whole pipeline as a function (``experiments/reproduce.py`` is its command line; the
quickstart's ``--from_scratch`` calls it too): data -> SFT (SoS+ and APR) -> GRPO (APR) ->
evaluation, each stage skipped when done and resumed when interrupted."""
from __future__ import annotations

import json
import os
import time


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
    log("== data")
    gen_data.prepare(data_config, data_dir, log=log)  # reused only when it holds this config's data
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
    if eval_problems <= 0:
        return {"times": times, "summaries": summaries}
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


HEADLINE_NAMES = {"sosp": "SoS+", "apr": "APR (SFT)", "apr_rl": "APR + GRPO"}


def format_headline(rows: list[dict], names: dict | None = None) -> str:
    """One line per evaluated condition: policy (``names[run]``), context, accuracy, total and
    sequential tokens, children per problem, wall seconds."""
    names = names or HEADLINE_NAMES
    w = max([12] + [len(names.get(r["run"], r["run"])) for r in rows])
    lines = [f"{'policy':{w}s} {'context':>7s} {'accuracy':>8s} {'total tok':>9s} {'seq tok':>8s} {'children':>8s} "
             f"{'wall s':>7s}"]
    for r in rows:
        lines.append(f"{names.get(r['run'], r['run']):{w}s} {r['context']:7d} {r['accuracy']:8.1%} "
                     f"{r['total_tokens']:9.0f} {r['sequential_tokens']:8.0f} {r['children']:8.2f} {r['seconds']:7.1f}")
    return "\n".join(lines)
