"""The whole pipeline as a function (``experiments/reproduce.py`` is its command line; the
quickstart's ``--from_scratch`` calls it too):

    data -> SFT SoS+, SFT APR -> GRPO on each -> export -> evaluation on test -> report

Both methods get the same budget: SFT steps x batch x sequence length from one SFT config,
GRPO steps x problems x rollouts from one RL config; stages are sized in steps, never by wall
time. Every stage is skipped when done and resumed when interrupted, so the same command
continues a stopped pipeline.

What each stage leaves in the work directory:

- ``data/``: ``gen_data`` (problem splits and demonstrations);
- ``sft_sosp/``, ``sft_apr/``, ``rl_sosp/``, ``rl_apr/``: training runs;
- ``export/``: the four policies as compact files (``{preset}_{method}_{sft|grpo}.npz``),
  ``{preset}_splits.npz`` (the problem splits) and ``manifest.json`` (for each file: method,
  stage, SFT steps and tokens, RL steps, seed, the policy SFT started from and its sha256,
  command, config, wall time and training seconds (with ``resumed_from`` when the stage
  resumed from a checkpoint), machine, the git revision its stage ran at, sha256; paths
  inside the repository are written relative to its root, the work directory as
  ``<workdir>``, so the policy files are the same bytes from any clone and work directory):
  what ``experiments/checkpoints/`` ships;
- ``eval/``: ``evaluate.json`` (every condition with its 95% interval, the paired comparisons,
  the APR policies' spawn decisions on validation problems), ``records.json`` (per-problem
  values), ``tables.txt`` and the plots. The test split is read here only; the choice between
  a method's SFT and GRPO policy (its "best") is made on validation, by the GRPO run's own
  greedy evaluations before and after training. A second stage's evaluation config
  (``experiments/configs/evaluate.py``: ``mini_sweep``) rewrites them with more conditions,
  computing only those not in ``eval/cache``;
- ``reproduce.json``: the headline, per-stage wall times and each training stage's mean
  tokens/s (SFT: slot tokens per training second; GRPO: generated tokens per rollout second).
"""

from __future__ import annotations

import json
import os
import platform
import time

KINDS = ("sosp", "apr")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage(stage: str, fn, log, name: str) -> tuple[dict, bool]:
    """(the stage's summary, whether it ran now): a finished stage (its summary.json) is read."""
    done = os.path.join(stage, "summary.json")
    if os.path.isfile(done):
        log(f"== {name}: done ({done})")
        with open(done) as f:
            return json.load(f), False
    log(f"== {name}")
    return fn(), True


class _Times:
    """Per-stage wall seconds, kept in ``<workdir>/stages.json`` across invocations."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "stages.json")
        self.code = code_revision()
        self.rows = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.rows = json.load(f)

    def add(self, stage: str, seconds: float, ran: bool, **extra) -> None:
        if not ran and stage in self.rows:
            return  # done before: keep the invocation that did it
        self.rows[stage] = {"wall_s": seconds, "code": self.code, **extra}
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.rows, f, indent=2)
        os.replace(self.path + ".tmp", self.path)


def _resumed(summary: dict) -> dict:
    """A training stage that resumed from a checkpoint: its wall time is the last invocation's
    (the interrupted ones' time is lost with them), its ``train_seconds`` the whole run's."""
    return {"resumed_from": summary["resumed_from"]} if summary.get("resumed_from") else {}


def _mean_rate(summary: dict, tokens: str, seconds: str, last: str) -> float | None:
    """A training stage's tokens/s over the whole run (its summary's run totals); the last
    logging window's rate for a summary written without them."""
    if summary.get(tokens) and summary.get(seconds):
        return summary[tokens] / summary[seconds]
    return summary.get(last)


