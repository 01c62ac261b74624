"""ParallelSearch-v0: one Countdown problem searched by a team of up to K thread-agents.

The game (Adaptive Parallel Reasoning without a language model: the threads are agents).

Board
    One Countdown problem (N numbers, a target; moves as in ``envs/countdown/rules.py``) and
    a fixed pool of K threads named ``thread_0`` .. ``thread_{K-1}``. Each thread is IDLE,
    RUNNING or WAITING. A non-idle thread holds a *job*: a root node (where it started) and
    a path from that root down to its current node (a stack of number lists, depth <= N-1,
    depth = N - numbers left). At every node on its path it remembers which moves it has
    already *tried* (descended into or handed to a child). ``thread_0`` holds the team's job
    at the problem's root for the whole episode; the others start idle.

Ticks
    Each ``step`` is one tick in which every RUNNING thread takes one action, all at once
    (decided on the state at the start of the tick); IDLE and WAITING threads take NOOP.
    Action ids (A = C(N, 2) * 4 Countdown moves, then four more; ``env.num_actions`` = A + 4):

    ``0 .. A-1``  MOVE a: apply Countdown move ``a`` to the current node and descend to the
                  result. Legal iff the move is legal there and not yet tried at this node.
    ``A``         BACKTRACK: go up to the parent node on the path (the tried-record of the
                  node left is forgotten). Legal iff below the job's root.
    ``A + 1``     SPAWN: hand the current node's untried legal moves, in action order, one
                  to each thread idle at the start of the tick, up to the number of idle
                  threads. Each child starts RUNNING at the resulting node (its job's root)
                  with a fresh budget; the handed-out moves count as tried at the spawner's
                  node; the spawner WAITS until all of them have returned (the join) and
                  then resumes RUNNING where it was. Legal iff the node has an untried legal
                  move and some thread is idle. When several threads spawn in one tick they
                  are served in thread order; one that finds no idle thread left gets no
                  child and just keeps running (the tick still counts for it).
    ``A + 2``     RETURN: end this child's job; its result goes to its parent (whose count
                  of outstanding children drops by one) and the thread becomes IDLE (free
                  for later spawns from the next tick on). Legal for any running child
                  (never for ``thread_0``), whatever its budget. Since reaching the target
                  ends the episode at once, every result that arrives is "not solved": the
                  join is a barrier that waits for all the children.
    ``A + 3``     NOOP: the only legal action of IDLE and WAITING threads; illegal for
                  RUNNING ones (every active thread acts).

    Returns are applied after the moves and spawns of the tick; a parent whose last child
    returns resumes at the end of the tick and acts on the next one.

Budgets
    Context: every action of a RUNNING thread other than RETURN uses one unit of its budget
    (``params.thread_budget``, per job). With none left a child's only legal action is
    RETURN; ``thread_0`` running with none left truncates the episode.
    Compute: ``params.compute_budget`` > 0 truncates the episode once the team's total
    thread-steps reach it. Time: the episode truncates after ``params.max_ticks`` ticks.

End of the episode (checked at the end of each tick; ``dones[agent]`` is the same for all)
    Success (terminated): some active thread's node is exactly ``[target]`` (a descent or a
    spawned child reaching it). Failure (terminated): ``thread_0`` is running at the root
    with no untried legal move left (the whole tree it could reach is exhausted).
    Truncated: one of the budgets above, unless the tick also succeeded or failed.

Reward (the same for every agent, each tick)
    ``1.0 * success - params.tick_cost - params.step_cost * (threads running this tick)``,
    so an episode's return is ``success - tick_cost * ticks - step_cost * thread_steps``
    (latency = ticks on the critical path, compute = thread-steps).

Observation per agent, int32[2N + 7]
    ``[target, numbers (its node, 0-padded), valid (1/0),
    is_root_thread, is_child, waiting, depth, budget_left, idle_threads]``. An idle thread
    sees the target, zeros and ``idle_threads``. ``get_avail_actions(state)`` gives each
    agent's bool[A + 4] mask; a masked policy can never take an illegal action, and every
    mask has at least one action while the episode runs.

Unmasked illegal actions (and ids outside [0, A + 4)) are deterministic no-ops for the
thread's search (a running thread still spends the tick and one unit of budget);
``infos["illegal_actions"]`` counts them.

Infos (team-level scalars, describing the episode the tick belongs to, so at the end of an
episode they are its totals): ``success``, ``terminated`` and ``truncated`` (as gymnax 1.0's
``info``: ``dones["__all__"] = terminated | truncated``), ``ticks`` (critical path),
``thread_steps`` (total compute), ``threads_used`` (distinct threads that held a job),
``children`` (threads spawned), ``illegal_actions`` (this tick).

Problems: reset draws one from the bank in ``params`` (as ``Countdown-v0`` does);
``reset_to(index, params)`` starts at a given one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import spaces
from envs.countdown import env as countdown_env
from envs.countdown import problems, rules
from envs.multi_agent import MultiAgentEnv

IDLE, RUNNING, WAITING = 0, 1, 2
NUM_EXTRA_ACTIONS = 4
NUM_OBS_EXTRAS = 6  # is_root_thread, is_child, waiting, depth, budget_left, idle_threads


@struct.dataclass
class EnvState:
    numbers: jax.Array  # int32[K, N, N]: numbers[k, d] = node at depth d of thread k's path (0 off-path)
    tried: jax.Array  # bool[K, N, A]: tried[k, d, a] = move a already tried at that node
    depth: jax.Array  # int32[K]: depth of the current node (N - numbers left)
    root_depth: jax.Array  # int32[K]: depth of the job's root node
    status: jax.Array  # int32[K]: IDLE, RUNNING or WAITING
    parent: jax.Array  # int32[K]: the spawning thread of a child, -1 otherwise
    pending: jax.Array  # int32[K]: children not yet returned
    budget_left: jax.Array  # int32[K]: context budget left in the current job (0 when idle)
    used: jax.Array  # bool[K]: threads that have held a job this episode
    target: jax.Array  # int32
    problem: jax.Array  # int32: index of the problem in the bank
    ticks: jax.Array  # int32
    thread_steps: jax.Array  # int32
    children: jax.Array  # int32: threads spawned this episode


@struct.dataclass
class EnvParams:
    numbers: jax.Array  # int32[P, N]: the problem bank
    targets: jax.Array  # int32[P]
    thread_budget: jax.Array  # int32: actions per job (context budget)
    compute_budget: jax.Array  # int32: total thread-steps per episode; 0 = unlimited
    max_ticks: jax.Array  # int32
    tick_cost: jax.Array  # float32: cost per tick (latency)
    step_cost: jax.Array  # float32: cost per running thread per tick (compute)


def _check_budgets(thread_budget, compute_budget, max_ticks, tick_cost, step_cost):
    thread_budget = problems._check_int("thread_budget", thread_budget, 1, 2**31 - 1)
    compute_budget = problems._check_int("compute_budget", compute_budget, 0, 2**31 - 1)
    max_ticks = problems._check_int("max_ticks", max_ticks, 1, 2**31 - 1)
    out = []
    for name, value in (("tick_cost", tick_cost), ("step_cost", step_cost)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not (np.isfinite(value) and value >= 0)
        ):
            raise ValueError(f"{name}={value!r} is out of range: expected a finite number >= 0")
        out.append(float(value))
    return thread_budget, compute_budget, max_ticks, out[0], out[1]


def make_params(
    numbers,
    targets,
    thread_budget: int = 4096,
    compute_budget: int = 0,
    max_ticks: int = 4096,
    tick_cost: float = 0.0,
    step_cost: float = 0.0,
) -> EnvParams:
    """EnvParams from a problem bank (validated as ``countdown.make_params``) and budgets."""
    bank = countdown_env.make_params(numbers, targets)
    tb, cb, mt, tc, sc = _check_budgets(thread_budget, compute_budget, max_ticks, tick_cost, step_cost)
    return EnvParams(
        bank.numbers, bank.targets, jnp.int32(tb), jnp.int32(cb), jnp.int32(mt), jnp.float32(tc), jnp.float32(sc)
    )


@functools.cache
def _default_params(num_numbers, min_target, max_target, max_number, bank_size, bank_seed, budgets):
    bank = countdown_env._default_bank(num_numbers, min_target, max_target, max_number, bank_size, bank_seed)
    return make_params(bank.numbers, bank.targets, *budgets)


class ParallelSearch(MultiAgentEnv[EnvState, EnvParams]):
    """One Countdown problem searched by up to K thread-agents; see the module docstring."""

    def __init__(
        self,
        num_threads: int = 4,
        num_numbers: int = 4,
        min_target: int = 10,
        max_target: int = 100,
        max_number: int = 99,
        bank_size: int = 10_000,
        bank_seed: int = 0,
        thread_budget: int = 4096,
        compute_budget: int = 0,
        max_ticks: int = 4096,
        tick_cost: float = 0.0,
        step_cost: float = 0.0,
    ):
        self.num_threads = problems._check_int("num_threads", num_threads, 1, 1024)
        self.num_numbers, self.min_target, self.max_target, self.max_number = problems.check_ranges(
            num_numbers, min_target, max_target, max_number
        )
        self.bank_size = problems._check_int("bank_size", bank_size, 1, 2**31 - 1)
        self.bank_seed = problems._check_int("bank_seed", bank_seed, 0, 2**32 - 1)
        self._budgets = _check_budgets(thread_budget, compute_budget, max_ticks, tick_cost, step_cost)
        super().__init__([f"thread_{k}" for k in range(self.num_threads)])
        a = rules.num_actions(self.num_numbers)
        self.num_moves = a
        self.BACKTRACK, self.SPAWN, self.RETURN, self.NOOP = a, a + 1, a + 2, a + 3

    # ---------------------------------------------------------------- API surface
    @property
    def name(self) -> str:
        return "ParallelSearch-v0"

    @property
    def num_actions(self) -> int:
        return self.num_moves + NUM_EXTRA_ACTIONS

    @property
    def obs_size(self) -> int:
        return 1 + 2 * self.num_numbers + NUM_OBS_EXTRAS

    @property
    def default_params(self) -> EnvParams:
        return _default_params(
            self.num_numbers,
            self.min_target,
            self.max_target,
            self.max_number,
            self.bank_size,
            self.bank_seed,
            self._budgets,
        )

    @property
    def agent_classes(self) -> dict[str, list[str]]:
        return {"thread": list(self.agents)}

    def _check_agent(self, agent: str) -> None:
        if agent not in self.agents:
            raise ValueError(f"agent={agent!r} is unknown: expected one of {self.agents}")

    def observation_space(self, agent: str) -> spaces.Box:
        self._check_agent(agent)
        return spaces.Box(0, rules.MAX_VALUE, (self.obs_size,), jnp.int32)

    def action_space(self, agent: str) -> spaces.Discrete:
        self._check_agent(agent)
        return spaces.Discrete(self.num_actions)

    # ---------------------------------------------------------------- internals
    def _node(self, state: EnvState):
        """(numbers int32[K, N], count int32[K], untried bool[K, A]) of each thread's node."""
        n = self.num_numbers
        dh = jnp.arange(n, dtype=jnp.int32) == state.depth[:, None]  # [K, N]
        cur = jnp.sum(jnp.where(dh[:, :, None], state.numbers, 0), axis=1, dtype=jnp.int32)
        count = n - state.depth
        legal = jax.vmap(rules.legal_mask)(cur, count)
        tried = jnp.any(dh[:, :, None] & state.tried, axis=1)
        return cur, count, legal & ~tried

    def _avail(self, state: EnvState, untried: jax.Array) -> jax.Array:
        running = state.status == RUNNING
        go = running & (state.budget_left > 0)
        n_idle = jnp.sum(state.status == IDLE)
        extra = jnp.stack(
            [
                go & (state.depth > state.root_depth),  # BACKTRACK
                go & jnp.any(untried, axis=-1) & (n_idle > 0),  # SPAWN
                running & (state.parent >= 0),  # RETURN
                ~running,  # NOOP
            ],
            axis=-1,
        )
        return jnp.concatenate([untried & go[:, None], extra], axis=-1)

    def _obs(self, state: EnvState, cur: jax.Array, count: jax.Array) -> dict:
        k, n = self.num_threads, self.num_numbers
        active = state.status != IDLE
        valid = (jnp.arange(n, dtype=jnp.int32) < count[:, None]) & active[:, None]
        n_idle = jnp.sum(~active, dtype=jnp.int32)
        extras = jnp.stack(
            [
                (jnp.arange(k) == 0) & active,
                state.parent >= 0,
                state.status == WAITING,
                jnp.where(active, state.depth, 0),
                jnp.where(active, state.budget_left, 0),
                jnp.broadcast_to(n_idle, (k,)),
            ],
            axis=-1,
        ).astype(jnp.int32)
        obs = jnp.concatenate(
            [jnp.broadcast_to(state.target, (k, 1)), jnp.where(valid, cur, 0), valid.astype(jnp.int32), extras],
            axis=-1,
        ).astype(jnp.int32)
        return {agent: obs[i] for i, agent in enumerate(self.agents)}

    def _stack_actions(self, actions: dict) -> jax.Array:
        return jnp.stack([jnp.asarray(actions[a]).astype(jnp.int32).reshape(()) for a in self.agents])

    # ---------------------------------------------------------------- pure functions
    def get_obs(self, state: EnvState, params: EnvParams | None = None) -> dict:
        cur, count, _ = self._node(state)
        return self._obs(state, cur, count)

    def get_avail_actions(self, state: EnvState, params: EnvParams | None = None) -> dict:
        _, _, untried = self._node(state)
        avail = self._avail(state, untried)
        return {agent: avail[i] for i, agent in enumerate(self.agents)}

    def reset_to(self, index: jax.Array, params: EnvParams | None = None) -> tuple[dict, EnvState]:
        """(obs, state) at the start of bank problem ``index`` (pure, jittable)."""
        params = self.default_params if params is None else params
        k, n, a = self.num_threads, self.num_numbers, self.num_moves
        index = jnp.asarray(index, jnp.int32)
        first = jnp.arange(k) == 0
        numbers = jnp.zeros((k, n, n), jnp.int32).at[0, 0].set(params.numbers[index].astype(jnp.int32))
        state = EnvState(
            numbers=numbers,
            tried=jnp.zeros((k, n, a), bool),
            depth=jnp.zeros((k,), jnp.int32),
            root_depth=jnp.zeros((k,), jnp.int32),
            status=jnp.where(first, RUNNING, IDLE).astype(jnp.int32),
            parent=jnp.full((k,), -1, jnp.int32),
            pending=jnp.zeros((k,), jnp.int32),
            budget_left=jnp.where(first, params.thread_budget, 0).astype(jnp.int32),
            used=first,
            target=params.targets[index].astype(jnp.int32),
            problem=index,
            ticks=jnp.int32(0),
            thread_steps=jnp.int32(0),
            children=jnp.int32(0),
        )
        return self.get_obs(state), state

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[dict, EnvState]:
        bank_size = params.targets.shape[0]
        index = (jax.random.bits(key, (), jnp.uint32) % jnp.uint32(bank_size)).astype(jnp.int32)
        return self.reset_to(index, params)

    def step_env(self, key: jax.Array, state: EnvState, actions: dict, params: EnvParams):
        k, n, a_moves = self.num_threads, self.num_numbers, self.num_moves
        ks = jnp.arange(k, dtype=jnp.int32)
        ns = jnp.arange(n, dtype=jnp.int32)
        act = self._stack_actions(actions)
        cur, count, untried = self._node(state)
        avail = self._avail(state, untried)
        legal = (act >= 0) & (act < self.num_actions) & rules.pick(avail, jnp.clip(act, 0, self.num_actions - 1))
        act = jnp.where(legal, act, self.NOOP)
        running = state.status == RUNNING
        is_move, is_back = act < a_moves, act == self.BACKTRACK
        is_spawn, is_ret = act == self.SPAWN, act == self.RETURN

        # Spawns: idle thread of rank r goes to the spawner whose slice [start, start + granted)
        # of the idle ranks holds r, and takes that spawner's (r - start)-th untried move.
        idle = state.status == IDLE
        n_idle = jnp.sum(idle, dtype=jnp.int32)
        rank = jnp.cumsum(idle, dtype=jnp.int32) - 1
        demand = jnp.where(is_spawn, jnp.sum(untried, axis=-1, dtype=jnp.int32), 0)
        start = jnp.cumsum(demand, dtype=jnp.int32) - demand
        granted = jnp.clip(n_idle - start, 0, demand)
        assign = (
            idle[:, None] & (rank[:, None] >= start[None, :]) & (rank[:, None] < (start + granted)[None, :])
        )  # [child, spawner]
        is_child = jnp.any(assign, axis=-1)
        untried_rank = jnp.cumsum(untried, axis=-1, dtype=jnp.int32) - 1  # [K, A]
        handed = untried & (untried_rank < granted[:, None])  # moves each spawner hands out

        def from_spawner(x):  # x[spawner(i)] for each child i (0 elsewhere), as a select
            hot = assign.reshape(assign.shape + (1,) * (x.ndim - 1))
            if x.dtype == jnp.bool_:
                return jnp.any(hot & x[None], axis=1)
            return jnp.sum(jnp.where(hot, x[None], 0), axis=1, dtype=x.dtype)

        child_rank = rank - from_spawner(start)
        child_move = jnp.argmax(
            from_spawner(untried) & (from_spawner(untried_rank) == child_rank[:, None]), axis=-1
        ).astype(jnp.int32)
        parent_depth = from_spawner(state.depth)

        # One descent per thread: movers from their own node, children from their spawner's.
        base = jnp.where(is_child[:, None], from_spawner(cur), cur)
        base_count = jnp.where(is_child, n - parent_depth, count)
        base_move = jnp.where(is_child, child_move, jnp.where(is_move, act, 0))
        new_node, _, _ = jax.vmap(rules.step_numbers)(base, base_count, base_move)
        descends = is_move | is_child

        # Returns and joins.
        returns_to = jnp.sum((state.parent[None, :] == ks[:, None]) & is_ret[None, :], axis=-1, dtype=jnp.int32)
        pending = state.pending + granted - returns_to

        depth = jnp.where(is_child, parent_depth + 1, jnp.where(is_ret, 0, state.depth + is_move - is_back)).astype(
            jnp.int32
        )
        root_depth = jnp.where(is_child, parent_depth + 1, jnp.where(is_ret, 0, state.root_depth))
        status = jnp.where(is_child, RUNNING, jnp.where(is_ret, IDLE, jnp.where(granted > 0, WAITING, state.status)))
        status = jnp.where((status == WAITING) & (pending == 0), RUNNING, status).astype(jnp.int32)
        parent = jnp.where(
            is_child, jnp.sum(jnp.where(assign, ks[None], 0), axis=-1), jnp.where(is_ret, -1, state.parent)
        )
        spend = running & ~is_ret
        budget = jnp.where(
            is_child, params.thread_budget, jnp.where(is_ret, 0, jnp.maximum(state.budget_left - spend, 0))
        ).astype(jnp.int32)

        dh = ns == state.depth[:, None]
        new_row = (ns == depth[:, None]) & descends[:, None]  # [K, N]
        mark = (jnp.arange(a_moves) == act[:, None]) & is_move[:, None] | handed
        tried = (state.tried | (dh[:, :, None] & mark[:, None, :])) & ~new_row[:, :, None]
        numbers = jnp.where(new_row[:, :, None], new_node[:, None, :], state.numbers)
        on_path = (ns >= root_depth[:, None]) & (ns <= depth[:, None]) & (status != IDLE)[:, None]
        steps = jnp.sum(running, dtype=jnp.int32)
        new = EnvState(
            numbers=jnp.where(on_path[:, :, None], numbers, 0),
            tried=tried & on_path[:, :, None],
            depth=depth,
            root_depth=root_depth.astype(jnp.int32),
            status=status,
            parent=parent.astype(jnp.int32),
            pending=pending,
            budget_left=budget,
            used=state.used | is_child,
            target=state.target,
            problem=state.problem,
            ticks=state.ticks + 1,
            thread_steps=state.thread_steps + steps,
            children=state.children + jnp.sum(granted, dtype=jnp.int32),
        )

        cur2, count2, untried2 = self._node(new)
        solved = jnp.any((status != IDLE) & (count2 == 1) & (cur2[:, 0] == state.target))
        exhausted = (status[0] == RUNNING) & (depth[0] == 0) & ~jnp.any(untried2[0])
        terminated = solved | exhausted
        out_of_budget = (
            (new.ticks >= params.max_ticks)
            | ((params.compute_budget > 0) & (new.thread_steps >= params.compute_budget))
            | ((status[0] == RUNNING) & (budget[0] == 0))
        )
        truncated = out_of_budget & ~terminated
        done = terminated | truncated
        reward = solved.astype(jnp.float32) - params.tick_cost - params.step_cost * steps.astype(jnp.float32)
        rewards = {agent: reward for agent in self.agents}
        dones = {agent: done for agent in self.agents}
        dones["__all__"] = done
        infos = {
            "success": solved,
            "terminated": terminated,
            "truncated": truncated,
            "ticks": new.ticks,
            "thread_steps": new.thread_steps,
            "threads_used": jnp.sum(new.used, dtype=jnp.int32),
            "children": new.children,
            "illegal_actions": jnp.sum(~legal, dtype=jnp.int32),
        }
        return self._obs(new, cur2, count2), new, rewards, dones, infos
