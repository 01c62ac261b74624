"""The APR paper's analyses as functions (``experiments/evaluate.py`` and
``experiments/reproduce.py`` are their command lines): evaluate trained policies under each
condition, compare them with paired intervals, print the tables, draw the plots.

Runs are named: ``sosp`` / ``apr`` (SFT), ``sosp_rl`` / ``apr_rl`` (+ GRPO). Conditions:

- **context** (greedy): every run at every per-call context window (the paper's comparison
  at equal context), on all problems;
- **tokens** (the paper's Fig. 4a): SoS+ ``pass@n`` / ``cons@n`` for n = 1..``n_max`` (one
  sampled rollout of n_max per problem, each n judged on the first n) and APR greedy without
  a budget (the matched-tokens comparison's side) and, when its data has budgets, with each
  ``Sub Call Budget: b`` prefix, on the first ``sweep_problems`` problems;
- **comparisons**: paired-bootstrap intervals over problems for A - B, at each context (APR vs
  SoS+, each method + GRPO vs itself), for children under RL, at matched total tokens (each
  point of APR's curve, without a budget and at each budget, against the SoS+ cons@n whose
  tokens come closest: where the curves cross) and for the enforced-children ablation (the
  largest budget, before and after GRPO).

Every condition keeps per-problem records (``jaxapr.evaluation``) so that comparisons pair the
same problems; with ``cache_dir`` each finished condition is stored and a rerun reuses it
(keyed by an exported policy file's sha256 and the condition), so an interrupted evaluation
resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

RUNS = {"sosp": "sft_sosp", "apr": "sft_apr", "sosp_rl": "rl_sosp", "apr_rl": "rl_apr"}
NAMES = {"sosp": "SoS+", "apr": "APR", "sosp_rl": "SoS+ + GRPO", "apr_rl": "APR + GRPO"}
MODES = {"sosp": "sosp", "apr": "apr", "sosp_rl": "sosp", "apr_rl": "apr"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What an evaluation runs (``experiments/configs/evaluate.py`` holds the presets)."""

    contexts: tuple = (1024,)  # per-call windows of the context analysis (the last is the main one)
    n_max: int = 8  # SoS+ pass@n / cons@n for n = 1..n_max
    budgets: tuple = ()  # APR "Sub Call Budget: b" conditions (when the data has budgets)
    sweep_problems: int = 0  # problems of the tokens analysis (0: all)
    temperature: float = 1.0  # sampling temperature of pass@n / cons@n
    num_slots: int = 64
    seed: int = 0

    def check(self) -> Plan:
        if not self.contexts or min(int(c) for c in self.contexts) < 32:
            raise ValueError(f"contexts={list(self.contexts)}: expected at least one window of >= 32 tokens")
        for name in ("n_max", "sweep_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        if self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots}: expected >= 1")
        if self.n_max and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: pass@n / cons@n sample, expected > 0")
        if any(int(b) < 0 for b in self.budgets):
            raise ValueError(f"budgets={list(self.budgets)}: expected non-negative ints")
        return self

    @property
    def main_context(self) -> int:
        return max(int(c) for c in self.contexts)


def resolve_runs(workdir, overrides: dict) -> dict:
    """{run name: a train_sft / train_rl workdir or an exported ``.npz``} for the runs that exist."""
    runs = {}
    for name, sub in RUNS.items():
        path = overrides.get(name) or (os.path.join(workdir, sub) if workdir else None)
        if path and (
            os.path.isdir(os.path.join(path, "checkpoints")) or (path.endswith(".npz") and os.path.isfile(path))
        ):
            runs[name] = path
        elif overrides.get(name):
            raise FileNotFoundError(
                f"--{name}={path!r} is neither a run with checkpoints/ nor an exported .npz: "
                "expected a train_sft / train_rl workdir or a file written by export_policy"
            )
    if not runs:
        raise FileNotFoundError(
            f"no runs found (workdir={workdir!r}): expected sft_sosp/, sft_apr/, rl_sosp/ or "
            "rl_apr/ with checkpoints, or --sosp/--apr/--sosp_rl/--apr_rl"
        )
    return runs


