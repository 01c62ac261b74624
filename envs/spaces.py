"""Observation and action spaces (gymnax-style), with no dependency beyond jax."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


class Discrete:
    """Integers 0 .. n-1."""

    def __init__(self, num_categories: int, dtype=jnp.int32):
        if int(num_categories) < 1:
            raise ValueError(f"num_categories={num_categories!r}: expected at least 1")
        self.n = int(num_categories)
        self.shape: tuple[int, ...] = ()
        self.dtype = dtype

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.randint(key, self.shape, 0, self.n, dtype=self.dtype)

    def contains(self, x) -> jax.Array:
        x = jnp.asarray(x)
        return (x.shape == self.shape) & jnp.all((x >= 0) & (x < self.n))

    def __repr__(self) -> str:
        return f"Discrete({self.n})"


class Box:
    """Arrays of a fixed shape with elementwise bounds."""

    def __init__(self, low, high, shape: Sequence[int], dtype=jnp.float32):
        self.low = low
        self.high = high
        self.shape = tuple(shape)
        self.dtype = dtype

    def sample(self, key: jax.Array) -> jax.Array:
        if jnp.issubdtype(self.dtype, jnp.integer):
            return jax.random.randint(key, self.shape, self.low, self.high, dtype=self.dtype)
        return jax.random.uniform(key, self.shape, self.dtype, self.low, self.high)

    def contains(self, x) -> jax.Array:
        x = jnp.asarray(x)
        return (x.shape == self.shape) & jnp.all((x >= self.low) & (x <= self.high))

    def __repr__(self) -> str:
        return f"Box(low={self.low}, high={self.high}, shape={self.shape}, dtype={jnp.dtype(self.dtype).name})"


class Dict:
    """A dictionary of spaces."""

    def __init__(self, spaces: dict):
        self.spaces = dict(spaces)

    def sample(self, key: jax.Array) -> dict:
        keys = jax.random.split(key, len(self.spaces))
        return {k: s.sample(kk) for (k, s), kk in zip(self.spaces.items(), keys)}

    def contains(self, x) -> jax.Array:
        return jnp.all(jnp.array([s.contains(x[k]) for k, s in self.spaces.items()]))

    def __repr__(self) -> str:
        return f"Dict({self.spaces})"
