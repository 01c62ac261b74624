"""Vectorised environments in pure JAX (importable without jaxapr).

    import envs
    env, params = envs.make("Countdown-v0", num_numbers=4)
    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)
"""
from envs import countdown, spaces
from envs.environment import Environment
from envs.registry import make, register, registered_envs

register("Countdown-v0", countdown.Countdown)

__all__ = ["Environment", "countdown", "make", "register", "registered_envs", "spaces"]
__version__ = "0.1.0"
