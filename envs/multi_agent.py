"""The multi-agent environment base: JaxMARL's ``MultiAgentEnv`` API with built-in auto-reset.

Agents are named by strings (``env.agents``); observations, actions, rewards and dones are
dicts keyed by agent name, and ``dones["__all__"]`` ends the episode for everyone:

    obs, state = env.reset(key)                                        # params optional
    obs, state, rewards, dones, infos = env.step(key, state, actions)  # auto-reset
    env.get_avail_actions(state)                                       # {agent: bool[A_agent]}
    env.observation_space(agent), env.action_space(agent)

As in gymnax (and unlike JaxMARL's own base, which keeps parameters on the object), the
parameters are an explicit pytree: ``reset(key, params)`` / ``step(key, state, actions,
params)``; ``params=None`` uses ``env.default_params``, so JaxMARL-style three-argument calls
work unchanged. A subclass implements ``reset_env``/``step_env`` (one episode, no reset),
``get_obs``, ``get_avail_actions``, the spaces and ``default_params``. When
``dones["__all__"]`` is true the returned ``obs``/``state`` already belong to the next
episode, while ``rewards``, ``dones`` and ``infos`` describe the tick that ended the old one.
Everything is pure and works under ``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import jax

TState = TypeVar("TState")
TParams = TypeVar("TParams")


class MultiAgentEnv(Generic[TState, TParams]):
    """Base class; see the module docstring."""

    def __init__(self, agents: Sequence[str]):
        agents = list(agents)
        if not agents or len(set(agents)) != len(agents) or not all(isinstance(a, str) and a for a in agents):
            raise ValueError(f"agents={agents!r}: expected distinct non-empty agent names")
        if "__all__" in agents:
            raise ValueError("agents: '__all__' is reserved for dones['__all__']")
        self.agents: list[str] = agents
        self.num_agents: int = len(agents)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def default_params(self) -> TParams:
        raise NotImplementedError

    @property
    def agent_classes(self) -> dict[str, list[str]]:
        """Groups of agents that share a role (JaxMARL's convention); one group by default."""
        return {self.name: list(self.agents)}

    def observation_space(self, agent: str):
        raise NotImplementedError

    def action_space(self, agent: str):
        raise NotImplementedError

    def reset_env(self, key: jax.Array, params: TParams) -> tuple[dict, TState]:
        raise NotImplementedError

    def step_env(self, key: jax.Array, state: TState, actions: dict, params: TParams):
        """One tick without auto-reset -> (obs, state, rewards, dones, infos)."""
        raise NotImplementedError

    def get_obs(self, state: TState, params: TParams | None = None) -> dict:
        raise NotImplementedError

    def get_avail_actions(self, state: TState, params: TParams | None = None) -> dict:
        """{agent: bool[A_agent]}: the actions each agent may take at ``state``."""
        raise NotImplementedError

    def check_actions(self, actions: Any) -> None:
        """Checks the action dict's keys (static, so this also runs under jit)."""
        if not isinstance(actions, dict):
            raise ValueError(f"actions has type {type(actions).__name__}: expected a dict keyed by agent name")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"actions lacks agents {missing}: expected one action for each of {self.agents}")

    def reset(self, key: jax.Array, params: TParams | None = None) -> tuple[dict, TState]:
        params = self.default_params if params is None else params
        return self.reset_env(key, params)

    def step(self, key: jax.Array, state: TState, actions: dict, params: TParams | None = None):
        params = self.default_params if params is None else params
        self.check_actions(actions)
        key_step, key_reset = jax.random.split(key)
        obs_st, state_st, rewards, dones, infos = self.step_env(key_step, state, actions, params)
        obs_re, state_re = self.reset_env(key_reset, params)
        done = dones["__all__"]
        state = jax.tree.map(lambda r, s: jax.lax.select(done, r, s), state_re, state_st)
        obs = jax.tree.map(lambda r, s: jax.lax.select(done, r, s), obs_re, obs_st)
        return obs, state, rewards, dones, infos