def _fingerprint(path: str) -> str | None:
    """An exported policy's sha256 (what the cache is keyed by); None for a training workdir,
    whose conditions are not cached (its best checkpoint can change)."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def has_budgets(run: str) -> bool:
    """Whether the run's APR data was written with ``Sub Call Budget`` prefixes (an exported
    policy says so in its metadata)."""
    try:
        if run.endswith(".npz"):
            from jaxapr import policy_io

            return bool(policy_io.exported_meta(run).get("extra", {}).get("sub_call_budget"))
        with open(os.path.join(run, "config.json")) as f:
            data_dir = json.load(f).get("data_dir", "")
        with open(os.path.join(data_dir, "apr", "manifest.json")) as f:
            return bool(json.load(f)["config"].get("sub_call_budget"))
    except (OSError, KeyError, ValueError):
        return False


class _Cache:
    """Finished conditions on disk (one JSON file each), so an interrupted evaluation resumes."""

    def __init__(self, directory: str | None, fingerprints: dict, problems_key: str, fields=()):
        self.dir, self.fp, self.problems_key = directory, fingerprints, problems_key
        self.fields = sorted(fields)  # the per-problem record fields a stored condition holds
        if directory:
            os.makedirs(directory, exist_ok=True)

    def _path(self, run: str, spec: dict) -> str | None:
        if not self.dir or self.fp.get(run) is None:
            return None
        # the condition nested under its own name: none of its fields can stand in for the
        # policy's or the problem set's (a condition's "problems" is a count, not the set); the
        # record fields too, so a condition stored before a field was added is computed again
        key = {"policy": self.fp[run], "problem_set": self.problems_key, "condition": spec, "fields": self.fields}
        key = json.dumps(key, sort_keys=True)
        return os.path.join(self.dir, hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")

    def get(self, run: str, spec: dict):
        path = self._path(run, spec)
        if path and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return None

    def put(self, run: str, spec: dict, value) -> None:
        path = self._path(run, spec)
        if path:
            with open(path + ".tmp", "w") as f:
                json.dump(value, f)
            os.replace(path + ".tmp", path)


def evaluate(runs: dict, problems, plan: Plan, *, cache_dir: str | None = None, which: str = "best", log=print) -> dict:
    """Every condition of ``plan`` for the ``runs`` that exist -> {"conditions", "comparisons",
    ...}; each condition carries its metrics (``jaxapr.evaluation.summarize``) and per-problem
    ``records``. ``which``: the checkpoint of a training work directory ("best" or "latest")."""
    import jax

    from jaxapr import evaluation, policy_io, runtime
    from jaxapr.traces import spawn_join

    plan = plan.check()
    numbers, targets = np.asarray(problems[0]), np.asarray(problems[1])
    problems_key = hashlib.sha256(numbers.tobytes() + targets.tobytes()).hexdigest()[:16]
    fields = (*evaluation.RECORD_FIELDS, *runtime.JOIN_FIELDS)
    cache = _Cache(cache_dir, {name: _fingerprint(path) for name, path in runs.items()}, problems_key, fields)
    policies = {}

    def policy(run):
        if run not in policies:
            policies[run] = policy_io.load_policy(runs[run], which=which)
        return policies[run]

    main_ctx = plan.main_context
    out = {
        "problems": len(targets),
        "contexts": sorted(int(c) for c in plan.contexts),
        "main_context": main_ctx,
        "plan": dataclasses.asdict(plan),
        "runs": dict(runs),
        "conditions": [],
    }

    def record(cond):
        out["conditions"].append(cond)
        log(
            f"  {NAMES.get(cond['run'], cond['run']):12s} {cond['analysis']:8s} {cond['mode']:8s} ctx {cond['context']:5d} "
            f"{cond['prefix'].strip():20s} {_acc(cond):26s} tokens {cond['total_tokens']:8.1f} "
            f"children {cond['children']:5.2f} ({cond['seconds']:.0f} s{', cached' if cond.get('cached') else ''})"
        )

    done = {}  # greedy conditions rolled out in this call: the same one under two analyses runs once

    def greedy(run, analysis, context, prefix="", subset=None):
        probs = (numbers, targets) if subset is None else (numbers[:subset], targets[:subset])
        spec = {"mode": MODES[run], "context": int(context), "prefix": prefix, "problems": len(probs[1])}
        key = (run, json.dumps(spec, sort_keys=True))
        hit = cache.get(run, spec)
        if hit is not None:
            hit["metrics"]["cached"] = True
        elif key in done:  # a training work directory has no store entry: reuse this call's rollout
            hit = done[key]
        else:
            metrics, records = evaluation.evaluate_rollouts(
                policy(run), probs, mode=MODES[run], max_context=context, num_slots=plan.num_slots, prefix=prefix
            )
            hit = {"metrics": metrics, "records": records}
            cache.put(run, spec, hit)
        done[key] = hit
        record(
            {"run": run, "analysis": analysis, "temperature": 0.0, **spec, **hit["metrics"], "records": hit["records"]}
        )

    for ctx in out["contexts"]:
        for run in RUNS:
            if run in runs:
                greedy(run, "context", ctx)
    sweep = plan.sweep_problems or len(targets)
    sweep = min(sweep, len(targets))
    out["sweep_problems"] = sweep
    budgeted = [run for run in ("apr", "apr_rl") if run in runs and plan.budgets and has_budgets(runs[run])]
    sampled = plan.n_max and ("sosp" in runs or "sosp_rl" in runs)
    for run in ("apr", "apr_rl"):  # no budget, on the sweep's problems: with cons@n, the matched-tokens comparison
        if run in budgeted or (run in runs and sampled):
            greedy(run, "tokens", main_ctx, subset=sweep)
    for run in ("sosp", "sosp_rl"):
        if run not in runs or not plan.n_max:
            continue
        modes = [f"{kind}@{n}" for n in range(1, plan.n_max + 1) for kind in ("pass", "cons")]
        spec = {
            "modes": modes,
            "context": main_ctx,
            "problems": sweep,
            "temperature": plan.temperature,
            "seed": plan.seed,
        }
        hit = cache.get(run, spec)
        if hit is None:
            rows = evaluation.sampled_rollouts(
                policy(run),
                (numbers[:sweep], targets[:sweep]),
                modes=modes,
                max_context=main_ctx,
                num_slots=plan.num_slots,
                temperature=plan.temperature,
                key=jax.random.key(plan.seed),
            )
            hit = {m: {"metrics": metrics, "records": records} for m, (metrics, records) in rows.items()}
            cache.put(run, spec, hit)
        else:
            for m in modes:
                hit[m]["metrics"]["cached"] = True
        for mode in modes:
            record(
                {
                    "run": run,
                    "analysis": "tokens",
                    "mode": mode,
                    "context": main_ctx,
                    "prefix": "",
                    "problems": sweep,
                    "temperature": plan.temperature,
                    "samples_drawn": plan.n_max,
                    **hit[mode]["metrics"],
                    "records": hit[mode]["records"],
                }
            )
    for run in budgeted:  # the budget sweep last: the longest, and a stopped run resumes it from the store
        for b in plan.budgets:
            greedy(run, "tokens", main_ctx, prefix=spawn_join.budget_prefix(b), subset=sweep)
    out["comparisons"] = compare(out)
    return out


def _acc(c: dict) -> str:
    from jaxapr import stats

    return stats.format_interval(c["accuracy"], c["accuracy_low"], c["accuracy_high"])


def find(result: dict, run: str, analysis: str, *, context=None, mode=None, prefix: str = "", problems=None):
    """The one condition matching, or None."""
    for c in result["conditions"]:
        if (
            c["run"] == run
            and c["analysis"] == analysis
            and (context is None or c["context"] == context)
            and (mode is None or c["mode"] == mode)
            and c["prefix"] == prefix
            and (problems is None or c["problems"] == problems)
        ):
            return c
    return None


def paired(a: dict, b: dict, field: str = "success", label: str = "") -> dict:
    """A - B on the problems both conditions evaluated (the first min(n_a, n_b)), with the
    paired-bootstrap interval; accuracies in [0, 1], other fields in their units."""
    from jaxapr import stats

    n = min(len(a["records"][field]), len(b["records"][field]))
    r = stats.paired_bootstrap(a["records"][field][:n], b["records"][field][:n])
    return {"label": label, "field": field, "a": _key(a), "b": _key(b), **r}


def _key(c: dict) -> dict:
    return {k: c[k] for k in ("run", "analysis", "mode", "context", "prefix", "problems")}


def compare(result: dict) -> list[dict]:
    """The paired comparisons the report states (see the module docstring)."""
    out = []
    for ctx in result["contexts"]:
        ctx_rows = {run: find(result, run, "context", context=ctx) for run in RUNS}
        for a, b in (("apr", "sosp"), ("apr_rl", "sosp_rl"), ("apr_rl", "apr"), ("sosp_rl", "sosp")):
            if ctx_rows[a] and ctx_rows[b]:
                out.append(paired(ctx_rows[a], ctx_rows[b], label=f"{NAMES[a]} - {NAMES[b]} at {ctx}"))
        if ctx_rows["apr_rl"] and ctx_rows["apr"]:
            out.append(
                paired(
                    ctx_rows["apr_rl"],
                    ctx_rows["apr"],
                    "children",
                    label=f"children: {NAMES['apr_rl']} - {NAMES['apr']} at {ctx}",
                )
            )
    main = result["main_context"]
    cons = [c for c in result["conditions"] if c["run"] == "sosp" and c["mode"].startswith("cons@")]
    budgets = sorted({c["prefix"] for c in result["conditions"] if c["prefix"]}, key=lambda p: int(p.split(": ")[1]))
    for run in ("apr", "apr_rl"):
        for prefix in ("", *budgets):  # each point of APR's curve against the cons@n nearest in total tokens
            apr = find(result, run, "tokens", context=main, prefix=prefix)
            if apr and cons:
                near = min(cons, key=lambda c: abs(c["total_tokens"] - apr["total_tokens"]))
                at = f" ({prefix.strip()})" if prefix else ""
                out.append(
                    paired(
                        apr,
                        near,
                        label=f"{NAMES[run]}{at} - SoS+ {near['mode']} at matched total tokens "
                        f"({apr['total_tokens']:.0f} vs {near['total_tokens']:.0f})",
                    )
                )
    if budgets:
        top = budgets[-1]
        a, b = find(result, "apr_rl", "tokens", prefix=top), find(result, "apr", "tokens", prefix=top)
        if a and b:
            out.append(paired(a, b, label=f"enforced children ({top.strip()}): {NAMES['apr_rl']} - {NAMES['apr']}"))
            out.append(paired(a, b, "children", label=f"children at {top.strip()}: {NAMES['apr_rl']} - {NAMES['apr']}"))
    return out


def without_records(result: dict) -> dict:
    """The result without per-problem records (for printing and small JSON files)."""
    return dict(result, conditions=[{k: v for k, v in c.items() if k != "records"} for c in result["conditions"]])


def rl_metrics_of(runs: dict) -> dict:
    """{run: the rows of its ``metrics.jsonl``} for the runs that are GRPO work directories
    (an exported policy or an SFT run has none): the data of the RL curves plot."""
    from jaxapr.train.metrics import read_metrics

    out = {}
    for run, path in runs.items():
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            rows = read_metrics(path)
            if any("rl/success" in r for r in rows):
                out[run] = rows
    return out


def solution_counts(numbers, targets) -> np.ndarray:
    """The exact solver's number of solving move sequences per problem (a difficulty measure)."""
    import jax

    from envs import countdown

    return np.asarray(jax.jit(jax.vmap(countdown.count_solutions))(numbers, targets))


