"""Adapters that let the peers' own wrappers and training loops run ``envs`` environments.

    from envs import compat
    genv = compat.to_gymnax(envs.make("Countdown-v0")[0])        # a gymnax Environment
    genv = gymnax.wrappers.LogWrapper(gymnax.wrappers.FlattenObservationWrapper(genv))
    menv = compat.to_jaxmarl(envs.make("ParallelSearch-v0")[0])  # a jaxmarl MultiAgentEnv
    menv = jaxmarl.wrappers.baselines.LogWrapper(menv)

Needs the optional extra ``compat`` (gymnax, jaxmarl); both are imported only when an
adapter is built, so ``import envs`` works without them.

- ``to_gymnax(env, params=None)``: a subclass of gymnax's ``Environment`` whose ``reset``/
  ``step`` are the wrapped env's (same 6-tuple, auto-reset and ``info["final_observation"]``),
  with gymnax spaces (so ``FlattenObservationWrapper``'s Box check passes).
- ``to_jaxmarl(env, params=None)``: a subclass of JaxMARL's ``MultiAgentEnv`` with the
  wrapped env's agents and JaxMARL spaces; ``reset(key)``, ``step(key, state, actions,
  reset_state=None)`` (JaxMARL's own auto-reset), ``get_obs``, ``get_avail_actions``. Every
  info entry is broadcast to shape ``[num_agents]``, as JaxMARL's IPPO loops reshape infos
  per actor. The parameters are fixed at construction (JaxMARL keeps them on the object).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from envs import spaces


def _convert_space(space, mod):
    """An ``envs.spaces`` space as the same space of a peer's ``spaces`` module."""
    if isinstance(space, spaces.Discrete):
        return mod.Discrete(space.n)
    if isinstance(space, spaces.Box):
        return mod.Box(space.low, space.high, space.shape, space.dtype)
    if isinstance(space, spaces.Dict):
        return mod.Dict({k: _convert_space(v, mod) for k, v in space.spaces.items()})
    raise ValueError(f"space {space!r} has no counterpart: expected Discrete, Box or Dict")


@functools.cache
def _gymnax_class():
    try:
        from gymnax.environments import environment
        from gymnax.environments import spaces as gspaces
    except ImportError as e:
        raise ImportError(f"envs.compat.to_gymnax needs gymnax: pip install 'jaxapr[compat]' ({e})") from None

    class GymnaxEnv(environment.Environment):
        """An ``envs`` single-agent environment seen as a gymnax ``Environment``."""

        def __init__(self, env, params=None):
            super().__init__()
            self._env = env
            self._params = env.default_params if params is None else params

        @property
        def default_params(self):
            return self._params

        @property
        def name(self) -> str:
            return self._env.name

        @property
        def num_actions(self) -> int:
            return self._env.num_actions

        def observation_space(self, params=None):
            return _convert_space(self._env.observation_space(params), gspaces)

        def action_space(self, params=None):
            return _convert_space(self._env.action_space(params), gspaces)

        def action_mask(self, state, params=None):
            return self._env.action_mask(state, self._params if params is None else params)

        def reset(self, key, params=None):
            return self._env.reset(key, self._params if params is None else params)

        def step(self, key, state, action, params=None):
            return self._env.step(key, state, action, self._params if params is None else params)

        def reset_env(self, key, params):
            return self._env.reset_env(key, params)

        def step_env(self, key, state, action, params):
            # gymnax 1.0's step_env returns (obs, state, reward, terminated, info); the time limit
            # is its step's is_truncated, so truncation rides in info here.
            obs, state, reward, terminated, truncated, info = self._env.step_env(key, state, action, params)
            return obs, state, reward, terminated, {**info, "terminated": terminated, "truncated": truncated}

    return GymnaxEnv


@functools.cache
def _jaxmarl_class():
    try:
        from jaxmarl.environments import spaces as mspaces
        from jaxmarl.environments.multi_agent_env import MultiAgentEnv
    except ImportError as e:
        raise ImportError(f"envs.compat.to_jaxmarl needs jaxmarl: pip install 'jaxapr[compat]' ({e})") from None

    class JaxMARLEnv(MultiAgentEnv):
        """An ``envs`` multi-agent environment seen as a JaxMARL ``MultiAgentEnv``."""

        def __init__(self, env, params=None):
            super().__init__(num_agents=env.num_agents)
            self._env = env
            self._params = env.default_params if params is None else params
            self.agents = list(env.agents)
            self.observation_spaces = {a: _convert_space(env.observation_space(a), mspaces) for a in self.agents}
            self.action_spaces = {a: _convert_space(env.action_space(a), mspaces) for a in self.agents}

        @property
        def name(self) -> str:
            return self._env.name

        @property
        def params(self):
            return self._params

        @property
        def agent_classes(self) -> dict:
            return self._env.agent_classes

        def reset(self, key):
            return self._env.reset_env(key, self._params)

        def step_env(self, key, state, actions):
            obs, state, rewards, dones, infos = self._env.step_env(key, state, actions, self._params)
            infos = {k: jnp.broadcast_to(v, (self.num_agents,) + jnp.shape(v)) for k, v in infos.items()}
            return obs, state, rewards, dones, infos

        def get_obs(self, state):
            return self._env.get_obs(state, self._params)

        def get_avail_actions(self, state):
            return self._env.get_avail_actions(state, self._params)

    return JaxMARLEnv


def to_gymnax(env, params=None):
    """A gymnax ``Environment`` for a single-agent ``envs`` environment (default params
    ``params`` or the env's own)."""
    from envs.environment import Environment

    if not isinstance(env, Environment):
        raise ValueError(
            f"to_gymnax(env={env!r}): expected a single-agent envs.Environment (use to_jaxmarl for multi-agent)"
        )
    return _gymnax_class()(env, params)


def to_jaxmarl(env, params=None):
    """A JaxMARL ``MultiAgentEnv`` for a multi-agent ``envs`` environment, with ``params`` (or
    the env's defaults) fixed."""
    from envs.multi_agent import MultiAgentEnv

    if not isinstance(env, MultiAgentEnv):
        raise ValueError(f"to_jaxmarl(env={env!r}): expected an envs.MultiAgentEnv (use to_gymnax for single-agent)")
    return _jaxmarl_class()(env, params)
