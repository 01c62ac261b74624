"""ParallelSearch-v0: the game's rules, budgets, joins, rewards, and the scripted policies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import countdown, parallel_search, scripted
from envs.countdown import rules
from envs.parallel_search import IDLE, RUNNING, WAITING


def dfs_oracle(nums, target):
    """Plain-Python depth-first search in action order: (solved, actions taken)."""
    steps = 0

    def go(node):
        nonlocal steps
        for mv in rules.moves(node):
            steps += 1  # descend
            if len(mv.numbers) == 1 and mv.numbers[0] == target:
                return True
            if go(mv.numbers):
                return True
            steps += 1  # backtrack
        return False

    return go(list(nums)), steps


@functools.cache
def mixed_bank(n, size, seed=0):
    """Unfiltered random problems (solvable and not) of n numbers 1..20, targets 1..60."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 21, (size, n)).astype(np.int32), rng.integers(1, 61, size).astype(np.int32)


def make_env(k=4, n=4, **budgets):
    env = parallel_search.ParallelSearch(num_threads=k, num_numbers=n, bank_size=8)
    numbers, targets = mixed_bank(n, 1000)
    return env, parallel_search.make_params(numbers, targets, **budgets)


@functools.cache
def run_eval(k, n, policy_name, **budgets):
    env, params = make_env(k, n, **dict(budgets))
    policy = getattr(scripted, policy_name)
    out = jax.jit(lambda p: scripted.evaluate(env, p, policy))(params)
    return {key: np.asarray(v) for key, v in out.items()}


def stack(d, env):
    return jnp.stack([d[a] for a in env.agents], axis=-2 if d[env.agents[0]].ndim > 1 else -1)


# ------------------------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(num_threads=0), "num_threads"),
        (dict(num_threads=2.5), "num_threads"),
        (dict(num_numbers=7), "num_numbers"),
        (dict(num_numbers=1), "num_numbers"),
        (dict(tick_cost=-0.1), "tick_cost"),
        (dict(step_cost=float("nan")), "step_cost"),
        (dict(thread_budget=0), "thread_budget"),
        (dict(compute_budget=-1), "compute_budget"),
        (dict(max_ticks=0), "max_ticks"),
    ],
)
def test_bad_constructor_arguments_are_one_line_value_errors(kwargs, word):
    with pytest.raises(ValueError) as e:
        envs.make("ParallelSearch-v0", **kwargs)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_make_returns_env_and_params_and_names_agents():
    env, params = envs.make("ParallelSearch-v0", num_threads=3, num_numbers=3, bank_size=16)
    assert isinstance(env, envs.MultiAgentEnv) and env.name == "ParallelSearch-v0"
    assert env.agents == ["thread_0", "thread_1", "thread_2"] and env.num_agents == 3
    assert env.num_actions == rules.num_actions(3) + 4 and env.action_space("thread_1").n == env.num_actions
    assert env.observation_space("thread_2").shape == (2 * 3 + 7,)
    assert params.numbers.shape == (16, 3)
    with pytest.raises(ValueError, match="thread_9"):
        env.action_space("thread_9")
    with pytest.raises(ValueError, match="thread_2"):
        env.step(jax.random.PRNGKey(0), env.reset(jax.random.PRNGKey(0))[1], {"thread_0": 0, "thread_1": 0})


def test_reset_observation_layout():
    env, params = make_env(3, 4)
    obs, state = env.reset_to(5, params)
    nums, target = mixed_bank(4, 1000)
    o = np.asarray(obs["thread_0"])
    assert o[0] == target[5] and list(o[1:5]) == list(nums[5]) and list(o[5:9]) == [1] * 4
    assert list(o[9:]) == [1, 0, 0, 0, 4096, 2]  # root thread, not child, running, depth 0, budget, 2 idle
    o1 = np.asarray(obs["thread_1"])
    assert o1[0] == target[5] and not o1[1:-1].any() and o1[-1] == 2
    avail = env.get_avail_actions(state)
    assert list(np.flatnonzero(avail["thread_1"])) == [env.NOOP]
    a0 = np.asarray(avail["thread_0"])
    assert a0[env.SPAWN] and not a0[env.BACKTRACK] and not a0[env.RETURN] and not a0[env.NOOP]
    assert (a0[: env.num_moves] == np.asarray(rules.legal_mask(jnp.asarray(nums[5]), 4))).all()


