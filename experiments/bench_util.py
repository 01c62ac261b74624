"""Timing and table helpers shared by the benchmark modules (no flags: ``experiments/bench.py``
is ``__main__`` when it runs, so the suites import these from here, not from it)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` (which must block on its result) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall times of several blocking callables, timed in turn (A, B, A, B, ...) after
    one warm-up call each, so that a baseline and its competitor see the same machine."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def quickstart_stages(out: dict) -> dict:
    """{stage: {"seconds", "tokens_per_s"}} of a quickstart.json: its stage timers, and for the
    evaluation stages the decoded tokens per second of wall time."""
    rows = out.get("rows", [])
    tokens = {
        "evaluate": sum(r["total_tokens"] * r["problems"] for r in rows if r["run"] in ("sosp", "apr")),
        "grpo_evaluate": sum(r["total_tokens"] * r["problems"] for r in rows if r["run"] == "apr_rl"),
    }
    stages = {}
    for name, seconds in out.get("times", {}).items():
        row = {"seconds": float(seconds)}
        if tokens.get(name):
            row["tokens_per_s"] = tokens[name] / max(float(seconds), 1e-9)
        stages[name] = row
    return stages
