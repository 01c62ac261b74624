"""API conformance of every registered environment, single- and multi-agent (after pgx's api_test).

Each env is driven through one small adapter (reset / random masked actions / step / masks)
so that the checks below are the same for both APIs: shapes and dtypes stable across
auto-reset, observations inside their spaces, masks non-empty while not done, jit == eager,
vmap == a loop, no re-tracing, determinism, and auto-reset to ``reset(split(key)[1])``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs

# Small, fast settings per id; an id not listed here is built with its defaults.
KWARGS = {
    "Countdown-v0": dict(num_numbers=3, min_target=1, max_target=20, max_number=9, bank_size=64),
    "ParallelSearch-v0": dict(
        num_threads=3, num_numbers=3, min_target=1, max_target=20, max_number=9, bank_size=64, max_ticks=12
    ),
}
ENV_IDS = envs.registered_envs()


@functools.cache
def make(env_id):
    return envs.make(env_id, **KWARGS.get(env_id, {}))


def is_multi(env):
    return isinstance(env, envs.MultiAgentEnv)


def masks(env, state, params):
    """bool[(K,) A]: available actions (stacked over agents for multi-agent envs)."""
    if is_multi(env):
        avail = env.get_avail_actions(state, params)
        return jnp.stack([avail[a] for a in env.agents])
    return env.action_mask(state, params)


def sample(env, key, mask):
    act = jax.random.categorical(key, jnp.where(mask, 0.0, -jnp.inf), axis=-1).astype(jnp.int32)
    return {a: act[i] for i, a in enumerate(env.agents)} if is_multi(env) else act


def step(env, key, state, action, params):
    """(obs, state, reward, done, info) for either API."""
    if is_multi(env):
        obs, state, rewards, dones, info = env.step(key, state, action, params)
        return obs, state, jnp.stack([rewards[a] for a in env.agents]), dones["__all__"], info
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)
    return obs, state, reward, terminated | truncated, info


def obs_spaces(env, params):
    if is_multi(env):
        return {a: env.observation_space(a) for a in env.agents}
    return env.observation_space(params)


def action_count(env, params):
    return env.action_space(env.agents[0]).n if is_multi(env) else env.action_space(params).n


def rollout(env, params, key, num_steps):
    """A scan of random masked steps from reset; returns the per-step outputs."""
    k0, k1 = jax.random.split(key)
    obs, state = env.reset(k0, params)

    def body(carry, key):
        obs, state = carry
        ka, ks = jax.random.split(key)
        mask = masks(env, state, params)
        obs2, state2, reward, done, _info = step(env, ks, state, sample(env, ka, mask), params)
        return (obs2, state2), dict(obs=obs, mask=mask, reward=reward, done=done, next_obs=obs2, state=state, key=ks)

    _, traj = jax.lax.scan(body, (obs, state), jax.random.split(k1, num_steps))
    return traj


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reset_matches_spaces(env_id):
    env, params = make(env_id)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    spaces_ = obs_spaces(env, params)
    for o, sp in zip(jax.tree.leaves(obs), jax.tree.leaves(spaces_, is_leaf=lambda x: hasattr(x, "contains"))):
        assert o.shape == sp.shape and o.dtype == sp.dtype and bool(sp.contains(o))
    m = masks(env, state, params)
    assert m.dtype == jnp.bool_ and m.shape[-1] == action_count(env, params)
    if is_multi(env):
        assert len(env.agents) == env.num_agents == m.shape[0]
        obs2, _ = env.reset(jax.random.PRNGKey(0))  # default params, JaxMARL-style call
        assert set(obs2) == set(env.agents)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_rollout_shapes_dtypes_masks_and_spaces(env_id):
    env, params = make(env_id)
    traj = jax.jit(jax.vmap(lambda k: rollout(env, params, k, 48)))(jax.random.split(jax.random.PRNGKey(1), 8))
    obs0, _ = env.reset(jax.random.PRNGKey(0), params)
    for o, o0 in zip(jax.tree.leaves(traj["next_obs"]), jax.tree.leaves(obs0)):
        assert o.shape == (8, 48) + o0.shape and o.dtype == o0.dtype
    spaces_ = obs_spaces(env, params)
    for o, sp in zip(
        jax.tree.leaves(traj["next_obs"]), jax.tree.leaves(spaces_, is_leaf=lambda x: hasattr(x, "contains"))
    ):
        flat = o.reshape((-1,) + sp.shape)
        assert bool(jnp.all(jax.vmap(sp.contains)(flat)))
    assert traj["reward"].dtype == jnp.float32 and traj["done"].dtype == jnp.bool_
    assert bool(traj["mask"].any(-1).all())  # every state handed out (never a done one) has a move
    assert bool(traj["done"].any())  # auto-reset was exercised


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_auto_reset_starts_from_reset_of_the_split_key(env_id):
    env, params = make(env_id)
    traj = jax.jit(lambda k: rollout(env, params, k, 64))(jax.random.PRNGKey(2))
    done = np.asarray(traj["done"])
    assert done.any()
    for t in np.flatnonzero(done)[:3]:
        expect, _ = env.reset(jax.random.split(traj["key"][t])[1], params)
        got = jax.tree.map(lambda x: x[t], traj["next_obs"])
        chex.assert_trees_all_equal(got, expect)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_jit_equals_eager_and_is_deterministic(env_id):
    env, params = make(env_id)
    key = jax.random.PRNGKey(3)

    def run(step_fn, key):
        obs, state = env.reset(key, params)
        outs = []
        for t in range(6):
            ka, ks = jax.random.split(jax.random.fold_in(key, t))
            action = sample(env, ka, masks(env, state, params))
            obs, state, reward, done, info = step_fn(ks, state, action)
            outs.append((obs, reward, done, info))
        return outs, state

    eager = run(lambda k, s, a: step(env, k, s, a, params), key)
    jitted_step = jax.jit(lambda k, s, a: step(env, k, s, a, params))
    jitted = run(jitted_step, key)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(jitted, run(jitted_step, key))
    other = run(jitted_step, jax.random.PRNGKey(4))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jitted[1]), jax.tree.leaves(other[1])))


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_vmap_matches_a_loop(env_id):
    env, params = make(env_id)
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    _obs, states = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    actions = jax.vmap(lambda k, s: sample(env, k, masks(env, s, params)))(keys, states)
    batched = jax.vmap(lambda k, s, a: step(env, k, s, a, params))(keys, states, actions)
    single_step = jax.jit(lambda k, s, a: step(env, k, s, a, params))
    for i in range(4):
        single = single_step(keys[i], jax.tree.map(lambda x: x[i], states), jax.tree.map(lambda x: x[i], actions))
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batched), single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_no_retracing(env_id):
    env, params = make(env_id)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(key, state, action, params):
        return step(env, key, state, action, params)

    chex.clear_trace_counter()
    _obs, state = env.reset(jax.random.PRNGKey(6), params)
    for t in range(5):
        key = jax.random.PRNGKey(t)
        _obs, state, *_ = jitted(key, state, sample(env, key, masks(env, state, params)), params)
    jax.block_until_ready(state)


def test_registry_lists_both_kinds_and_make_returns_env_and_params():
    assert {"Countdown-v0", "ParallelSearch-v0"} <= set(envs.registered_envs())
    for env_id in ENV_IDS:
        out = envs.make(env_id, **KWARGS.get(env_id, {}))
        assert isinstance(out, tuple) and len(out) == 2, env_id
        env, params = out
        assert isinstance(env, (envs.Environment, envs.MultiAgentEnv))
        assert jax.tree.structure(params) == jax.tree.structure(env.default_params)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_info_has_terminated_and_truncated(env_id):
    # gymnax 1.0: info["terminated"] | info["truncated"] is the step's done, never both at once.
    env, params = make(env_id)
    key = jax.random.PRNGKey(3)
    _obs, state = env.reset(key, params)
    ended = 0
    for i in range(40):
        ka, ks = jax.random.split(jax.random.fold_in(key, i))
        _obs, state, _, done, info = step(env, ks, state, sample(env, ka, masks(env, state, params)), params)
        assert info["terminated"].dtype == jnp.bool_ and info["truncated"].dtype == jnp.bool_
        assert bool(info["terminated"] | info["truncated"]) == bool(done)
        assert not bool(info["terminated"] & info["truncated"])
        ended += bool(done)
    assert ended > 0