# ------------------------------------------------------------------------------ serial = Countdown
@pytest.mark.slow
def test_serial_dfs_reproduces_countdown_on_1000_problems():
    """Serial DFS in thread_0: same verdict as the exhaustive solver and as replaying its
    first solution in Countdown-v0, after exactly as many actions as a Python DFS."""
    n = 4
    out = run_eval(1, n, "serial_dfs")
    numbers, targets = mixed_bank(n, 1000)
    solvable, actions = jax.vmap(countdown.solve)(jnp.asarray(numbers), jnp.asarray(targets))
    solvable = np.asarray(solvable)
    assert 0.2 < solvable.mean() < 0.95  # both kinds are exercised

    cd = countdown.Countdown(num_numbers=n, bank_size=8)
    cparams = countdown.make_params(numbers, targets)

    def replay(i, acts):
        _, st = cd.reset_env(jax.random.PRNGKey(0), cparams)
        st = st.replace(numbers=cparams.numbers[i], target=cparams.targets[i], problem=i)
        total = 0.0
        for t in range(n - 1):
            _, st, r, *_ = cd.step_env(jax.random.PRNGKey(0), st, acts[t], cparams)
            total += r
        return total

    countdown_reward = np.asarray(jax.jit(jax.vmap(replay))(jnp.arange(1000), actions))
    assert (out["success"] == solvable).all()
    assert (out["success"] == (countdown_reward == 1.0)).all()
    assert not out["truncated"].any()
    oracle = [dfs_oracle(numbers[i], targets[i]) for i in range(1000)]
    assert (out["success"] == np.array([s for s, _ in oracle])).all()
    assert (out["ticks"] == np.array([t for _, t in oracle])).all()
    assert (out["thread_steps"] == out["ticks"]).all() and (out["threads_used"] == 1).all()
    assert (out["children"] == 0).all()


def test_fork_at_root_same_success_fewer_ticks_more_steps():
    """With K = 25 threads every root child (at most 24 for N = 4) gets its own thread: on
    solvable problems, far fewer ticks and more thread-steps than serial search."""
    serial, fork = run_eval(1, 4, "serial_dfs"), run_eval(25, 4, "fork_at_root")
    assert (serial["success"] == fork["success"]).all()
    ok = serial["success"]
    assert fork["ticks"][ok].mean() < 0.2 * serial["ticks"][ok].mean()
    assert fork["thread_steps"][ok].mean() > 1.1 * serial["thread_steps"][ok].mean()
    assert fork["threads_used"].max() == 25 and fork["children"].min() >= 1


# ------------------------------------------------------------------------------ budgets
def test_thread_budget_truncates_thread_0():
    budget = 60
    out = run_eval(1, 4, "serial_dfs", thread_budget=budget)
    full = run_eval(1, 4, "serial_dfs")
    within = full["ticks"] <= budget
    assert within.any() and (~within).any()
    assert (out["success"] == (full["success"] & within)).all()
    assert (out["truncated"] == ~within).all()
    assert (out["ticks"] == np.minimum(full["ticks"], budget)).all()


@pytest.mark.slow
def test_compute_budget_and_max_ticks_truncate():
    k = 6
    out = run_eval(k, 4, "fork_at_root", compute_budget=100)
    full = run_eval(k, 4, "fork_at_root")
    under, over = full["thread_steps"] < 100, full["thread_steps"] >= 100 + k  # (in between: either)
    assert over.any() and under.any()
    assert (out["ticks"][under] == full["ticks"][under]).all() and not out["truncated"][under].any()
    assert out["truncated"][over].all() and not out["success"][over].any()
    hit = out["truncated"]
    assert ((out["thread_steps"][hit] >= 100) & (out["thread_steps"][hit] < 100 + k)).all()
    out = run_eval(k, 4, "fork_at_root", max_ticks=25)
    over = full["ticks"] > 25
    assert over.any() and (out["ticks"] == np.minimum(full["ticks"], 25)).all()
    assert (out["truncated"] == over).all()


