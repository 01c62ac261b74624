"""The shipped tiny APR policy's numbers, pinned: training forward, cached forward, engine
prefill / decode / extend and APR rollouts must keep giving what tests/data/policy_numerics.npz
holds (token ids exactly, logits and log-probabilities within 1e-5).

The reference was computed with this file's ``compute``; ``python -m tests.test_policy_numerics``
rewrites it (only do that when a change of numerics is intended).
"""

import os

if __name__ == "__main__":
    import tests.conftest  # noqa: F401  (the test session's XLA flags and platform, before jax loads)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY = os.path.join(ROOT, "experiments", "checkpoints", "tiny_apr_sft.npz")
REFERENCE = os.path.join(ROOT, "tests", "data", "policy_numerics.npz")
LAST = 8  # positions of each logits array kept
ATOL = 1e-5


def _text_ids():
    from jaxapr import traces
    from jaxapr.tokenizer import CountdownTokenizer

    text = traces.apr([4, 9, 6, 5], 23, beam_size=3, sub_call_beam_size=5, seed=0).main_calls[0]
    return CountdownTokenizer().encode(text, add_bos=True).astype(np.int32)


def compute() -> dict[str, np.ndarray]:
    """Every pinned array, from the current code."""
    from flax import nnx

    from envs import countdown
    from jaxapr import engine, policy_io, runtime

    policy = policy_io.load_policy(POLICY)
    graphdef, params = nnx.split(policy)
    ids = _text_ids()
    t = ids.size
    out = {"text_ids": ids}

    # (a) training forward
    train = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    out["train_logits"] = np.asarray(train(params, ids[None]))[0, -LAST:]

    # (b) cached forward: prefill all but the last token, then one step
    cached = jax.jit(lambda p, *a: nnx.merge(graphdef, p).forward_cached(*a))
    cache = policy.init_cache(1, t)
    pos = jnp.arange(t - 1, dtype=jnp.int32)[None]
    logits, cache = cached(params, ids[None, :-1], pos, cache, jnp.ones((1, t - 1), bool))
    out["cached_prefill_logits"] = np.asarray(logits)[0, -LAST:]
    logits, cache = cached(params, ids[None, -1:], jnp.full((1, 1), t - 1, jnp.int32), cache, jnp.ones((1, 1), bool))
    out["cached_step_logits"] = np.asarray(logits)[0]

    # (c) engine: greedy generation (prefill + decode) of three prompts
    prompts = [ids[:n] for n in (20, 45, 70)]
    gen = engine.generate(policy, prompts, max_new_tokens=64, stop_ids=())
    out["generate_tokens"], out["generate_logprobs"] = gen.tokens, gen.logprobs

    # (c') engine extend: continue two finished slots from inside their cached tokens
    eng = engine.Engine(policy, 4, max_len=256)
    slots = eng.insert([ids[:30], ids[:50]], max_new_tokens=16)
    while eng.running():
        eng.decode(16)
    eng.extend(slots, [ids[25:60], ids[40:48]], [25, 40], max_new_tokens=24)
    while eng.running():
        eng.decode(16)
    ext = eng.read(slots)
    out["extend_tokens"] = np.stack([o.tokens for o in ext])
    out["extend_logprobs"] = np.stack([o.logprobs for o in ext])

    # (d) APR rollouts of two problems, both join schedules (keep_slot runs extend)
    problems = countdown.generate_problems(jax.random.PRNGKey(0), 2)
    for join in ("reprefill", "keep_slot"):
        res = runtime.rollout(policy, problems, "apr", max_context=512, num_slots=8, join=join)
        out[f"rollout_{join}"] = np.array(
            [[r.total_tokens, r.sequential_tokens, r.num_children, r.success] for r in res], np.int64
        )
    return out


@pytest.fixture(scope="module")
def numbers():
    return compute()


def test_reference_is_small():
    assert os.path.getsize(REFERENCE) < 300_000


@pytest.mark.parametrize(
    "name", ["text_ids", "generate_tokens", "extend_tokens", "rollout_reprefill", "rollout_keep_slot"]
)
def test_ids_are_exact(numbers, name):
    with np.load(REFERENCE) as ref:
        np.testing.assert_array_equal(numbers[name], ref[name])


@pytest.mark.parametrize(
    "name", ["train_logits", "cached_prefill_logits", "cached_step_logits", "generate_logprobs", "extend_logprobs"]
)
def test_values_within_tolerance(numbers, name):
    with np.load(REFERENCE) as ref:
        np.testing.assert_allclose(numbers[name], ref[name], rtol=0, atol=ATOL)


def test_rollouts_spawned_children():
    """The keep_slot rollout exercises extend only if some parent joined children."""
    with np.load(REFERENCE) as ref:
        assert ref["rollout_keep_slot"][:, 2].sum() > 0


if __name__ == "__main__":
    arrays = compute()
    np.savez_compressed(REFERENCE, **arrays)
    for k, v in arrays.items():
        print(k, v.shape, v.dtype)
    print(REFERENCE, os.path.getsize(REFERENCE), "bytes")
