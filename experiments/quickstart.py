r"""The main job, CPU-sized.

    python -m experiments.quickstart [--workdir=/tmp/jaxapr_quickstart] [--num_envs=4096]

Today it is a tour of the Countdown environment, the foundation everything else stands
on: it draws paper-distribution problems, plays them with a random legal policy and with
the exhaustive solver inside ``Countdown-v0`` (jit + vmap + lax.scan), prints a table and
writes JSON into a work directory. The APR pipeline (SoS+/APR demonstrations, SFT, GRPO,
APR vs SoS+ evaluation) replaces this tour as those parts land.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/jaxapr_quickstart", "Where results are written.")
flags.DEFINE_integer("num_envs", 4096, "Environments played in parallel.")
flags.DEFINE_integer("num_numbers", 4, "Numbers per problem (2..6).")
flags.DEFINE_integer("seed", 0, "Random seed.")


def play(env, params, key, num_envs, policy):
    """Plays one episode in each of ``num_envs`` envs; returns (solved fraction, steps/s)."""
    import jax
    import jax.numpy as jnp

    from envs import countdown

    n = env.num_numbers

    def run(key):
        k0, k1 = jax.random.split(key)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k0, num_envs), params)
        solvable, plan = jax.vmap(countdown.solve)(state.numbers, state.target)

        def body(carry, inputs):
            state, mask, done, solved = carry
            t, key = inputs
            k_act, k_step = jax.random.split(key)
            if policy == "solver":
                action = plan[:, t]
            else:
                logits = jnp.where(mask, 0.0, -jnp.inf)
                action = jax.random.categorical(k_act, logits).astype(jnp.int32)
            step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
            _, state, reward, term, _, info = step(jax.random.split(k_step, num_envs), state, action, params)
            solved = solved | (~done & (reward > 0))
            return (state, info["action_mask"], done | term, solved), None

        mask = jax.vmap(env.action_mask, in_axes=(0, None))(state, params)
        init = (state, mask, jnp.zeros(num_envs, bool), jnp.zeros(num_envs, bool))
        (_, _, _, solved), _ = jax.lax.scan(body, init, (jnp.arange(n - 1), jax.random.split(k1, n - 1)))
        return solved.mean(), solvable.mean()

    run = jax.jit(run)
    run(key)[0].block_until_ready()
    t0 = time.perf_counter()
    solved, solvable = run(key)
    solved = float(solved)
    dt = time.perf_counter() - t0
    return solved, float(solvable), num_envs * (n - 1) / dt


def main(argv):
    del argv
    import jax

    import envs
    from envs import countdown

    t_start = time.time()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    print(f"jaxapr quickstart on {jax.default_backend()} ({jax.device_count()} device(s))")
    print("APR's pipeline (demonstrations, SFT, GRPO, APR vs SoS+) is not built yet; this run is "
          "a tour of the Countdown environment it stands on.\n")
    env, params = envs.make("Countdown-v0", num_numbers=FLAGS.num_numbers)
    key = jax.random.PRNGKey(FLAGS.seed)
    t0 = time.perf_counter()
    numbers, targets = countdown.generate_problems(key, 100_000, FLAGS.num_numbers)
    gen_s = time.perf_counter() - t0
    print(f"generated 100,000 solvable problems in {gen_s:.2f} s (incl. compile); e.g. "
          f"{numbers[0].tolist()} -> {int(targets[0])}")
    rows = []
    for policy in ("random", "solver"):
        solved, solvable, sps = play(env, params, key, FLAGS.num_envs, policy)
        rows.append({"policy": policy, "solved": solved, "solvable": solvable, "env_steps_per_s": sps})
    print(f"\n{'policy':<8} {'solved':>8} {'env steps/s':>14}")
    for r in rows:
        print(f"{r['policy']:<8} {r['solved']:>8.1%} {r['env_steps_per_s']:>14,.0f}")
    out = {
        "num_numbers": FLAGS.num_numbers,
        "num_envs": FLAGS.num_envs,
        "seed": FLAGS.seed,
        "generate_100k_s": gen_s,
        "policies": rows,
        "wall_s": time.time() - t_start,
    }
    path = os.path.join(FLAGS.workdir, "quickstart.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nresults written to {path} (wall time {out['wall_s']:.1f} s)")


if __name__ == "__main__":
    app.run(main)