def test_child_budget_forces_return():
    env, params = make_env(3, 4, thread_budget=3)
    obs, state = env.reset_to(0, params)
    step = jax.jit(lambda s, a: env.step_env(jax.random.PRNGKey(0), s, a, params))
    noop = {a: env.NOOP for a in env.agents}
    obs, state, *_ = step(state, {**noop, "thread_0": env.SPAWN})
    assert list(np.asarray(state.status)) == [WAITING, RUNNING, RUNNING]
    assert list(np.asarray(state.budget_left)) == [2, 3, 3]
    for _ in range(3):  # children search until their budget is spent
        av = env.get_avail_actions(state)
        obs, state, _, _dones, _ = step(state, {a: int(scripted._dfs_action(av[a])) for a in env.agents})
    assert list(np.asarray(state.budget_left))[1:] == [0, 0]
    av = env.get_avail_actions(state)
    for a in ("thread_1", "thread_2"):
        assert list(np.flatnonzero(av[a])) == [env.RETURN]
        assert obs[a][-2] == 0
    obs, state, *_ = step(state, {**noop, "thread_1": env.RETURN, "thread_2": env.RETURN})
    assert list(np.asarray(state.status)) == [RUNNING, IDLE, IDLE]


# ------------------------------------------------------------------------------ spawn / join
def test_join_waits_for_all_children_and_nested_spawns():
    env, params = make_env(5, 4)
    numbers, targets = mixed_bank(4, 1000)
    solvable = np.asarray(jax.vmap(countdown.solve)(jnp.asarray(numbers), jnp.asarray(targets))[0])
    obs, state = env.reset_to(int(np.flatnonzero(~solvable)[0]), params)  # no accidental success
    step = jax.jit(lambda s, a: env.step_env(jax.random.PRNGKey(0), s, a, params))
    noop = {a: env.NOOP for a in env.agents}
    status = lambda: list(np.asarray(state.status))
    root_moves = np.flatnonzero(np.asarray(env.get_avail_actions(state)["thread_0"])[: env.num_moves])

    def first(agent):
        return int(scripted._dfs_action(env.get_avail_actions(state)[agent]))

    obs, state, _, _, info = step(state, {**noop, "thread_0": env.SPAWN})
    assert status() == [WAITING] + [RUNNING] * 4
    assert list(np.asarray(state.parent)) == [-1, 0, 0, 0, 0] and int(state.pending[0]) == 4
    assert int(info["children"]) == 4 and int(info["threads_used"]) == 5
    for c in range(1, 5):  # each child starts at the node of the next untried root move
        expected, _, _ = rules.step_numbers(state.numbers[0, 0], jnp.int32(4), jnp.int32(root_moves[c - 1]))
        assert (np.asarray(obs[f"thread_{c}"][1:5]) == np.asarray(expected)).all()
        assert list(np.asarray(obs[f"thread_{c}"][-6:-1])) == [0, 1, 0, 1, 4096]
    assert obs["thread_0"][-4] == 1  # waiting
    av = env.get_avail_actions(state)
    assert not av["thread_1"][env.SPAWN]  # nobody idle
    assert list(np.flatnonzero(av["thread_0"])) == [env.NOOP]

    obs, state, *_ = step(
        state,
        {
            **noop,
            "thread_1": env.RETURN,
            "thread_2": env.RETURN,
            "thread_3": first("thread_3"),
            "thread_4": first("thread_4"),
        },
    )
    assert status() == [WAITING, IDLE, IDLE, RUNNING, RUNNING] and int(state.pending[0]) == 2
    obs, state, *_ = step(state, {**noop, "thread_3": env.BACKTRACK, "thread_4": env.RETURN})
    assert status() == [WAITING, IDLE, IDLE, RUNNING, IDLE] and int(state.pending[0]) == 1
    # Nested: thread_3 (a child at depth 1) spawns into the three idle threads.
    obs, state, _, _, info = step(state, {**noop, "thread_3": env.SPAWN})
    assert status() == [WAITING, RUNNING, RUNNING, WAITING, RUNNING]
    assert list(np.asarray(state.parent)) == [-1, 3, 3, 0, 3]
    assert list(np.asarray(state.pending)) == [1, 0, 0, 3, 0]
    assert list(np.asarray(state.depth)) == [0, 2, 2, 1, 2] and list(np.asarray(state.root_depth)) == [0, 2, 2, 1, 2]
    assert int(info["children"]) == 7
    obs, state, *_ = step(
        state, {**noop, "thread_1": env.RETURN, "thread_2": first("thread_2"), "thread_4": env.RETURN}
    )
    assert status() == [WAITING, IDLE, RUNNING, WAITING, IDLE]  # thread_3 still waits for thread_2
    obs, state, *_ = step(state, {**noop, "thread_2": env.RETURN})
    assert status() == [WAITING, IDLE, IDLE, RUNNING, IDLE]  # thread_3 joined, resumes at depth 1
    av = env.get_avail_actions(state)
    assert av["thread_3"][env.RETURN] and not av["thread_3"][env.BACKTRACK]  # at its own root
    obs, state, _, dones, info = step(state, {**noop, "thread_3": env.RETURN})
    assert status() == [RUNNING, IDLE, IDLE, IDLE, IDLE]  # thread_0 joined
    # The 4 handed-out root moves count as tried: thread_0 can no longer take them.
    a0 = np.asarray(env.get_avail_actions(state)["thread_0"])
    assert list(np.flatnonzero(a0[: env.num_moves])) == list(root_moves[4:])
    assert int(info["ticks"]) == 7 and int(info["thread_steps"]) == 1 + 4 + 2 + 1 + 3 + 1 + 1
    assert int(info["illegal_actions"]) == 0 and not bool(dones["__all__"])