def save(result: dict, out: str, problems, *, plots: bool = True, rl_metrics: dict | None = None) -> None:
    """An evaluation's files in ``out``: ``records.json`` (the problems with each one's solution
    count, and every condition's per-problem values), ``evaluate.json`` (the rest) and, with
    ``plots``, the PNGs (their paths in ``result["plots"]``; ``rl_metrics`` as ``plot``'s)."""
    numbers, targets = (np.asarray(a) for a in problems)
    difficulty = solution_counts(numbers, targets)
    if plots:
        result["plots"] = plot(result, out, difficulty=difficulty, rl_metrics=rl_metrics)
    with open(os.path.join(out, "records.json"), "w") as f:
        json.dump(
            {
                "problems": {
                    "numbers": numbers.tolist(),
                    "targets": targets.tolist(),
                    "solutions": difficulty.tolist(),
                },
                "conditions": [{**_key(c), "records": c["records"]} for c in result["conditions"]],
            },
            f,
        )
    with open(os.path.join(out, "evaluate.json"), "w") as f:
        json.dump(without_records(result), f, indent=2)


def spawn_decisions(policy, problems, trace_config, *, budgets=(), seed: int = 0, batch_size: int = 16) -> list[dict]:
    """How a policy decides the number of children: teacher-forced on the demonstrator's root
    calls for ``problems`` (drawn as ``gen_data`` draws them from ``trace_config``, the APR
    data's ``jaxapr.data.TraceConfig``, and ``seed``), at each point where the k-th node
    generated by an expansion (a "Current State" line) is followed by either another
    exploration or the spawn (``<Calling Sub Searches>``, whose children are then those k
    nodes). One row per (budget, k): the root calls without a budget prefix (``budget`` None),
    then for each b of ``budgets`` those whose prefix is ``Sub Call Budget: b`` (b children in
    the whole tree; other budgets are left out). Each row holds the decisions, the
    demonstrations' spawn rate there, the policy's mean probability of the spawn with its 10th
    and 90th percentiles over problems, and the share of decisions where the spawn is the
    policy's most likely token (what greedy decoding does there). A policy that only learned
    the demonstrations' beam draw matches their unconditioned rate at every k on every problem
    (a narrow spread), and greedy decoding then spawns at the first k where that rate passes
    1/2; one that reads its budget follows the budgeted rows' rates (near 1 at k = b where b
    fits one expansion), one that ignores it gives the budgeted rows its unconditioned
    probabilities. No rows when no selected root call fits the policy's context."""
    import jax

    from jaxapr import data
    from jaxapr.tokenizer import CountdownTokenizer
    from jaxapr.traces import spawn_join

    tok = CountdownTokenizer()
    spawn, explore, node, state, move = (
        tok.token_id(p)
        for p in (
            "<Calling Sub Searches>",
            "Exploring Operation: ",
            "Generated Node #",
            "Current State: ",
            "Moving to Node #",
        )
    )
    length = policy.cfg.max_len
    wanted = {int(b) for b in budgets}
    rows = []  # (token ids, decision positions, k at each, label: the demonstration spawned, budget)
    for i, (nums, target) in enumerate(zip(*problems)):
        calls, _ = data.problem_texts(nums, target, trace_config, seed, i)
        prompt, output, _ = calls[0]
        budget = spawn_join.prompt_budget(prompt)
        if budget is not None and budget not in wanted:
            continue
        ids = np.concatenate([[tok.bos_id], tok.encode(prompt + output)]).astype(np.int32)
        if len(ids) > length:
            continue
        # per position: the token that began its line, and the nodes generated since the last
        # "Current State" line (the expansion's children so far)
        index = np.arange(len(ids))
        head = np.maximum.accumulate(np.where(np.isin(ids, (node, state, explore, move)), index, 0))
        last_state = np.maximum.accumulate(np.where(ids == state, index, 0))
        nodes = np.cumsum(ids == node)
        expansion = nodes - nodes[last_state]
        at = np.flatnonzero(np.isin(ids[1:], (spawn, explore)) & (ids[head[:-1]] == node))
        rows.append((ids, at, expansion[at], ids[at + 1] == spawn, budget))
    if not rows:  # no selected root call (or none fits the context): nothing to read
        return []
    forward = jax.jit(lambda t: jax.nn.softmax(policy(t), axis=-1))
    ks, labels, p_spawn, greedy, budget_of = [], [], [], [], []
    for b in range(0, len(rows), batch_size):
        part = rows[b : b + batch_size]
        batch = np.zeros((batch_size, length), np.int32)
        for r, (ids, *_) in enumerate(part):
            batch[r, : len(ids)] = ids
        probs = np.asarray(forward(batch))
        for r, (_, at, k, label, budget) in enumerate(part):
            ks.append(k)
            labels.append(label)
            p_spawn.append(probs[r, at, spawn])
            greedy.append(probs[r, at].argmax(-1) == spawn)
            budget_of.append(np.full(len(at), -1 if budget is None else budget))
    ks, labels, p_spawn, greedy, budget_of = (np.concatenate(a) for a in (ks, labels, p_spawn, greedy, budget_of))
    out = []
    for budget, k in sorted({(int(b), int(k)) for b, k in zip(budget_of, ks)}):
        m = (budget_of == budget) & (ks == k)
        out.append(
            {
                "budget": None if budget < 0 else budget,
                "k": k,
                "decisions": int(m.sum()),
                "data_spawn_rate": float(labels[m].mean()),
                "policy_spawn_prob": float(p_spawn[m].mean()),
                "policy_spawn_p10": float(np.percentile(p_spawn[m], 10)),
                "policy_spawn_p90": float(np.percentile(p_spawn[m], 90)),
                "greedy_spawns": float(greedy[m].mean()),
            }
        )
    return out


