"""Vectorised environments in pure JAX (importable without jaxapr).

    import envs
    env, params = envs.make("Countdown-v0", num_numbers=4)
    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

    env, params = envs.make("ParallelSearch-v0", num_threads=4)    # multi-agent (JaxMARL API)
    obs, state = env.reset(key, params)                             # params optional, as in JaxMARL
    obs, state, rewards, dones, infos = env.step(key, state, actions, params)

``envs.make(id, **kwargs)`` returns ``(env, default_params)`` for every id in
``envs.registered_envs()``. Both kinds report ``terminated`` and ``truncated`` in their info
dict as gymnax 1.0 does (the episode reached a terminal state / was cut short by a limit).

Adapters for gymnax's and JaxMARL's own wrappers: ``envs.compat`` (extra ``compat``).
"""

from envs import compat, countdown, multi_agent, parallel_search, scripted, spaces
from envs.environment import Environment
from envs.multi_agent import MultiAgentEnv
from envs.parallel_search import ParallelSearch
from envs.registry import make, register, registered_envs

register("Countdown-v0", countdown.Countdown)
register("ParallelSearch-v0", ParallelSearch)

__all__ = [
    "Environment",
    "MultiAgentEnv",
    "ParallelSearch",
    "compat",
    "countdown",
    "make",
    "multi_agent",
    "parallel_search",
    "register",
    "registered_envs",
    "scripted",
    "spaces",
]
__version__ = "0.1.0"