def test_unmasked_illegal_actions_are_flagged_no_ops():
    env, params = make_env(3, 4)
    _obs, state = env.reset_to(0, params)
    step = jax.jit(lambda s, a: env.step_env(jax.random.PRNGKey(0), s, a, params))
    bad = {"thread_0": env.RETURN, "thread_1": 0, "thread_2": 999}
    _obs2, state2, _rewards, dones, info = step(state, bad)
    assert int(info["illegal_actions"]) == 3 and not bool(dones["__all__"])
    assert (np.asarray(state2.numbers) == np.asarray(state.numbers)).all()
    assert list(np.asarray(state2.status)) == list(np.asarray(state.status))
    assert int(state2.budget_left[0]) == int(state.budget_left[0]) - 1 and int(state2.ticks) == 1
    assert int(state2.thread_steps) == 1


# ------------------------------------------------------------------------------ random play
def random_masked(key, avail, spawn_bias=0.3):
    """Uniform over available actions, with extra weight on SPAWN/RETURN to exercise joins."""
    a = avail.shape[-1]
    bonus = jnp.where(jnp.arange(a) >= a - 4, jnp.log1p(spawn_bias * a), 0.0)
    return jax.random.categorical(key, jnp.where(avail, bonus, -jnp.inf)).astype(jnp.int32)