def spawn_decisions_of(runs: dict, data_dir: str, problems, budgets=(), which: str = "best") -> dict:
    """{APR run: ``spawn_decisions`` rows} for the APR runs among ``runs``, on ``problems`` with
    the demonstrations the APR dataset's manifest describes (``<data_dir>/apr``: its traces'
    config and seed), with rows for the root calls of each of ``budgets``; ``which`` as
    :func:`evaluate`'s."""
    from jaxapr import data, policy_io

    manifest = data.load_manifest(os.path.join(data_dir, "apr"))
    trace_config = data.TraceConfig(**manifest["config"]).check()
    return {
        run: spawn_decisions(
            policy_io.load_policy(runs[run], which=which),
            problems,
            trace_config,
            budgets=budgets,
            seed=manifest["seed"],
        )
        for run in ("apr", "apr_rl")
        if run in runs
    }


def format_spawn_decisions(result: dict) -> str:
    """The ``spawn_decisions`` rows of every run in ``result["spawn_decisions"]`` as a table."""
    lines = [
        "Spawn decisions after an expansion's k-th node (teacher-forced on the demonstrations' root calls; "
        "P(spawn): the policy's mean [p10, p90] over problems; greedy: share where the spawn is its top token)",
        f"{'policy':12s} {'budget':>6s} {'k':>3s} {'decisions':>9s} {'data rate':>9s} {'P(spawn)':>9s} "
        f"{'[p10, p90]':>15s} {'greedy':>7s}",
    ]
    for run, rows in result.get("spawn_decisions", {}).items():
        if not rows:
            lines.append(f"{NAMES.get(run, run):12s} (no selected demonstration root call fits)")
        for r in rows:
            spread = "[{:.3f}, {:.3f}]".format(r["policy_spawn_p10"], r["policy_spawn_p90"])
            budget = "-" if r.get("budget") is None else str(r["budget"])
            lines.append(
                f"{NAMES.get(run, run):12s} {budget:>6s} {r['k']:3d} {r['decisions']:9d} {r['data_spawn_rate']:9.3f} "
                f"{r['policy_spawn_prob']:9.3f} {spread:>15s} {r['greedy_spawns']:7.3f}"
            )
    return "\n".join(lines)


