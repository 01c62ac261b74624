"""Countdown-v0: the Countdown puzzle as a single-agent, gymnax-style environment.

Rules (envs/countdown/rules.py, docs/trace_format.md): combine two numbers of the current list
with +, *, larger-minus-smaller or exact larger-divided-by-smaller; the operands leave the
list and the result is appended. The episode ends when one number is left; reward 1.0 on
that step iff it is the target.

- Observation int32[1 + 2N]: ``[target, numbers (current list, then 0-padding), valid (1/0)]``.
- Action ``a = pair * 4 + op`` with pairs from ``itertools.combinations(range(N), 2)`` over
  list positions; A = C(N, 2) * 4. ``info["action_mask"]`` gives the legal ones.
- An illegal action (positions past the list, inexact or by-zero division, overflow, or an id
  outside [0, A) under jit) ends the episode with reward 0 and ``info["illegal_action"]``.
  Outside jit an id outside [0, A) raises a ValueError instead.
- ``truncated`` is always False: an episode never lasts more than N - 1 steps.
- Reset draws a problem (uniformly, up to a bias below P / 2**32) from the bank in ``params`` (``numbers`` int32[P, N],
  ``targets`` int32[P]). ``envs.make("Countdown-v0", ...)`` fills the bank with
  ``generate_problems(PRNGKey(bank_seed), bank_size, ...)``, i.e. the APR paper's
  distribution (targets uniform in [min_target, max_target], numbers uniform in
  [1, max_number], redrawn until solvable); pass your own bank with ``make_params``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import spaces
from envs.countdown import problems, rules
from envs.environment import Environment


@struct.dataclass
class EnvState:
    numbers: jax.Array  # int32[N]: the current list, then 0-padding
    count: jax.Array  # int32: length of the current list
    target: jax.Array  # int32
    problem: jax.Array  # int32: index of the problem in the bank
    time: jax.Array  # int32: steps taken in this episode


@struct.dataclass
class EnvParams:
    numbers: jax.Array  # int32[P, N]: the problem bank
    targets: jax.Array  # int32[P]


def make_params(numbers, targets) -> EnvParams:
    """EnvParams from a problem bank (e.g. ``generate_problems`` output or a split)."""
    numbers = np.asarray(numbers)
    targets = np.asarray(targets)
    if numbers.ndim != 2 or targets.shape != numbers.shape[:1] or len(targets) == 0:
        raise ValueError(
            f"problem bank shapes numbers={numbers.shape}, targets={targets.shape}: expected "
            "numbers int[P, N] and targets int[P] with P >= 1"
        )
    rules.check_num_numbers(numbers.shape[1])
    if not (np.issubdtype(numbers.dtype, np.integer) and np.issubdtype(targets.dtype, np.integer)):
        raise ValueError(f"problem bank dtypes {numbers.dtype}, {targets.dtype}: expected integers")
    if numbers.min() < 0 or targets.min() < 0 or max(numbers.max(), targets.max()) > rules.MAX_VALUE:
        raise ValueError(f"problem bank values outside [0, {rules.MAX_VALUE}]: expected int32 values >= 0")
    return EnvParams(jnp.asarray(numbers, jnp.int32), jnp.asarray(targets, jnp.int32))


@functools.cache
def _default_bank(num_numbers, min_target, max_target, max_number, bank_size, bank_seed):
    numbers, targets = problems.generate_problems(
        jax.random.PRNGKey(bank_seed), bank_size, num_numbers, min_target, max_target, max_number
    )
    return EnvParams(numbers, targets)


class Countdown(Environment[EnvState, EnvParams]):
    """The Countdown puzzle; see the module docstring."""

    def __init__(
        self,
        num_numbers: int = 4,
        min_target: int = 10,
        max_target: int = 100,
        max_number: int = 99,
        bank_size: int = 10_000,
        bank_seed: int = 0,
    ):
        self.num_numbers, self.min_target, self.max_target, self.max_number = problems.check_ranges(
            num_numbers, min_target, max_target, max_number
        )
        self.bank_size = problems._check_int("bank_size", bank_size, 1, 2**31 - 1)
        self.bank_seed = problems._check_int("bank_seed", bank_seed, 0, 2**32 - 1)

    @property
    def name(self) -> str:
        return "Countdown-v0"

    @property
    def num_actions(self) -> int:
        return rules.num_actions(self.num_numbers)

    @property
    def default_params(self) -> EnvParams:
        return _default_bank(
            self.num_numbers, self.min_target, self.max_target, self.max_number, self.bank_size, self.bank_seed
        )

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        return spaces.Box(0, rules.MAX_VALUE, (1 + 2 * self.num_numbers,), jnp.int32)

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    def get_obs(self, state: EnvState) -> jax.Array:
        valid = (jnp.arange(self.num_numbers) < state.count).astype(jnp.int32)
        return jnp.concatenate([state.target[None], state.numbers, valid]).astype(jnp.int32)

    def action_mask(self, state: EnvState, params: EnvParams | None = None) -> jax.Array:
        return rules.legal_mask(state.numbers, state.count)

    def check_params(self, params: EnvParams) -> None:
        """A problem bank of another number count is a one-line error (shapes are static, so
        this holds under jit and vmap too)."""
        n = params.numbers.shape[-1]
        if n != self.num_numbers:
            raise ValueError(
                f"params hold problems of {n} numbers: expected {self.num_numbers}-number problems "
                f"(the env's num_numbers; make the env with num_numbers={n}, or pass a bank of "
                f"{self.num_numbers}-number problems)"
            )

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        self.check_params(params)
        # One random word modulo the (static) bank size: uniform up to a bias below
        # P / 2**32 (2e-6 for a 10k bank), and several times cheaper than randint.
        bank_size = params.targets.shape[0]
        index = (jax.random.bits(key, (), jnp.uint32) % jnp.uint32(bank_size)).astype(jnp.int32)
        state = EnvState(
            numbers=params.numbers[index].astype(jnp.int32),
            count=jnp.int32(self.num_numbers),
            target=params.targets[index].astype(jnp.int32),
            problem=index,
            time=jnp.int32(0),
        )
        return self.get_obs(state), state

    def step_env(self, key: jax.Array, state: EnvState, action, params: EnvParams):
        numbers, count, legal = rules.step_numbers(state.numbers, state.count, action)
        state = state.replace(numbers=numbers, count=count, time=state.time + 1)
        solved = legal & (count == 1) & (numbers[0] == state.target)
        terminated = ~legal | (count == 1)
        info = {"illegal_action": ~legal, "solved": solved}
        return (
            self.get_obs(state),
            state,
            solved.astype(jnp.float32),
            terminated,
            jnp.zeros((), bool),
            info,
        )

    def check_action(self, action) -> None:
        if isinstance(action, jax.core.Tracer):
            return
        value = np.asarray(action)
        if not np.issubdtype(value.dtype, np.integer) or value.size == 0:
            raise ValueError(f"action={action!r} has dtype {value.dtype}: expected an integer action id")
        if value.min() < 0 or value.max() >= self.num_actions:
            raise ValueError(
                f"action={action!r} is out of range: expected 0 <= action < {self.num_actions} "
                f"for num_numbers={self.num_numbers}"
            )
