"""The single-agent environment base: gymnax-style pure functions with built-in auto-reset.

A subclass implements ``reset_env`` and ``step_env`` (one episode, no reset) plus spaces and
``default_params``; ``reset``/``step`` add default params and the automatic reset:

    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

When an episode ends the returned ``obs``/``state`` already belong to the next episode;
``info["final_observation"]`` is the observation the ended episode finished on. As in gymnax
1.0, ``info["terminated"]`` and ``info["truncated"]`` repeat the two flags (the episode ended in
a terminal state / was cut short by a limit; ``done = terminated | truncated``), so wrappers that
pass only ``info`` along keep them; ``info["action_mask"]`` is the legal actions at the returned
state.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp

TState = TypeVar("TState")
TParams = TypeVar("TParams")


class Environment(Generic[TState, TParams]):
    """Base class; see the module docstring."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def default_params(self) -> TParams:
        raise NotImplementedError

    @property
    def num_actions(self) -> int:
        raise NotImplementedError

    def observation_space(self, params: TParams | None = None):
        raise NotImplementedError

    def action_space(self, params: TParams | None = None):
        raise NotImplementedError

    def reset_env(self, key: jax.Array, params: TParams) -> tuple[jax.Array, TState]:
        raise NotImplementedError

    def step_env(self, key: jax.Array, state: TState, action, params: TParams):
        """One transition without auto-reset -> (obs, state, reward, terminated, truncated, info)."""
        raise NotImplementedError

    def action_mask(self, state: TState, params: TParams) -> jax.Array:
        """bool[A]: legal actions at ``state``."""
        raise NotImplementedError

    def check_action(self, action: Any) -> None:
        """Validates a concrete action outside jit (a no-op on traced values)."""

    def reset(self, key: jax.Array, params: TParams | None = None) -> tuple[jax.Array, TState]:
        params = self.default_params if params is None else params
        return self.reset_env(key, params)

    def step(self, key: jax.Array, state: TState, action, params: TParams | None = None):
        params = self.default_params if params is None else params
        self.check_action(action)
        key_step, key_reset = jax.random.split(key)
        obs_st, state_st, reward, terminated, truncated, info = self.step_env(key_step, state, action, params)
        obs_re, state_re = self.reset_env(key_reset, params)
        done = jnp.logical_or(terminated, truncated)
        state = jax.tree.map(lambda r, s: jax.lax.select(done, r, s), state_re, state_st)
        obs = jax.lax.select(done, obs_re, obs_st)
        info = dict(info)
        info["terminated"] = terminated
        info["truncated"] = truncated
        info["final_observation"] = obs_st
        info["action_mask"] = self.action_mask(state, params)
        return obs, state, reward, terminated, truncated, info