JOIN_LOSSES = ("solved", "lost_context_full", "lost_writing_on", "lost_stopped", "no_child_solved")


def join_losses(records: dict, context: int, full: float = 0.75) -> dict:
    """Where an APR condition's problems end, from its per-problem records (with
    ``runtime.join_diagnostics``' fields) at per-call window ``context``: counts that partition
    the problems into ``solved``; lost at the join (a root child solved its sub-problem, the
    rollout failed) because the joined context took ``>= full * context`` tokens or could not
    run (``lost_context_full``), because the parent wrote on to the window's end from a shorter
    one (``lost_writing_on``), or because it stopped with a wrong or no path
    (``lost_stopped``); and failed without any child solving (``no_child_solved``). Also:
    ``overflow`` (problems whose call after a join ran out of room) and how many of them had no
    solved child (``overflow_no_child_solved``), the joined context's median and 90th
    percentile over the problems that joined, and the mean tokens the root's last call after
    the join generated in solved problems and in ``lost_writing_on`` ones. Where the records
    have ``root_spawns``: ``spawned_again`` (roots that spawned another round after a join)
    and how many of those problems were solved (``spawned_again_solved``)."""
    fields = ("success", "child_solved", "lost_at_join", "join_overflow", "join_prompt_tokens", "join_output_tokens")
    r = {k: np.asarray(records[k]) for k in fields}
    lost = r["lost_at_join"] == 1
    overflow = r["join_overflow"] == 1
    filled = (r["join_prompt_tokens"] >= full * context) | (r["join_prompt_tokens"] == 0)
    out = {
        "solved": r["success"] == 1,
        "lost_context_full": lost & overflow & filled,
        "lost_writing_on": lost & overflow & ~filled,
        "lost_stopped": lost & ~overflow,
        "no_child_solved": ~lost & (r["success"] == 0),
    }
    joined = r["join_prompt_tokens"][r["join_prompt_tokens"] > 0]

    def mean_output(mask):
        return float(r["join_output_tokens"][mask].mean()) if mask.any() else float("nan")

    result = {
        "problems": len(r["success"]),
        **{k: int(v.sum()) for k, v in out.items()},
        "overflow": int(overflow.sum()),
        "overflow_no_child_solved": int((overflow & (r["child_solved"] == 0)).sum()),
        "join_prompt_median": float(np.median(joined)) if len(joined) else float("nan"),
        "join_prompt_p90": float(np.percentile(joined, 90)) if len(joined) else float("nan"),
        "output_solved": mean_output(out["solved"]),
        "output_writing_on": mean_output(out["lost_writing_on"]),
    }
    if "root_spawns" in records:
        again = np.asarray(records["root_spawns"]) > 1
        result["spawned_again"] = int(again.sum())
        result["spawned_again_solved"] = int((again & out["solved"]).sum())
    return result


