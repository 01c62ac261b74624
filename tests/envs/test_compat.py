"""envs.compat under the peers' own wrappers and training loops (needs the ``compat`` extra).

A PureJaxRL-style PPO loop on ``to_gymnax(Countdown-v0)`` under gymnax's LogWrapper and
FlattenObservationWrapper, and an IPPO-style loop (shared parameters, batchify over agents)
on ``to_jaxmarl(ParallelSearch-v0)`` under JaxMARL's LogWrapper.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gymnax = pytest.importorskip("gymnax")
jaxmarl = pytest.importorskip("jaxmarl")
optax = pytest.importorskip("optax")

from gymnax.wrappers.purerl import FlattenObservationWrapper, LogWrapper  # noqa: E402
from jaxmarl.wrappers.baselines import LogWrapper as MARLLogWrapper  # noqa: E402

import envs  # noqa: E402
from envs import compat  # noqa: E402


# ------------------------------------------------------------------------------ a tiny actor-critic
def mlp_init(key, sizes):
    params = []
    for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes)):
        params.append((jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), jnp.zeros(b)))
    return params


def mlp(params, x):
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def init_ac(key, obs_dim, num_actions, hidden=64):
    ka, kc = jax.random.split(key)
    actor = mlp_init(ka, [obs_dim, hidden, hidden, num_actions])
    actor[-1] = (actor[-1][0] * 0.01, actor[-1][1])
    return {"actor": actor, "critic": mlp_init(kc, [obs_dim, hidden, hidden, 1])}


def apply_ac(params, obs, mask=None):
    x = obs.astype(jnp.float32) / 50.0
    logits = mlp(params["actor"], x)
    if mask is not None:
        logits = jnp.where(mask, logits, -1e9)
    return logits, mlp(params["critic"], x)[..., 0]


def ppo_update(params, opt_state, tx, traj, last_value, gamma=0.99, lam=0.95, clip=0.2, epochs=4):
    """GAE + clipped PPO on a [T, B] batch (one minibatch per epoch, PureJaxRL's loss)."""

    def gae_step(carry, t):
        adv, next_value = carry
        delta = t["reward"] + gamma * next_value * (1 - t["done"]) - t["value"]
        adv = delta + gamma * lam * (1 - t["done"]) * adv
        return (adv, t["value"]), adv

    _, adv = jax.lax.scan(gae_step, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
    targets = adv + traj["value"]

    def loss_fn(p):
        logits, value = apply_ac(p, traj["obs"], traj.get("mask"))
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, traj["action"][..., None], -1)[..., 0]
        ratio = jnp.exp(logp - traj["logp"])
        a = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip, 1 + clip) * a).mean()
        vf = 0.5 * ((value - targets) ** 2).mean()
        ent = -(jnp.exp(logp_all) * jnp.where(logp_all > -1e8, logp_all, 0.0)).sum(-1).mean()
        return pg + 0.5 * vf - 0.01 * ent

    def epoch(carry, _):
        p, o = carry
        grads = jax.grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), None

    (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state), None, epochs)
    return params, opt_state


# ------------------------------------------------------------------------------ PPO on gymnax
def make_ppo(env, env_params, num_envs=64, num_steps=8, num_updates=150, lr=3e-3):
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(lr))
    num_actions = env.action_space(env_params).n
    obs_dim = env.observation_space(env_params).shape[0]

    def train(key, learn: bool):
        k_init, k_reset, k_run = jax.random.split(key, 3)
        params = init_ac(k_init, obs_dim, num_actions)
        opt_state = tx.init(params)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), env_params)

        def update(carry, key):
            params, opt_state, obs, state = carry

            def env_step(carry, key):
                obs, state = carry
                ka, ks = jax.random.split(key)
                logits, value = apply_ac(params, obs)
                logits = jnp.where(learn, logits, 0.0)  # learn=False: uniformly random actions
                action = jax.random.categorical(ka, logits)
                logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
                obs2, state2, reward, term, trunc, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                    jax.random.split(ks, num_envs), state, action, env_params
                )
                t = dict(
                    obs=obs,
                    action=action,
                    logp=logp,
                    value=value,
                    reward=reward,
                    done=(term | trunc).astype(jnp.float32),
                )
                log = (info["returned_episode_returns"], term | trunc)
                return (obs2, state2), (t, log)

            (obs, state), (traj, log) = jax.lax.scan(env_step, (obs, state), jax.random.split(key, num_steps))
            _, last_value = apply_ac(params, obs)
            new_params, new_opt = ppo_update(params, opt_state, tx, traj, last_value)
            params = jax.tree.map(lambda n, o: jnp.where(learn, n, o), new_params, params)
            rets, dones = log
            mean_return = (rets * dones).sum() / jnp.maximum(dones.sum(), 1)
            return (params, new_opt, obs, state), mean_return

        _, returns = jax.lax.scan(update, (params, opt_state, obs, state), jax.random.split(k_run, num_updates))
        return returns

    return jax.jit(train, static_argnums=1)


