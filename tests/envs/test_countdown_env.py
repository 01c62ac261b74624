"""Countdown-v0 against the plain-Python oracle, and its JAX properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import envs
from envs import countdown
from tests import oracle


@functools.cache
def small_env(n):
    """Small numbers so that random play often solves; a bank with zeros via make_params."""
    env = countdown.Countdown(num_numbers=n, min_target=1, max_target=30, max_number=9, bank_size=512)
    numbers, targets = np.array(env.default_params.numbers), np.array(env.default_params.targets)
    numbers[::7, 0] = 0  # zeros exercise division by zero and sub to 0 (bank need not be solvable)
    return env, countdown.make_params(numbers, targets)


def policy(key, mask, num_actions, legal_prob=0.8):
    """Mostly legal actions, sometimes any id in [-2, A+2) (illegal and out-of-range)."""
    k1, k2, k3 = jax.random.split(key, 3)
    legal = jax.random.categorical(k1, jnp.where(mask, 0.0, -jnp.inf))
    anything = jax.random.randint(k2, (), -2, num_actions + 2)
    use_legal = (jax.random.uniform(k3) < legal_prob) & mask.any()
    return jnp.where(use_legal, legal, anything).astype(jnp.int32)


def make_rollout(env, num_envs, num_steps):
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def rollout(key, params):
        k_reset, k_run = jax.random.split(key)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), params)
        mask = jax.vmap(env.action_mask, in_axes=(0, None))(state, params)

        def body(carry, key):
            obs, state, mask = carry
            k_act, k_step = jax.random.split(key)
            action = jax.vmap(policy, in_axes=(0, 0, None))(jax.random.split(k_act, num_envs), mask, env.num_actions)
            obs2, state2, reward, term, trunc, info = step(jax.random.split(k_step, num_envs), state, action, params)
            out = dict(
                obs=obs,
                action=action,
                next_obs=obs2,
                reward=reward,
                terminated=term,
                truncated=trunc,
                illegal=info["illegal_action"],
                final_obs=info["final_observation"],
                mask=info["action_mask"],
                solved=info["solved"],
            )
            return (obs2, state2, info["action_mask"]), out

        _, traj = jax.lax.scan(body, (obs, state, mask), jax.random.split(k_run, num_steps))
        return traj, mask

    return rollout


def oracle_reset_from_obs(py, obs, n):
    count = int(sum(obs[1 + n :]))
    return py.reset([int(x) for x in obs[1 : 1 + count]], int(obs[0]))


@pytest.mark.parametrize("n", [3, 4, 5])
def test_agrees_with_python_oracle_over_10k_steps(n):
    env, params = small_env(n)
    num_envs, num_steps = 64, 160  # 10,240 steps
    traj, first_mask = jax.jit(make_rollout(env, num_envs, num_steps))(jax.random.PRNGKey(n), params)
    traj = jax.tree.map(np.asarray, traj)
    first_mask = np.asarray(first_mask)
    stats = dict(illegal=0, solved=0, episodes=0)
    for e in range(num_envs):
        py = oracle.PyCountdown(n)
        assert oracle_reset_from_obs(py, traj["obs"][0, e], n) == traj["obs"][0, e].tolist()
        assert py.mask() == first_mask[e].tolist()
        for t in range(num_steps):
            assert py.obs() == traj["obs"][t, e].tolist()
            obs, reward, done, illegal = py.step(int(traj["action"][t, e]))
            assert obs == traj["final_obs"][t, e].tolist(), (e, t)
            assert reward == traj["reward"][t, e]
            assert done == traj["terminated"][t, e]
            assert illegal == traj["illegal"][t, e]
            assert not traj["truncated"][t, e]
            assert traj["solved"][t, e] == (reward == 1.0)
            if done:
                stats["episodes"] += 1
                stats["illegal"] += illegal
                stats["solved"] += reward == 1.0
                oracle_reset_from_obs(py, traj["next_obs"][t, e], n)
                assert py.obs() == traj["next_obs"][t, e].tolist()
            else:
                assert obs == traj["next_obs"][t, e].tolist()
            assert py.mask() == traj["mask"][t, e].tolist(), (e, t)
    # The sample covers the interesting cases.
    assert stats["illegal"] > 50 and stats["solved"] > 20 and stats["episodes"] > 1000


def test_reset_draws_from_the_bank_and_obs_layout():
    env, params = envs.make("Countdown-v0", num_numbers=4)
    assert env.num_actions == 24
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(0), 256), params)
    np.testing.assert_array_equal(obs[:, 0], params.targets[state.problem])
    np.testing.assert_array_equal(obs[:, 1:5], params.numbers[state.problem])
    np.testing.assert_array_equal(obs[:, 5:], 1)
    assert env.observation_space(params).shape == (9,) and env.action_space(params).n == 24
    assert bool(jax.vmap(env.observation_space(params).contains)(obs).all())
    assert len(np.unique(np.asarray(state.problem))) > 200  # uniform over a 10k bank


def test_solver_actions_solve_in_the_env():
    env, params = envs.make("Countdown-v0", num_numbers=4)
    _obs, state = env.reset(jax.random.PRNGKey(3), params)
    solvable, actions = countdown.solve(state.numbers, state.target)
    assert bool(solvable)  # bank problems are all solvable
    key = jax.random.PRNGKey(4)
    for _k, a in enumerate(np.asarray(actions)):
        _obs, state, reward, term, _trunc, info = env.step(key, state, int(a), params)
    assert float(reward) == 1.0 and bool(term) and bool(info["solved"])


def test_jit_equals_eager_and_determinism():
    env, params = small_env(4)
    key = jax.random.PRNGKey(7)

    def run(step_fn, reset_fn):
        obs, state = reset_fn(key, params)
        out = []
        for t in range(12):
            mask = env.action_mask(state, params)
            a = policy(jax.random.fold_in(key, t), mask, env.num_actions)
            obs, state, r, te, _tr, info = step_fn(jax.random.fold_in(key, 100 + t), state, a, params)
            out.append((obs, r, te, info["action_mask"], info["final_observation"]))
        return jax.tree.map(np.asarray, out)

    eager = run(env.step, env.reset)
    jitted = run(jax.jit(env.step), jax.jit(env.reset))
    again = run(jax.jit(env.step), jax.jit(env.reset))
    chex.assert_trees_all_equal(eager, jitted)
    chex.assert_trees_all_equal(jitted, again)


def test_vmap_equals_per_env_loop():
    env, params = small_env(3)
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    _obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    actions = jnp.arange(8, dtype=jnp.int32) % env.num_actions
    out = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, state, actions, params)
    for e in range(8):
        st = jax.tree.map(lambda x: x[e], state)
        single = env.step(keys[e], st, int(actions[e]), params)
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[e], out), single)


def test_no_retracing_and_stable_shapes_across_auto_reset():
    env, params = small_env(4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, state, action, params):
        return env.step(key, state, action, params)

    obs, state = env.reset(jax.random.PRNGKey(0), params)
    spec = jax.tree.map(lambda x: (x.shape, x.dtype), (obs, state))
    resets = 0
    for t in range(60):
        key = jax.random.PRNGKey(t)
        action = jnp.int32(t % env.num_actions)
        obs, state, r, te, tr, info = step(key, state, action, params)
        resets += int(te)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), (obs, state)) == spec
        assert r.dtype == jnp.float32 and te.dtype == jnp.bool_ and tr.dtype == jnp.bool_
        assert info["action_mask"].shape == (24,) and info["final_observation"].shape == (9,)
    assert resets > 10
    chex.clear_trace_counter()


def test_bad_input_gives_one_line_errors():
    env, params = envs.make("Countdown-v0", num_numbers=3)
    _obs, state = env.reset(jax.random.PRNGKey(0), params)
    for bad in (12, -1, 100):
        with pytest.raises(ValueError, match=f"action={bad} is out of range: expected 0 <= action < 12"):
            env.step(jax.random.PRNGKey(0), state, bad, params)
    with pytest.raises(ValueError, match="expected an integer"):
        env.step(jax.random.PRNGKey(0), state, 1.5, params)
    with pytest.raises(ValueError, match="unknown environment id 'Countdown-v9'"):
        envs.make("Countdown-v9")
    for n in (1, 7, "4"):
        with pytest.raises(ValueError, match=f"num_numbers={n!r} is out of range"):
            envs.make("Countdown-v0", num_numbers=n)
    with pytest.raises(TypeError, match="make\\('Countdown-v0'\\)"):
        envs.make("Countdown-v0", colour="red")
    with pytest.raises(ValueError, match="problem bank shapes"):
        countdown.make_params(np.zeros((3, 4)), np.zeros(2))
    # Under jit an out-of-range id is simply illegal.
    _, _, r, te, _, info = jax.jit(env.step)(jax.random.PRNGKey(0), state, jnp.int32(99), params)
    assert bool(te) and bool(info["illegal_action"]) and float(r) == 0.0


def test_registry():
    assert "Countdown-v0" in envs.registered_envs()
    env, params = envs.make("Countdown-v0", num_numbers=5, bank_size=64)
    assert params.numbers.shape == (64, 5) and env.num_actions == 40


def test_sharded_batch_and_pmap_equal_one_device():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (fake) devices")
    env, params = small_env(4)

    # A batch axis sharded over 8 devices with NamedSharding under jit.
    mesh = Mesh(np.array(devices[:8]), ("batch",))
    shard = NamedSharding(mesh, PartitionSpec("batch"))
    repl = NamedSharding(mesh, PartitionSpec())
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    keys = jax.device_put(jax.random.split(jax.random.PRNGKey(9), 64), shard)
    params_r = jax.device_put(params, repl)
    _obs, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)), out_shardings=shard)(keys, params_r)
    actions = jax.device_put(jnp.arange(64, dtype=jnp.int32) % 24, shard)
    sharded = jax.jit(step)(keys, state, actions, params_r)
    assert sharded[0].sharding.is_equivalent_to(shard, 2)
    assert len(sharded[0].sharding.device_set) == 8
    unsharded = step(
        jax.device_put(keys, devices[0]),
        jax.device_put(state, devices[0]),
        jnp.arange(64, dtype=jnp.int32) % 24,
        params,
    )
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, sharded), jax.tree.map(np.asarray, unsharded))

    # A whole rollout (lax.scan of steps with auto-resets) per env, envs sharded.
    def rollout_from_keys(keys, params):
        def one(key):
            return make_rollout(env, 1, 20)(key, params)

        return jax.vmap(one)(keys)

    keys64 = jax.random.split(jax.random.PRNGKey(11), 64)
    one_dev = jax.tree.map(np.asarray, jax.jit(rollout_from_keys)(keys64, params))
    many = jax.jit(rollout_from_keys, in_shardings=(shard, repl))(jax.device_put(keys64, shard), params_r)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, many), one_dev)

    # jax.pmap users: 8 devices x 8 envs each.
    pm_out = jax.pmap(rollout_from_keys, in_axes=(0, None))(keys64.reshape(8, 8, -1), params)
    pm_out = jax.tree.map(lambda x: np.asarray(x).reshape((64,) + x.shape[2:]), pm_out)
    chex.assert_trees_all_equal(pm_out, one_dev)


def test_a_bank_of_another_number_count_is_refused():
    """A 3-number problem bank given to a 4-number env would reset with an observation
    shorter than its space: a one-line error instead, eagerly, under jit and under vmap."""
    env, params4 = envs.make("Countdown-v0", num_numbers=4)
    _, params3 = envs.make("Countdown-v0", num_numbers=3)
    key = jax.random.key(0)
    message = r"^params hold problems of 3 numbers: expected 4-number problems \(the env's num_numbers"
    with pytest.raises(ValueError, match=message):
        env.reset(key, params3)
    with pytest.raises(ValueError, match=message):
        jax.jit(env.reset)(key, params3)
    with pytest.raises(ValueError, match=message):
        jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, 2), params3)
    obs, _ = env.reset(key, params4)
    assert obs.shape == env.observation_space(params4).shape