def format_join_losses(conditions, full: float = 0.75) -> str:
    """``join_losses`` (``full`` as there) of every greedy APR condition (with records) as lines
    of a table; works on ``records.json``'s conditions as on an evaluation's."""
    rows = [
        c
        for c in conditions
        if c["analysis"] == "context" and "join_prompt_tokens" in c.get("records", {})  # APR rows (not SoS+)
    ]
    if not rows:
        return ""
    lines = [
        f"Where APR problems end (counts: solved / lost at the join: joined context >= {full:g} of the window or"
        " not run, parent wrote on to the window's end, parent stopped / no child solved)"
    ]
    for c in rows:
        n = join_losses(c["records"], c["context"], full)
        lines.append(
            f"  {NAMES.get(c['run'], c['run']):12s} ctx {c['context']:5d} of {n['problems']}: solved {n['solved']}"
            f" / lost {n['lost_context_full']} context, {n['lost_writing_on']} wrote on, {n['lost_stopped']} stopped"
            f" / no child solved {n['no_child_solved']}\n  {'':12s} joined context median {n['join_prompt_median']:.0f}"
            f" p90 {n['join_prompt_p90']:.0f} tokens; after the join the root wrote {n['output_solved']:.0f} tokens"
            f" in solved problems, {n['output_writing_on']:.0f} in those it wrote on; overflow {n['overflow']}"
            f" ({n['overflow_no_child_solved']} without a solved child)"
            + (
                f"; spawned again after a join {n['spawned_again']} ({n['spawned_again_solved']} solved)"
                if "spawned_again" in n
                else ""
            )
        )
    return "\n".join(lines)