def random_rollout(env, params, num_envs, num_steps, seed=0):
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def run(key):
        k0, k1 = jax.random.split(key)
        _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k0, num_envs), params)

        def body(carry, key):
            state, ret = carry
            k_act, k_step = jax.random.split(key)
            avail = stack(jax.vmap(env.get_avail_actions)(state), env)  # [B, K, A]
            act = jax.vmap(jax.vmap(random_masked))(jax.random.split(k_act, avail.shape[:2]), avail)
            actions = {a: act[:, i] for i, a in enumerate(env.agents)}
            _, state2, rewards, dones, info = step(jax.random.split(k_step, num_envs), state, actions, params)
            r = rewards[env.agents[0]]
            ret2 = ret + r
            out = dict(state=state, avail=avail, reward=r, done=dones["__all__"], info=info, ret=ret2)
            return (state2, jnp.where(dones["__all__"], 0.0, ret2)), out

        _, traj = jax.lax.scan(body, (state, jnp.zeros(num_envs)), jax.random.split(k1, num_steps))
        return traj

    return jax.tree.map(np.asarray, jax.jit(run)(jax.random.PRNGKey(seed)))


def check_invariants(env, params, traj):
    s, k, n = traj["state"], env.num_threads, env.num_numbers
    status, parent, depth, root = s.status, s.parent, s.depth, s.root_depth
    assert (traj["info"]["illegal_actions"] == 0).all()
    assert (traj["avail"].any(-1)).all()  # every agent always has an action
    assert (status[..., 0] != IDLE).all() and (parent[..., 0] == -1).all()
    active = status != IDLE
    kids = (parent[..., None, :] == np.arange(k)[:, None]) & active[..., None, :]
    assert (s.pending == kids.sum(-1)).all()
    assert ((status == WAITING) == (s.pending > 0)).all()
    assert ((parent >= 0) == (active & (np.arange(k) > 0))).all()
    assert (parent != np.arange(k)).all()
    assert ((0 <= root) & (root <= depth) & (depth <= n - 1)).all()
    assert (depth[~active] == 0).all() and (s.budget_left[~active] == 0).all()
    assert ((s.budget_left >= 0) & (s.budget_left <= int(params.thread_budget))).all()
    assert (s.numbers >= 0).all()
    ns = np.arange(n)
    on_path = (ns >= root[..., None]) & (ns <= depth[..., None]) & active[..., None]
    assert not s.numbers[~on_path].any() and not s.tried[~on_path].any()
    counts = (s.numbers > 0).sum(-1)  # bank numbers are >= 1, so a node of c numbers has <= c nonzero
    assert (counts[on_path] <= (n - np.broadcast_to(ns, on_path.shape))[on_path]).all()
    # Below its job's root every path node was reached by a tried move of the node above.
    below = on_path & (ns > root[..., None])
    above_tried = np.concatenate([np.zeros_like(s.tried[..., :1, :]), s.tried[..., :-1, :]], axis=-2).any(-1)
    assert above_tried[below].all()
    # A running child with no budget left can only return.
    spent = (status == RUNNING) & (s.budget_left == 0) & (parent >= 0)
    assert (traj["avail"][spent].sum(-1) == 1).all() and traj["avail"][spent][:, env.RETURN].all()
    # Costs add up: at each episode end, return = success - tick_cost * ticks - step_cost * steps.
    d, info = traj["done"], traj["info"]
    expect = info["success"] - float(params.tick_cost) * info["ticks"] - float(params.step_cost) * info["thread_steps"]
    np.testing.assert_allclose(traj["ret"][d], expect[d], rtol=1e-5, atol=1e-4)
    return d.sum()


@pytest.mark.parametrize("k, n, budget", [(1, 2, 4096), (3, 3, 5), (4, 4, 4096), (6, 4, 7), (3, 5, 9)])
def test_random_masked_play_never_reaches_an_illegal_state(k, n, budget):
    env = parallel_search.ParallelSearch(num_threads=k, num_numbers=n, bank_size=8)
    numbers, targets = mixed_bank(n, 64, seed=k)
    params = parallel_search.make_params(
        numbers, targets, thread_budget=budget, max_ticks=40, compute_budget=90, tick_cost=0.01, step_cost=0.003
    )
    traj = random_rollout(env, params, num_envs=64, num_steps=120, seed=k + n)
    episodes = check_invariants(env, params, traj)
    assert episodes > 50
    assert traj["info"]["success"].any() or n == 2
    assert (traj["info"]["children"] > 0).any() or k == 1
