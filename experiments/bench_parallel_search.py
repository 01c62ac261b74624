"""ParallelSearch-v0 benchmarks (for ``experiments/bench.py --suite=env``).

    python -m experiments.bench_parallel_search [--quick]

1. Throughput: env steps (ticks) per second at batch 1 .. 16,384, random masked actions for
   every agent, a ``lax.scan`` of vmapped ``env.step`` (auto-reset included), K = 4 threads,
   N = 4 numbers. Compiled first, timed on later calls, median of ``repeats``.
2. Scripted policies on the first P problems of the default (paper-distribution) bank:
   serial depth-first search in ``thread_0`` versus fork-at-root with K threads
   (``envs.scripted``): success rate, mean ticks (latency), mean thread-steps (compute).
"""

from __future__ import annotations

import sys

from experiments.bench_util import median_time


def _random_masked(key, avail):
    """Uniform over available actions (avail bool[B, K, A]) with one random word per agent:
    r in [0, #available), then the r-th available action by a running count (cheap on CPU)."""
    import jax
    import jax.numpy as jnp

    m = avail.astype(jnp.int32)
    r = jnp.floor(jax.random.uniform(key, m.shape[:-1]) * m.sum(-1)).astype(jnp.int32)
    seen = jnp.zeros(m.shape[:-1], jnp.int32)
    action = jnp.zeros(m.shape[:-1], jnp.int32)
    for a in range(m.shape[-1]):
        seen = seen + m[..., a]
        action = action + (seen <= r)
    return action


def _scan_steps(env, params, batch: int, steps: int):
    import jax
    import jax.numpy as jnp

    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    avail_fn = jax.vmap(env.get_avail_actions, in_axes=(0, None))

    def run(key):
        k0, k1 = jax.random.split(key)
        _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k0, batch), params)

        def body(state, key):
            k_act, k_step = jax.random.split(key)
            avail = avail_fn(state, params)
            act = _random_masked(k_act, jnp.stack([avail[a] for a in env.agents], axis=1))
            actions = {a: act[:, i] for i, a in enumerate(env.agents)}
            _, state, _rewards, dones, _ = step(jax.random.split(k_step, batch), state, actions, params)
            return state, dones["__all__"].sum()

        _, episodes = jax.lax.scan(body, state, jax.random.split(k1, steps))
        return episodes.sum()

    return jax.jit(run)


def run(quick: bool, repeats: int) -> tuple[dict, list[dict]]:
    """(results, table rows). Rows: one per batch size (steps/s), then one per policy."""
    import jax
    import numpy as np

    import envs
    from envs import parallel_search, scripted

    results: dict = {"steps_per_s": {}, "scripted": []}
    rows: list[dict] = []
    k, n = 4, 4
    env, params = envs.make("ParallelSearch-v0", num_threads=k, num_numbers=n)
    batches = [1, 256] if quick else [1, 16, 256, 4096, 16384]
    for batch in batches:
        steps = 32 if quick else max(32, min(2048, 2**20 // batch))
        fn = _scan_steps(env, params, batch, steps)
        t = median_time(lambda: fn(jax.random.PRNGKey(0)).block_until_ready(), max(1, repeats))
        results["steps_per_s"][batch] = batch * steps / t
        rows.append(
            {
                "table": "throughput",
                "batch": batch,
                "K": k,
                "env steps/s": batch * steps / t,
                "agent steps/s": batch * steps * k / t,
            }
        )

    num_problems = 200 if quick else 1000
    bank = envs.make("ParallelSearch-v0", num_numbers=n)[1]
    configs = [("serial_dfs", 1)] + [("fork_at_root", kk) for kk in ((8, 25) if quick else (4, 8, 16, 25))]
    for policy_name, kk in configs:
        env_k = parallel_search.ParallelSearch(num_threads=kk, num_numbers=n)
        p = parallel_search.make_params(bank.numbers[:num_problems], bank.targets[:num_problems])
        policy = getattr(scripted, policy_name)
        out = jax.jit(lambda p, env_k=env_k, policy=policy: scripted.evaluate(env_k, p, policy))(p)
        out = {key: np.asarray(v) for key, v in out.items()}
        row = {
            "table": "scripted",
            "policy": policy_name,
            "K": kk,
            "problems": num_problems,
            "success": float(out["success"].mean()),
            "mean ticks": float(out["ticks"].mean()),
            "median ticks": float(np.median(out["ticks"])),
            "mean thread-steps": float(out["thread_steps"].mean()),
            "mean threads used": float(out["threads_used"].mean()),
        }
        results["scripted"].append(row)
        rows.append(row)
    serial = results["scripted"][0]
    for row in results["scripted"][1:]:
        row["ticks vs serial"] = row["mean ticks"] / serial["mean ticks"]
        row["thread-steps vs serial"] = row["mean thread-steps"] / serial["mean thread-steps"]
    return results, rows


def _print(rows: list[dict]) -> None:
    for table, cols in (
        ("throughput", ["batch", "K", "env steps/s", "agent steps/s"]),
        (
            "scripted",
            [
                "policy",
                "K",
                "problems",
                "success",
                "mean ticks",
                "median ticks",
                "mean thread-steps",
                "mean threads used",
                "ticks vs serial",
                "thread-steps vs serial",
            ],
        ),
    ):
        sel = [r for r in rows if r["table"] == table]
        print("\n" + " | ".join(cols))
        for r in sel:
            print(
                " | ".join(
                    (
                        f"{r[c]:,.0f}"
                        if isinstance(r.get(c), float) and r[c] > 100
                        else f"{r[c]:.3f}"
                        if isinstance(r.get(c), float)
                        else str(r.get(c, ""))
                    )
                    for c in cols
                )
            )


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    _, table = run(quick, 1 if quick else 5)
    _print(table)