def code_revision() -> dict:
    """Which code ran (for the manifest): the repository's git commit and whether tracked files
    differed from it; both None outside a git checkout (e.g. an installed package). A GRPO
    stage's result depends on the code's floating-point order, not just its configs."""
    import subprocess

    def git(*args):
        try:
            p = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine() -> dict:
    """What ran this (for the manifest): CPU model and vector extensions, cores, JAX devices."""
    import jax

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), cpu)
        flags = "avx512" if "avx512f" in info else ("avx2" if "avx2" in info else "")
    except OSError:
        pass
    return {
        "cpu": cpu,
        "vector": flags,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def portable(value, workdir: str | None = None):
    """``value`` (a config dict, a list, a string) with every absolute path inside this
    repository written relative to its root and, given ``workdir``, every path inside the work
    directory written as ``<workdir>/...`` (as ``recorded_command`` writes the flag), so that a
    manifest reads the same from any clone and any work directory; other paths stay as given."""
    if isinstance(value, dict):
        return {k: portable(v, workdir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v, workdir) for v in value)
    if isinstance(value, str) and os.path.isabs(value):
        if workdir:
            rel = os.path.relpath(value, os.path.abspath(workdir))
            if not rel.startswith(os.pardir):
                return "<workdir>" if rel == os.curdir else f"<workdir>/{rel}"
        rel = os.path.relpath(value, REPO)
        if rel != os.curdir and not rel.startswith(os.pardir):
            return rel
    return value


def recorded_command(args: list[str], program: str = "python -m experiments.reproduce") -> str:
    """The command as the manifest and the exported policies record it: ``program`` and its
    arguments, with ``--workdir``'s value written as ``<workdir>``. Where a run wrote is not
    what it computed, so the files it exports are the same bytes from any directory."""
    out, skip = [], False
    for a in args:
        if skip:
            out.append("<workdir>")
            skip = False
        elif a.startswith("--workdir="):
            out.append("--workdir=<workdir>")
        else:
            out.append(a)
            skip = a == "--workdir"
    return " ".join([program, *out])


def trained_tokens(data_dir: str, config) -> dict:
    """What an SFT run's batches held over its ``num_steps`` steps, recounted from the same
    loader (same seed, order and packing): token slots (steps x batch x seq_len), non-padding
    tokens (what the forward/backward processed) and trained (target) tokens."""

    from jaxapr import data as data_lib

    loader = data_lib.make_loader(
        os.path.join(data_dir, config.kind),
        "train",
        batch_size=config.batch_size,
        seq_len=int(config.seq_len),
        seed=config.seed,
        train_on_prompt=config.train_on_prompt,
        kind_repeats=dict(config.get("kind_repeats", None) or {}),
    )
    real = trained = 0
    for batch in data_lib.iterate_batches(loader, int(config.num_steps)):
        seg = batch["segment_ids"]
        real += int((seg > 0).sum())
        trained += int(((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & (batch["loss_mask"][:, 1:] > 0)).sum())
    return {
        "token_slots": int(config.num_steps) * int(config.batch_size) * int(config.seq_len),
        "tokens": real,
        "trained_tokens": trained,
    }


def val_choice(rl_dir: str) -> dict:
    """A method's best policy, chosen on validation: the GRPO run evaluates its start (the SFT
    policy) and its end greedily on the same validation problems; GRPO's policy is chosen only
    if it solves more of them (a tie keeps SFT). Where the run kept its per-problem validation
    records, the choice also carries GRPO - SFT on them with its paired 95% interval
    (``grpo_minus_sft``: ``jaxapr.stats.paired_bootstrap``'s fields), which says whether the
    choice rests on more than a few problems."""
    from jaxapr import stats
    from jaxapr.train.metrics import read_metrics
    from jaxapr.train.rl import read_val_records

    rows = [r for r in read_metrics(rl_dir) if "val/accuracy" in r]
    if not rows or rows[0]["step"] != 0:
        raise ValueError(f"{rl_dir}: expected greedy validation at GRPO step 0 and at the end (eval_at_start)")
    start, end = rows[0], rows[-1]
    out = {
        "sft_val_accuracy": start["val/accuracy"],
        "grpo_val_accuracy": end["val/accuracy"],
        "val_problems": start.get("val/problems"),
        "grpo_step": end["step"],
        "best": "grpo" if end["val/accuracy"] > start["val/accuracy"] else "sft",
    }
    records = read_val_records(rl_dir)
    if 0 in records and end["step"] in records:
        out["grpo_minus_sft"] = stats.paired_bootstrap(records[end["step"]]["success"], records[0]["success"])
    return out


def check_eval_config(eval_config) -> None:
    """A one-line ValueError for an evaluation config that the last stage would reject."""
    if int(eval_config.problems) < 0:
        raise ValueError(f"eval_config.problems={eval_config.problems}: expected >= 0 (0 skips the evaluation)")
    if int(eval_config.get("spawn_problems", 0)) < 0:
        raise ValueError(f"eval_config.spawn_problems={eval_config.spawn_problems}: expected >= 0 (0: off)")
    if eval_config.policies not in ("all", "best"):
        raise ValueError(f"eval_config.policies={eval_config.policies!r}: expected 'all' or 'best'")
    plan_of(eval_config).check()


def plan_of(eval_config):
    """The ``analysis.Plan`` an evaluation config describes."""
    from experiments import analysis

    return analysis.Plan(
        contexts=tuple(eval_config.contexts),
        n_max=eval_config.n_max,
        budgets=tuple(eval_config.budgets),
        sweep_problems=eval_config.sweep_problems,
        temperature=eval_config.temperature,
        num_slots=eval_config.num_slots,
        seed=eval_config.seed,
    )


def run(
    workdir: str, data_config, sft_config, rl_config, eval_config, *, rl: bool = True, command: str = "", log=print
) -> dict:
    from envs import countdown
    from experiments import analysis, gen_data
    from experiments.configs import evaluate as eval_configs
    from jaxapr.train import rl as rl_lib
    from jaxapr.train import sft

    if not workdir:
        raise ValueError("--workdir is required: expected a directory for the pipeline's stages")
    check_eval_config(eval_config)  # before hours of training, not after
    os.makedirs(workdir, exist_ok=True)
    times = _Times(workdir)
    preset = data_config.preset
    data_dir = os.path.join(workdir, "data")
    t0 = time.perf_counter()
    ran = not all(os.path.isfile(os.path.join(data_dir, k, "manifest.json")) for k in KINDS)
    log("== data")
    gen_data.prepare(data_config, data_dir, log=log)  # reused only when it holds this config's data
    times.add("data", time.perf_counter() - t0, ran)

    summaries, configs = {}, {}
    for kind in KINDS:
        stage = os.path.join(workdir, f"sft_{kind}")
        c = sft_config.copy_and_resolve_references()
        c.kind, c.data_dir = kind, data_dir
        configs[f"sft_{kind}"] = c
        t0 = time.perf_counter()
        summaries[f"sft_{kind}"], ran = _stage(
            stage, lambda c=c, stage=stage: sft.train(c, stage, log=log), log, f"SFT {kind}"
        )
        s = summaries[f"sft_{kind}"]
        times.add(
            f"sft_{kind}",
            time.perf_counter() - t0,
            ran,
            steps=s.get("step"),
            train_seconds=s.get("train_seconds"),
            tokens_per_s=_mean_rate(s, "slot_tokens", "train_seconds", "tokens_per_s"),
            **_resumed(s),
        )
    if rl:
        for kind in KINDS:
            stage = os.path.join(workdir, f"rl_{kind}")
            c = rl_config.copy_and_resolve_references()
            c.kind, c.data_dir, c.init_from = kind, data_dir, os.path.join(workdir, f"sft_{kind}")
            configs[f"rl_{kind}"] = c
            t0 = time.perf_counter()
            summaries[f"rl_{kind}"], ran = _stage(
                stage, lambda c=c, stage=stage: rl_lib.train(c, stage, log=log), log, f"GRPO {kind}"
            )
            s = summaries[f"rl_{kind}"]
            times.add(
                f"rl_{kind}",
                time.perf_counter() - t0,
                ran,
                steps=s.get("rl_step"),
                train_seconds=s.get("train_seconds"),
                tokens_per_s=_mean_rate(s, "generated_tokens", "generation_seconds", "gen_tokens_per_s"),
                **_resumed(s),
            )

    t0 = time.perf_counter()
    export_dir = os.path.join(workdir, "export")
    manifest_path = os.path.join(export_dir, "manifest.json")
    ran = not os.path.isfile(manifest_path)
    if ran:
        log("== export")
        export(workdir, preset, configs, data_config, times.rows, command=command, log=log)
    times.add("export", time.perf_counter() - t0, ran)
    with open(manifest_path) as f:
        manifest = json.load(f)

    if eval_config.problems <= 0:
        return {"times": times.rows, "summaries": summaries, "manifest": manifest}
    log("== evaluation (test split)")
    t0 = time.perf_counter()
    runs = {_run_name(m): os.path.join(export_dir, name) for name, m in manifest["files"].items() if "method" in m}
    if eval_config.policies == "best":
        best = set(best_runs(manifest.get("choice", {})).values())
        runs = {name: path for name, path in runs.items() if name in best}
    splits = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))
    numbers, targets = splits[eval_config.split]
    n = min(int(eval_config.problems), len(targets))
    problems = (numbers[:n], targets[:n])
    plan = plan_of(eval_config)
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    result = analysis.evaluate(runs, problems, plan, cache_dir=os.path.join(out, "cache"), log=log)
    result.update(split=eval_config.split, data_dir=data_dir, choice=manifest.get("choice", {}))
    spawn = int(eval_config.get("spawn_problems", 0))
    if spawn > 0:  # a diagnostic of the policies, on validation problems like every other look before test
        val_numbers, val_targets = splits["val"]
        result["spawn_decisions"] = analysis.spawn_decisions_of(
            runs, data_dir, (val_numbers[:spawn], val_targets[:spawn]), plan.budgets
        )
    result["headline"] = headline(result)
    analysis.save(
        result,
        out,
        problems,
        rl_metrics=analysis.rl_metrics_of({f"{k}_rl": os.path.join(workdir, f"rl_{k}") for k in KINDS}),
    )
    text = "\n\n".join(
        [analysis.tables(result), format_headline(result["headline"]), format_choice(manifest.get("choice", {}))]
    )
    with open(os.path.join(out, "tables.txt"), "w") as f:
        f.write(text + "\n")
    # An evaluation read whole from its cache keeps the time of the invocation that computed it.
    computed = any(not c.get("cached") for c in result["conditions"])
    second = eval_config.get("preset") in eval_configs.SECOND_STAGES  # its own row: the first's time stays
    times.add(f"evaluate_{eval_config.preset}" if second else "evaluate", time.perf_counter() - t0, computed)
    report = {
        "headline": result["headline"],
        "choice": manifest.get("choice", {}),
        "times": times.rows,
        "total_wall_s": sum(r["wall_s"] for r in times.rows.values()),
        "machine": machine(),
        "summaries": summaries,
        "eval": os.path.join(out, "evaluate.json"),
    }
    with open(os.path.join(workdir, "reproduce.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    log(text)
    log("\n" + format_times(times.rows))
    return report


def _run_name(m: dict) -> str:
    return m["method"] + ("_rl" if m["stage"] == "grpo" else "")


def export(
    workdir: str, preset: str, configs: dict, data_config, stage_times: dict, *, command: str, log=print
) -> dict:
    """Exports every trained policy, the problem splits and ``manifest.json`` into
    ``<workdir>/export`` (see the module docstring)."""
    import numpy as np

    from envs import countdown
    from envs.countdown.problems import sha256_file
    from jaxapr import policy_io

    out = os.path.join(workdir, "export")
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(workdir, "data")
    splits = countdown.ProblemSplits.load(os.path.join(data_dir, "problems"))
    split_file = os.path.join(out, f"{preset}_splits.npz")
    np.savez(
        split_file,
        **{
            f"{s}_{f}": arr
            for s, (nums, tg) in splits.splits.items()
            for f, arr in (("numbers", nums), ("targets", tg))
        },
    )
    files = {
        os.path.basename(split_file): {
            "what": "problem splits",
            "config": data_config.to_dict(),
            "sha256": sha256_file(split_file),
        }
    }
    choice, host = {}, machine()
    for kind in KINDS:
        sft_cfg = configs[f"sft_{kind}"]
        tokens = trained_tokens(data_dir, sft_cfg)
        budget = kind == "apr" and bool(data_config.apr.sub_call_budget)
        stages = [("sft", f"sft_{kind}", "best")]
        if f"rl_{kind}" in configs:
            stages.append(("grpo", f"rl_{kind}", "latest"))
            choice[kind] = val_choice(os.path.join(workdir, f"rl_{kind}"))
        for stage, run, which in stages:
            row = stage_times.get(run, {})  # the stage's line of stages.json
            policy = policy_io.load_policy(os.path.join(workdir, run), which=which)
            rl_cfg = configs.get(f"rl_{kind}") if stage == "grpo" else None
            init_from = sft_cfg.init_from.replace("{kind}", kind)
            entry = {
                # The SFT budget is its token slots (steps x batch x seq_len: the compute); what the
                # slots held (non-padding tokens) and what trained (target tokens) differ by method.
                "method": kind,
                "stage": stage,
                "sft_steps": int(sft_cfg.num_steps),
                "sft_tokens": tokens["token_slots"],
                "sft_nonpad_tokens": tokens["tokens"],
                "sft_trained_tokens": tokens["trained_tokens"],
                "rl_steps": int(rl_cfg.num_steps) if rl_cfg else 0,
                "rl_rollouts": int(rl_cfg.num_steps * rl_cfg.grpo.num_problems * rl_cfg.grpo.group_size)
                if rl_cfg
                else 0,
                "seed": {
                    "data": int(data_config.seed),
                    "sft": int(sft_cfg.seed),
                    **({"rl": int(rl_cfg.seed)} if rl_cfg else {}),
                },
                "init_from": portable(init_from, workdir) if stage == "sft" else f"{run}'s SFT policy",
                **({"init_sha256": sha256_file(init_from)} if stage == "sft" and os.path.isfile(init_from) else {}),
                "checkpoint": which,
                "command": command,
                "config": portable(
                    {
                        "data": data_config.to_dict(),
                        "sft": sft_cfg.to_dict(),
                        **({"rl": rl_cfg.to_dict()} if rl_cfg else {}),
                    },
                    workdir,
                ),
                "wall_s": row.get("wall_s"),
                **{k: row[k] for k in ("train_seconds", "resumed_from") if k in row},
                "code": row.get("code"),  # None when the stage's row records no revision
                "machine": host,
            }
            name = f"{preset}_{kind}_{stage}.npz"
            path = os.path.join(out, name)
            policy_io.export_policy(
                policy,
                path,
                extra={
                    "kind": kind,
                    "stage": stage,
                    "data_preset": preset,
                    "max_context": int(sft_cfg.eval_max_context),
                    "sub_call_budget": budget,
                    "made_by": command,
                    "manifest": "experiments/checkpoints/manifest.json",
                },
            )
            entry["sha256"] = sha256_file(path)
            files[name] = entry
            log(f"  exported {name}")
    manifest = {"preset": preset, "command": command, "code": code_revision(), "choice": choice, "files": files}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def best_runs(choice: dict) -> dict:
    """{method: the run name of its validation-chosen policy} ("apr" or "apr_rl", ...)."""
    return {k: k + ("_rl" if choice.get(k, {}).get("best") == "grpo" else "") for k in KINDS}


def headline(result: dict) -> list[dict]:
    """Each method's validation-chosen policy at every context, and APR's lead with its paired
    interval: the paper's comparison."""
    from experiments import analysis

    best = best_runs(result.get("choice", {}))
    rows = []
    for ctx in result["contexts"]:
        a = analysis.find(result, best["apr"], "context", context=ctx)
        b = analysis.find(result, best["sosp"], "context", context=ctx)
        if a and b:
            lead = analysis.paired(a, b, label=f"{analysis.NAMES[a['run']]} - {analysis.NAMES[b['run']]} at {ctx}")
            rows.append(
                {
                    "context": ctx,
                    "apr": best["apr"],
                    "sosp": best["sosp"],
                    **{
                        f"{side}_{k}": c[k]
                        for side, c in (("apr", a), ("sosp", b))
                        for k in (
                            "accuracy",
                            "accuracy_low",
                            "accuracy_high",
                            "total_tokens",
                            "sequential_tokens",
                            "children",
                        )
                    },
                    "lead": lead["diff"],
                    "lead_low": lead["low"],
                    "lead_high": lead["high"],
                    "problems": lead["n"],
                }
            )
    return rows


def format_headline(rows: list[dict]) -> str:
    from experiments.analysis import NAMES
    from jaxapr import stats

    lines = ["Headline (each method's policy chosen on validation; test split, greedy; paired 95% interval)"]
    for r in rows:
        lines.append(
            f"  context {r['context']:5d}: {NAMES[r['apr']]} "
            f"{stats.format_interval(r['apr_accuracy'], r['apr_accuracy_low'], r['apr_accuracy_high'])} vs "
            f"{NAMES[r['sosp']]} {stats.format_interval(r['sosp_accuracy'], r['sosp_accuracy_low'], r['sosp_accuracy_high'])}"
            f": lead {stats.format_interval(r['lead'], r['lead_low'], r['lead_high'])} points (n={r['problems']})"
        )
    return "\n".join(lines)


def format_choice(choice: dict) -> str:
    """One line per method: its SFT and GRPO policies' greedy validation accuracy, which one
    was chosen and, where the run kept per-problem records, GRPO - SFT with its paired
    interval."""
    from experiments.analysis import NAMES
    from jaxapr import stats

    lines = ["Validation choice (greedy; GRPO is chosen only if it solves more problems)"]
    for kind, c in choice.items():
        line = (
            f"  {NAMES[kind]:5s}: SFT {100 * c['sft_val_accuracy']:.1f}% vs + GRPO "
            f"{100 * c['grpo_val_accuracy']:.1f}% after {c['grpo_step']} steps (n={c['val_problems']}) -> "
            f"{c['best']}"
        )
        paired = c.get("grpo_minus_sft")
        if paired:
            line += f"; GRPO - SFT {stats.format_interval(paired['diff'], paired['low'], paired['high'])} points paired"
        lines.append(line)
    return "\n".join(lines)


def format_times(rows: dict) -> str:
    lines = [f"{'stage':12s} {'wall s':>8s} {'steps':>6s} {'train s':>8s} {'tokens/s':>9s}"]
    for stage, r in rows.items():
        lines.append(
            f"{stage:12s} {r['wall_s']:8.0f} {r.get('steps') or ''!s:>6s} "
            f"{(r.get('train_seconds') or 0):8.0f} {(r.get('tokens_per_s') or 0):9,.0f}"
            + (f"  resumed from step {r['resumed_from']}: wall s is that invocation's" if r.get("resumed_from") else "")
        )
    lines.append(f"{'total':12s} {sum(r['wall_s'] for r in rows.values()):8.0f}")
    return "\n".join(lines)