def tables(result: dict) -> str:
    from jaxapr import stats

    lines = []
    conds = result["conditions"]

    def fmt(rows, title):
        if not rows:
            return
        lines.append(f"\n{title}")
        lines.append(
            f"{'policy':12s} {'mode':8s} {'context':>7s} {'prefix':>20s} {'problems':>8s} {'accuracy [95% CI]':>24s} "
            f"{'total tok':>9s} {'+context':>9s} {'seq tok':>8s} {'latency':>8s} {'children':>8s}"
        )
        for r in rows:
            lines.append(
                f"{NAMES.get(r['run'], r['run']):12s} {r['mode']:8s} {r['context']:7d} {r['prefix'].strip():>20s} "
                f"{r['problems']:8d} {_acc(r):>24s} {r['total_tokens']:9.0f} "
                f"{r['total_tokens_with_context']:9.0f} {r['sequential_tokens']:8.0f} "
                f"{r['latency_steps']:8.0f} {r['children']:8.2f}"
            )

    fmt([r for r in conds if r["analysis"] == "context"], "Accuracy vs per-call context window (greedy)")
    fmt(
        [r for r in conds if r["analysis"] == "tokens"],
        f"Accuracy vs total tokens (first {result.get('sweep_problems', result['problems'])} problems: SoS+ pass@n / "
        "cons@n sampled, APR budgets greedy)",
    )
    comps = result.get("comparisons", [])
    if comps:
        lines.append("\nPaired comparisons (A - B over the same problems, 95% paired-bootstrap interval)")
        for c in comps:
            pct = c["field"] == "success"
            lines.append(
                f"  {c['label']:70s} {stats.format_interval(c['diff'], c['low'], c['high'], percent=pct, digits=1 if pct else 2)}"
                f"{' points' if pct else ''} (n={c['n']})"
            )
    if result.get("spawn_decisions"):
        lines.append("\n" + format_spawn_decisions(result))
    joins = [r for r in conds if "child_solved" in r and r["analysis"] == "context"]
    if joins:
        lines.append(
            "\nAPR joins (shares of problems: a root child solved its sub-problem / the rollout still failed"
            " / a call after a join ran out of room; children: all / distinct / solved; the root's last"
            " call after a join: mean prompt / output tokens)"
        )
        for r in joins:
            lines.append(
                f"  {NAMES.get(r['run'], r['run']):12s} ctx {r['context']:5d} child ok {r['child_solved']:.3f} "
                f"lost {r['lost_at_join']:.3f} overflow {r['join_overflow']:.3f} children {r['children']:.2f} "
                f"distinct {r['distinct_children']:.2f} solved {r['solved_children']:.2f}"
                + (
                    f" join prompt {r['join_prompt_tokens']:.0f} output {r['join_output_tokens']:.0f}"
                    if "join_prompt_tokens" in r  # optional: an evaluate.json written without them
                    else ""
                )
            )
        losses = format_join_losses(conds)
        if losses:
            lines.append("\n" + losses)
    return "\n".join(lines)


def _errorbars(rows):
    acc = np.array([r["accuracy"] for r in rows])
    return np.vstack([acc - [r["accuracy_low"] for r in rows], [r["accuracy_high"] for r in rows] - acc])