@pytest.mark.slow
def test_ppo_on_to_gymnax_countdown_improves_over_random():
    base, _ = envs.make("Countdown-v0", num_numbers=3, min_target=1, max_target=20, max_number=9, bank_size=1000)
    genv = compat.to_gymnax(base)
    assert isinstance(genv, gymnax.environments.environment.Environment)
    env = LogWrapper(FlattenObservationWrapper(genv))
    env_params = genv.default_params
    assert env.observation_space(env_params).shape == (7,) and env.action_space(env_params).n == 12
    train = make_ppo(env, env_params)
    random_returns = np.asarray(train(jax.random.PRNGKey(0), False))
    returns = np.asarray(train(jax.random.PRNGKey(0), True))
    assert np.isfinite(returns).all()
    random_mean, final_mean = random_returns.mean(), returns[-20:].mean()
    print(f"PPO on Countdown-v0 (N=3): random {random_mean:.3f}, after training {final_mean:.3f}")
    assert final_mean > random_mean + 0.1


# ------------------------------------------------------------------------------ IPPO on JaxMARL
def batchify(x: dict, agents, num_actors):
    return jnp.stack([x[a] for a in agents]).reshape((num_actors, -1))


def unbatchify(x, agents, num_envs):
    x = x.reshape((len(agents), num_envs, -1))
    return {a: x[i] for i, a in enumerate(agents)}


def test_ippo_on_to_jaxmarl_parallel_search_compiles_and_runs():
    base, _params = envs.make(
        "ParallelSearch-v0",
        num_threads=3,
        num_numbers=3,
        min_target=1,
        max_target=20,
        max_number=9,
        bank_size=500,
        max_ticks=30,
        tick_cost=0.01,
        step_cost=0.005,
    )
    menv = compat.to_jaxmarl(base)
    assert isinstance(menv, jaxmarl.environments.multi_agent_env.MultiAgentEnv)
    env = MARLLogWrapper(menv)
    agents, num_envs, num_steps = env.agents, 32, 16
    num_actors = len(agents) * num_envs
    num_actions = env.action_space(agents[0]).n
    tx = optax.adam(1e-3)

    def train(key, num_updates):
        k_init, k_reset, k_run = jax.random.split(key, 3)
        ac = init_ac(k_init, env.observation_space(agents[0]).shape[0], num_actions)
        opt_state = tx.init(ac)
        obs, state = jax.vmap(env.reset)(jax.random.split(k_reset, num_envs))

        def update(carry, key):
            ac, opt_state, obs, state = carry

            def env_step(carry, key):
                obs, state = carry
                ka, ks = jax.random.split(key)
                avail = jax.vmap(env.get_avail_actions)(state.env_state)
                mask = batchify(avail, agents, num_actors).astype(bool)
                obs_b = batchify(obs, agents, num_actors)
                logits, value = apply_ac(ac, obs_b, mask)
                action = jax.random.categorical(ka, logits)
                logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
                env_act = {a: v[:, 0] for a, v in unbatchify(action, agents, num_envs).items()}
                obs2, state2, reward, done, info = jax.vmap(env.step)(jax.random.split(ks, num_envs), state, env_act)
                info = jax.tree.map(lambda x: x.reshape((num_actors,)), info)
                t = dict(
                    obs=obs_b,
                    mask=mask,
                    action=action,
                    logp=logp,
                    value=value,
                    reward=batchify(reward, agents, num_actors)[:, 0],
                    done=batchify(done, agents, num_actors)[:, 0].astype(jnp.float32),
                )
                return (obs2, state2), (t, info)

            (obs, state), (traj, info) = jax.lax.scan(env_step, (obs, state), jax.random.split(key, num_steps))
            _, last_value = apply_ac(ac, batchify(obs, agents, num_actors))
            ac, opt_state = ppo_update(ac, opt_state, tx, traj, last_value)
            ended = info["returned_episode"]
            stats = {
                k: (info[k] * ended).sum() / jnp.maximum(ended.sum(), 1)
                for k in ("returned_episode_returns", "success", "ticks", "illegal_actions")
            }
            return (ac, opt_state, obs, state), stats

        _, stats = jax.lax.scan(update, (ac, opt_state, obs, state), jax.random.split(k_run, num_updates))
        return stats

    stats = jax.tree.map(np.asarray, jax.jit(train, static_argnums=1)(jax.random.PRNGKey(0), 20))
    for v in stats.values():
        assert np.isfinite(v).all()
    assert (stats["illegal_actions"] == 0).all()  # masked policy
    assert stats["ticks"].max() > 0
    print(
        f"IPPO on ParallelSearch-v0: return {stats['returned_episode_returns'][:5].mean():.3f} -> "
        f"{stats['returned_episode_returns'][-5:].mean():.3f}, success {stats['success'][-5:].mean():.2f}"
    )


def test_adapters_reject_the_wrong_kind_of_env():
    with pytest.raises(ValueError, match="to_jaxmarl"):
        compat.to_gymnax(envs.make("ParallelSearch-v0", bank_size=8)[0])
    with pytest.raises(ValueError, match="to_gymnax"):
        compat.to_jaxmarl(envs.make("Countdown-v0", bank_size=8)[0])
