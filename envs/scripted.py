"""Scripted reference policies for ``ParallelSearch-v0`` (and examples of its API).

A policy is a pure, jittable function ``policy(obs, avail) -> actions`` of the per-agent
observation and availability dicts (``env.get_obs(state)``, ``env.get_avail_actions(state)``):
it reads only what an agent may see, never the state. Both policies below take the first
available action in a fixed priority order, which the masks make well defined:

- ``serial_dfs``: depth-first search in ``thread_0`` alone. Take the lowest untried legal
  move (the mask only offers untried ones), else BACKTRACK, else RETURN, else NOOP; never
  SPAWN. Moves are tried in action order, which is the canonical order of
  ``countdown.solve``, so it reaches the same first solution as ``solve`` (and the same
  verdict as replaying ``solve``'s moves in ``Countdown-v0``), after the same number of
  moves and backtracks as a plain-Python depth-first search.
- ``fork_at_root``: ``thread_0`` SPAWNs at the root whenever it can (the root's children
  go to the idle threads, in waves of at most K - 1 when there are more children than idle
  threads); everyone else runs ``serial_dfs`` in its own subtree and RETURNs once that
  subtree is exhausted. Fewer ticks (the subtrees are searched side by side), more
  thread-steps (each wave's join waits for its slowest child).

``evaluate(env, params, policy)`` plays one episode per bank problem to its end and returns
the per-problem totals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Offsets from the end of an observation (see envs/parallel_search.py).
_IS_ROOT_THREAD, _DEPTH = -6, -3


def _first(mask: jax.Array) -> jax.Array:
    return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def _dfs_action(avail: jax.Array) -> jax.Array:
    """First available of: moves (in action order), BACKTRACK, RETURN, NOOP."""
    spawn = avail.shape[-1] - 3
    return _first(avail & (jnp.arange(avail.shape[-1]) != spawn))


def serial_dfs(obs: dict, avail: dict) -> dict:
    """Depth-first search, no spawns; see the module docstring."""
    del obs
    return {agent: _dfs_action(m) for agent, m in avail.items()}


def fork_at_root(obs: dict, avail: dict) -> dict:
    """``thread_0`` spawns the root's children; each child searches depth-first."""
    actions = {}
    for agent, m in avail.items():
        spawn = m.shape[-1] - 3
        at_root = (obs[agent][..., _IS_ROOT_THREAD] == 1) & (obs[agent][..., _DEPTH] == 0)
        actions[agent] = jnp.where(at_root & m[..., spawn], spawn, _dfs_action(m)).astype(jnp.int32)
    return actions


def evaluate(env, params, policy, indices=None) -> dict:
    """Plays ``policy`` once on each bank problem (or on ``indices``) until the episode ends.

    Returns {"success", "truncated", "ticks", "thread_steps", "threads_used", "children",
    "return"}, each an array over the problems. Jittable (wrap with ``jax.jit`` and pass
    ``env``/``policy`` statically, e.g. through ``functools.partial``).
    """
    if indices is None:
        indices = jnp.arange(params.targets.shape[0], dtype=jnp.int32)

    def one(index):
        obs, state = env.reset_to(index, params)

        def step(obs, state):
            actions = policy(obs, env.get_avail_actions(state))
            return env.step_env(jax.random.PRNGKey(0), state, actions, params)

        # The loop's info starts as zeros of exactly what step_env returns (whatever its keys).
        info0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(step, obs, state)[4])

        def body(carry):
            obs, state, _, ret, _ = carry
            obs, state, rewards, dones, info = step(obs, state)
            return obs, state, dones["__all__"], ret + rewards[env.agents[0]], info

        carry = (obs, state, jnp.zeros((), bool), jnp.float32(0), info0)
        _, _, _, ret, info = jax.lax.while_loop(lambda c: ~c[2], body, carry)
        out = {k: info[k] for k in ("success", "truncated", "ticks", "thread_steps", "threads_used", "children")}
        out["return"] = ret
        return out

    return jax.vmap(one)(jnp.asarray(indices, jnp.int32))