def plot(result: dict, out: str, difficulty=None, rl_metrics: dict | None = None) -> list[str]:
    """PNG plots into ``out``: accuracy vs context, vs total tokens (Fig. 4a), vs latency;
    children vs difficulty (``difficulty``: per-problem solution counts of the evaluated
    problems) and the RL curves (``rl_metrics``: {run: rows of its metrics.jsonl})."""
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
        for run in RUNS:
            rows = sorted((r for r in ctx_rows if r["run"] == run), key=lambda r: r["context"])
            if rows:
                ax.errorbar(
                    [r["context"] for r in rows],
                    [r["accuracy"] for r in rows],
                    yerr=_errorbars(rows),
                    fmt="o-",
                    capsize=3,
                    label=NAMES[run],
                )
        ax.set(
            xlabel="per-call context window (tokens)",
            ylabel="accuracy (95% CI)",
            ylim=(0, 1),
            title="Accuracy vs context window",
        )
        ax.legend(fontsize=8)
        save(fig, "accuracy_vs_context.png")
    tok_rows = [r for r in conds if r["analysis"] == "tokens"]
    series = [
        ("SoS+ pass@n", lambda r: r["run"] == "sosp" and r["mode"].startswith("pass@")),
        ("SoS+ cons@n", lambda r: r["run"] == "sosp" and r["mode"].startswith("cons@")),
        ("SoS+ + GRPO cons@n", lambda r: r["run"] == "sosp_rl" and r["mode"].startswith("cons@")),
        ("APR (budget b)", lambda r: r["run"] == "apr" and r["prefix"]),
        ("APR + GRPO (budget b)", lambda r: r["run"] == "apr_rl" and r["prefix"]),
        ("APR (no budget)", lambda r: r["run"] == "apr" and not r["prefix"]),
        ("APR + GRPO (no budget)", lambda r: r["run"] == "apr_rl" and not r["prefix"]),
    ]
    for x, name, label in (
        ("total_tokens", "accuracy_vs_total_tokens.png", "total tokens per problem"),
        ("latency_steps", "accuracy_vs_latency.png", "latency (critical-path decode steps)"),
    ):
        if not tok_rows:
            break
        fig, ax = plt.subplots(figsize=(6, 4))
        for label_s, pred in series:
            rows = sorted((r for r in tok_rows if pred(r)), key=lambda r: r[x])
            if rows:
                ax.errorbar(
                    [r[x] for r in rows],
                    [r["accuracy"] for r in rows],
                    yerr=_errorbars(rows),
                    fmt="o-" if len(rows) > 1 else "s",
                    capsize=2,
                    label=label_s,
                    markersize=4,
                )
                if "budget b" in label_s:
                    for r in rows:
                        ax.annotate(
                            r["prefix"].split(": ")[1].strip(),
                            (r[x], r["accuracy"]),
                            fontsize=6,
                            xytext=(3, -8),
                            textcoords="offset points",
                        )
        ax.set(
            xlabel=label,
            ylabel="accuracy (95% CI)",
            ylim=(0, 1),
            title=f"Accuracy vs {label.split(' per')[0].split(' (')[0]} ({result.get('sweep_problems')} problems)",
        )
        ax.legend(fontsize=7)
        save(fig, name)
    if difficulty is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        d = np.asarray(difficulty)
        edges = np.unique(np.quantile(d, np.linspace(0, 1, 6)))
        bins = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, len(edges) - 2)
        centers = [f"{int(edges[i])}-{int(edges[i + 1])}" for i in range(len(edges) - 1)]
        for run in ("apr", "apr_rl"):
            row = find(result, run, "context", context=result["main_context"])
            if row is None:
                continue
            ch, ok = np.asarray(row["records"]["children"]), np.asarray(row["records"]["success"])
            ax1.plot(centers, [ch[bins == i].mean() for i in range(len(centers))], "o-", label=NAMES[run])
            ax2.plot(centers, [ok[bins == i].mean() for i in range(len(centers))], "o-", label=NAMES[run])
        ax1.set(
            xlabel="solutions of the problem (quintiles; fewer = harder)",
            ylabel="children per problem",
            title="Children vs difficulty",
        )
        ax2.set(
            xlabel="solutions of the problem (quintiles)",
            ylabel="accuracy",
            ylim=(0, 1),
            title="Accuracy vs difficulty",
        )
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelsize=7)
            ax.legend(fontsize=8)
        save(fig, "children_vs_difficulty.png")
    if rl_metrics:
        # the children panel only when an APR run is plotted (serial runs spawn none)
        with_children = any(run.startswith("apr") for run in rl_metrics)
        fig, axes = plt.subplots(
            1, 2 if with_children else 1, figsize=(9 if with_children else 4.5, 3.5), squeeze=False
        )
        ax1, ax2 = axes[0, 0], (axes[0, 1] if with_children else None)
        for run, rows in rl_metrics.items():
            steps = [r["step"] for r in rows if "rl/success" in r]
            if not steps:
                continue
            (line,) = ax1.plot(
                steps, _smooth([r["rl/success"] for r in rows if "rl/success" in r]), label=f"{NAMES[run]} (rollouts)"
            )
            color = line.get_color()  # a run's rollouts and validation in one colour
            val = [r for r in rows if "val/accuracy" in r]
            if val:
                ax1.errorbar(
                    [r["step"] for r in val],
                    [r["val/accuracy"] for r in val],
                    _errorbars(
                        [{k: r[f"val/{k}"] for k in ("accuracy", "accuracy_low", "accuracy_high")} for r in val]
                    ),
                    fmt="s--",
                    capsize=3,
                    color=color,
                    label=f"{NAMES[run]} (val, greedy, 95% CI)",
                )
            if run.startswith("apr"):
                ax2.plot(
                    steps,
                    _smooth([r["rl/children_per_problem"] for r in rows if "rl/success" in r]),
                    color=color,
                    label=f"{NAMES[run]} (rollouts)",
                )
                if val and "val/children" in val[0]:
                    ax2.plot(
                        [r["step"] for r in val],
                        [r["val/children"] for r in val],
                        "s--",
                        color=color,
                        label=f"{NAMES[run]} (val)",
                    )
        ax1.set(xlabel="GRPO step", ylabel="success", ylim=(0, 1), title="GRPO: success")
        ax1.legend(fontsize=7)
        if ax2 is not None:
            ax2.set(xlabel="GRPO step", ylabel="children per problem", title="GRPO: children")
            ax2.legend(fontsize=7)
        save(fig, "rl_curves.png")
    return files


def _smooth(values, k: int = 5):
    v = np.asarray(values, float)
    if len(v) < k:
        return v
    return np.convolve(np.pad(v, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, mode="valid")
