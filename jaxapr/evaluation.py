"""Held-out evaluation: roll problems out, reduce the rollouts to the metrics jaxapr reports.

The metrics, defined here once (docs/metrics.md explains them; the APR paper's definitions):

- ``accuracy``: the share of problems whose root thread's final call verifies
  (``traces.verify``), with its 95% Wilson interval (``accuracy_low``, ``accuracy_high``).
- ``total_tokens``: every token every thread decoded (all calls of all threads).
- ``total_tokens_with_context``: ``total_tokens`` plus every call's prompt (the root prompt,
  the children's two-line prompts and the join contexts the runtime writes): every token a
  forward pass processed, prefilled or decoded.
- ``sequential_tokens``: the longest causal chain of decoded tokens, children in parallel (a
  thread's own tokens plus, per spawn, its longest child's, recursively).
- ``latency_steps``: the decode steps of that critical path (a call of n tokens runs n - 1
  decode steps after its prefill): a property of the rollout's tree, the same whatever the
  engine's slot count or queue.
- ``children``: child threads per problem; for APR also ``runtime.join_diagnostics``.
- ``seconds``: wall time of the whole batched evaluation; ``seconds_per_problem`` divides it
  by the problems (the engine runs them together, so this is a throughput, not a latency).

Token and children figures are means over problems; sampled modes (``pass@n``, ``cons@n``)
count all n samples' tokens and the longest sample's chain. ``problem_records`` keeps the
per-problem values, from which ``jaxapr.stats.paired_bootstrap`` compares two conditions
evaluated on the same problems.

With several processes each process rolls out every P-th problem on its own engine; records
are gathered in problem order, so every figure is over all problems.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxapr import distributed, stats

RECORD_FIELDS = (
    "success",
    "total_tokens",
    "total_tokens_with_context",
    "sequential_tokens",
    "latency_steps",
    "children",
)


def problem_records(results, joins: bool = False) -> dict[str, list]:
    """Per-problem values of every metric (lists in problem order); with ``joins`` (APR) also
    ``runtime.join_diagnostics``'s fields."""
    from jaxapr import runtime

    rec = {
        "success": [int(r.success) for r in results],
        "total_tokens": [int(r.total_tokens) for r in results],
        "total_tokens_with_context": [int(r.total_tokens + r.prompt_tokens) for r in results],
        "sequential_tokens": [int(r.sequential_tokens) for r in results],
        "latency_steps": [int(r.latency_steps) for r in results],
        "children": [int(r.num_children) for r in results],
    }
    if joins:
        diags = [runtime.join_diagnostics(r) for r in results]
        rec.update({k: [int(d[k]) for d in diags] for k in runtime.JOIN_FIELDS})
    return rec


def summarize(records: dict, seconds: float) -> dict:
    """Scalar metrics from per-problem records: accuracy with its Wilson interval, the other
    fields' means, the wall time."""
    n = len(records["success"])
    if n == 0:
        raise ValueError("no problems were evaluated: expected at least one")
    solved = int(np.sum(records["success"]))
    low, high = stats.wilson_interval(solved, n)
    out = {"accuracy": solved / n, "accuracy_low": low, "accuracy_high": high, "problems": n}
    out.update({k: float(np.mean(v)) for k, v in records.items() if k != "success"})
    out.update(seconds=float(seconds), seconds_per_problem=float(seconds) / n)
    return out


def _local_rollouts(policy, problems, *, mode, max_context, num_slots, prefix, temperature, key, engine):
    """This process's share of ``problems`` (every P-th) -> (its problem indices, results, wall s)."""
    from jaxapr import runtime

    t0 = time.perf_counter()
    numbers, targets = np.asarray(problems[0]), np.asarray(problems[1])
    p, n = jax.process_index(), jax.process_count()
    ids = np.arange(len(targets))[p::n]  # keys from global indices: samples do not depend on n
    results = []
    if len(ids):
        results = runtime.rollout(
            policy,
            (numbers[ids], targets[ids]),
            mode=mode,
            max_context=max_context,
            num_slots=num_slots,
            engine=engine,
            temperature=temperature,
            key=key,
            prefix=prefix,
            problem_ids=ids,
        )
    return ids, results, time.perf_counter() - t0


def _gather(ids: np.ndarray, records: dict, seconds: float) -> tuple[dict, float]:
    """Every process's records in global problem order, and the slowest process's time."""
    if jax.process_count() == 1:
        return records, seconds
    parts = distributed.allgather_json({"ids": [int(i) for i in ids], "records": records})
    order = np.argsort(np.concatenate([np.asarray(p["ids"], np.int64) for p in parts]), kind="stable")
    merged = {k: np.concatenate([np.asarray(p["records"][k]) for p in parts])[order].tolist() for k in records}
    return merged, distributed.max_across(seconds)


def evaluate_rollouts(
    policy,
    problems,
    *,
    mode: str,
    max_context: int,
    num_slots: int,
    prefix: str = "",
    temperature: float = 0.0,
    key=None,
    engine=None,
    results: list | None = None,
) -> tuple[dict, dict]:
    """Roll ``problems`` = (numbers, targets) out in ``mode`` -> (metrics, records): the
    scalar metrics of ``summarize`` and the per-problem records. Every process must call it
    (a collective with several processes). ``results``: a list that receives this process's
    ``runtime.RolloutResult``s (every P-th problem; all of them with one process), for a caller
    that shows a rollout without running it again."""
    ids, local, seconds = _local_rollouts(
        policy,
        problems,
        mode=mode,
        max_context=max_context,
        num_slots=num_slots,
        prefix=prefix,
        temperature=temperature,
        key=key,
        engine=engine,
    )
    if results is not None:
        results.extend(local)
    records, seconds = _gather(ids, problem_records(local, joins=mode == "apr"), seconds)
    return summarize(records, seconds), records


def rollout_metrics(policy, problems, **kw) -> dict:
    """The scalar metrics of ``evaluate_rollouts`` (for training logs)."""
    return evaluate_rollouts(policy, problems, **kw)[0]


def sampled_rollouts(
    policy, problems, *, modes, max_context: int, num_slots: int, temperature: float, key, prefix: str = "", engine=None
) -> dict:
    """{mode: (metrics, records)} for sampled serial modes (``pass@k``, ``cons@k``,
    ``best-of-k``) from ONE rollout of n = the largest k samples per problem: each mode is
    judged on the first k samples (``runtime.first_samples``), so the modes share samples and
    cost one rollout; ``seconds`` is that rollout's wall time in every mode's metrics."""
    from jaxapr import runtime

    modes = list(modes)
    ks = [runtime.parse_mode(m) for m in modes]
    bad = [m for m, (kind, _) in zip(modes, ks) if kind not in ("pass", "cons", "best")]
    if not modes or bad:
        raise ValueError(f"modes={modes!r}: expected sampled modes 'pass@k', 'cons@k' or 'best-of-k'")
    n = max(k for _, k in ks)
    ids, results, seconds = _local_rollouts(
        policy,
        problems,
        mode=f"pass@{n}",
        max_context=max_context,
        num_slots=num_slots,
        prefix=prefix,
        temperature=temperature,
        key=key,
        engine=engine,
    )
    out = {}
    for m in modes:
        records, wall = _gather(ids, problem_records([runtime.first_samples(r, m) for r in results]), seconds)
        out[m] = (summarize(records, wall), records)
    return out


def sampled_metrics(policy, problems, **kw) -> dict:
    """{mode: scalar metrics} of ``sampled_rollouts``."""
    return {m: metrics for m, (metrics, _) in sampled_rollouts(policy, problems, **kw).items()}
