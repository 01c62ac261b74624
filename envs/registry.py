"""``envs.make`` and the registry of environment ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(env_id: str, factory: Callable[..., Any]) -> None:
    """Registers ``factory(**kwargs) -> env`` under ``env_id``."""
    if env_id in _REGISTRY:
        raise ValueError(f"environment id {env_id!r} is already registered")
    _REGISTRY[env_id] = factory


def registered_envs() -> list[str]:
    """The ids ``make`` accepts."""
    return list(_REGISTRY)


def make(env_id: str, **kwargs):
    """(env, default_params) for a registered id, gymnax-style, single- and multi-agent alike.

    Keyword arguments go to the environment's constructor, e.g.
    ``make("Countdown-v0", num_numbers=4, max_number=99)``.
    """
    if env_id not in _REGISTRY:
        raise ValueError(f"unknown environment id {env_id!r}: expected one of {registered_envs()}")
    try:
        env = _REGISTRY[env_id](**kwargs)
    except TypeError as e:
        raise TypeError(f"make({env_id!r}): {e}") from None
    return env, env.default_params
