"""GRPO: rewards, group advantages, the call batch, the clipped + k3 loss against hand
computations; the jitted step (jit = eager, no re-trace, non-finite guard); engine log-probs =
training log-probs; a few steps on a tiny policy raise the log-probs of rewarded outputs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxapr import engine as engine_lib
from jaxapr import model, runtime
from jaxapr.tokenizer import CountdownTokenizer
from jaxapr.train import grpo
from jaxapr.train.sft import token_logprobs
from jaxapr.train.state import init_train_state, make_optimizer

TOK = CountdownTokenizer()
SEQ = 32


def tiny_cfg(max_len=64):
    return model.get_config("tiny", num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64, max_len=max_len)


def make_call(prompt_len, out_len, rng, eos=True, logprobs=None):
    prompt = np.concatenate([[TOK.bos_id], rng.integers(3, TOK.vocab_size, prompt_len - 1)]).astype(np.int32)
    out = rng.integers(3, TOK.vocab_size, out_len).astype(np.int32)
    if eos and out_len:
        out[-1] = TOK.eos_id
    lp = -rng.uniform(0.1, 3.0, out_len).astype(np.float32) if logprobs is None else np.asarray(logprobs, np.float32)
    return runtime.Call(
        prompt="", prompt_tokens=prompt, output_tokens=out, logprobs=lp, stopped="eos" if out_len else ""
    )


def make_result(success, calls, children=0, sequential=None):
    total = sum(len(c.output_tokens) for c in calls)
    return runtime.RolloutResult(
        nums=[1, 2, 3],
        target=6,
        success=success,
        reason="",
        text="",
        tree={},
        calls=calls,
        total_tokens=total,
        prompt_tokens=sum(len(c.prompt_tokens) for c in calls),
        sequential_tokens=total if sequential is None else sequential,
        num_children=children,
        num_spawns=int(children > 0),
        latency_steps=0,
        wall_s=0.0,
    )


def hand_results(seed=0):
    """Two problems x G=2: rollout 0 one call (solved), rollout 1 two calls plus one that
    never ran, rollouts 2 and 3 one and three calls (neither solved)."""
    rng = np.random.default_rng(seed)
    return [
        make_result(True, [make_call(5, 6, rng)]),
        make_result(False, [make_call(4, 3, rng), make_call(7, 5, rng), make_call(9, 0, rng)], children=1),
        make_result(False, [make_call(6, 8, rng, eos=False)]),
        make_result(False, [make_call(3, 4, rng), make_call(5, 2, rng), make_call(8, 7, rng)], children=2),
    ]


@pytest.fixture(scope="module")
def tiny():
    policy = model.Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(policy)
    other = nnx.split(model.Transformer(tiny_cfg(), rngs=nnx.Rngs(1)))[1]
    return policy, graphdef, params, other


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
def test_config_defaults_and_checks():
    cfg = grpo.GRPOConfig().check()
    assert (
        cfg.num_problems,
        cfg.group_size,
        cfg.learning_rate,
        cfg.clip_eps,
        cfg.beta,
        cfg.inner_epochs,
        cfg.temperature,
    ) == (64, 5, 1e-5, 0.2, 0.001, 2, 1.0)
    assert cfg.length_penalty == 0 and cfg.thread_penalty == 0
    for bad, match in (
        (dict(group_size=0), "group_size=0"),
        (dict(clip_eps=1.5), "clip_eps=1.5"),
        (dict(beta=-1.0), "beta=-1.0"),
        (dict(num_minibatches=2.5), "num_minibatches=2.5"),
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(length_measure="wall"), "length_measure"),
        (dict(call_weighting="thread"), "call_weighting='thread': expected one of"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            cfg.replace(**bad)
        assert "\n" not in str(err.value)


def test_rewards_and_group_advantages_by_hand():
    results = hand_results()
    cfg = grpo.GRPOConfig(group_size=2)
    np.testing.assert_array_equal(grpo.rewards(results, cfg), [1, 0, 0, 0])
    # shaping: 1[success] - 0.01 * generated tokens - 0.1 * children
    shaped = grpo.rewards(results, cfg.replace(length_penalty=0.01, thread_penalty=0.1))
    np.testing.assert_allclose(shaped, [1 - 0.06, -0.08 - 0.1, -0.08, -0.13 - 0.2], rtol=1e-6)
    seq = [make_result(False, [make_call(3, 4, np.random.default_rng(0))], sequential=2)]
    np.testing.assert_allclose(grpo.rewards(seq, cfg.replace(length_penalty=0.5, length_measure="sequential")), [-1.0])

    r = np.array([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [2.0, 0.5, -1.0, 0.5, 3.0]], np.float32)
    adv = grpo.group_advantages(r, eps=1e-6)
    for p in range(4):  # by hand: population std
        mean = sum(r[p]) / 5
        std = math.sqrt(sum((x - mean) ** 2 for x in r[p]) / 5)
        want = [0.0] * 5 if std == 0 else [(x - mean) / (std + 1e-6) for x in r[p]]
        np.testing.assert_allclose(adv[p], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(adv[0], [0.8164966, -1.2247449, -1.2247449, 0.8164966, 0.8164966], rtol=1e-5)
    assert (adv[1:3] == 0).all()
    with pytest.raises(ValueError, match="expected \\[num_problems, group_size\\]"):
        grpo.group_advantages(np.zeros(5))


def test_make_batch_by_hand():
    results = hand_results()
    adv = np.array([0.9, -0.9, 0.0, 0.3], np.float32)
    b = grpo.make_batch(results, adv, seq_len=SEQ, multiple_of=4)
    # 1 + 2 (the never-run call gets no row) + 1 + 3 = 7 calls -> 4 * 2 = 8 rows
    assert b["tokens"].shape == (8, SEQ) and b["old_logprobs"].shape == (8, SEQ - 1)
    np.testing.assert_array_equal(b["rollout"], [0, 1, 1, 2, 3, 3, 3, -1])
    np.testing.assert_allclose(b["advantages"], [0.9, -0.9, -0.9, 0.0, 0.3, 0.3, 0.3, 0.0])
    # 1 / (calls that generated tokens in the rollout) / (4 rollouts)
    np.testing.assert_allclose(b["weights"], [1 / 4, 1 / 8, 1 / 8, 1 / 4, 1 / 12, 1 / 12, 1 / 12, 0], rtol=1e-6)
    assert abs(b["weights"].sum() - 1.0) < 1e-6
    calls = [c for r in results for c in r.calls if len(c.output_tokens)]
    for row, c in enumerate(calls):
        n, m = len(c.prompt_tokens), len(c.output_tokens)
        np.testing.assert_array_equal(b["tokens"][row, : n + m], np.concatenate([c.prompt_tokens, c.output_tokens]))
        assert (b["tokens"][row, n + m :] == 0).all()
        np.testing.assert_array_equal(b["positions"][row, : n + m], np.arange(n + m))
        np.testing.assert_array_equal(b["segment_ids"][row], [1] * (n + m) + [0] * (SEQ - n - m))
        np.testing.assert_array_equal(b["loss_mask"][row], [0] * n + [1] * m + [0] * (SEQ - n - m))
        # old_logprobs[t] scores token t + 1: the first output token is predicted at index n - 1
        want = np.zeros(SEQ - 1, np.float32)
        want[n - 1 : n - 1 + m] = c.logprobs
        np.testing.assert_array_equal(b["old_logprobs"][row], want)
    assert not b["segment_ids"][7].any() and not b["loss_mask"][7].any()
    # weighting="call": every trained call 1 / 7; "token": its generated tokens / all 35
    # (6 + 3 + 5 + 8 + 4 + 2 + 7); the same rows otherwise
    per_call = grpo.make_batch(results, adv, seq_len=SEQ, multiple_of=4, weighting="call")
    per_token = grpo.make_batch(results, adv, seq_len=SEQ, multiple_of=4, weighting="token")
    np.testing.assert_allclose(per_call["weights"], [1 / 7] * 7 + [0], rtol=1e-6)
    np.testing.assert_allclose(per_token["weights"], np.array([6, 3, 5, 8, 4, 2, 7, 0]) / 35, rtol=1e-6)
    for other in (per_call, per_token):
        assert all(np.array_equal(other[k], b[k]) for k in b if k != "weights")
    with pytest.raises(ValueError, match="weighting='calls': expected one of"):
        grpo.make_batch(results, adv, seq_len=SEQ, weighting="calls")
    assert grpo.make_batch(results, adv, seq_len=SEQ, num_rows=12)["tokens"].shape == (12, SEQ)
    assert grpo.make_batch(results, adv, seq_len=SEQ)["tokens"].shape == (7, SEQ)
    assert [grpo.bucket_rows(n, 3) for n in (1, 3, 4, 7, 13)] == [3, 3, 6, 9, 15]
    # four buckets per doubling: 5, 6, 7, 8 | 10, 12, 14, 16 | 20, 24, 28, 32 | ... (x multiple_of)
    assert [grpo.bucket_rows(n) for n in (5, 8, 9, 11, 16, 17, 25, 33, 300)] == [5, 8, 10, 12, 16, 20, 28, 40, 320]
    for n in range(1, 600):
        b = grpo.bucket_rows(n, 2)
        assert b % 2 == 0 and b >= n and (b - n <= 3 or (b - n) / b < 0.25), (n, b)
    with pytest.raises(
        ValueError, match="rollout 3 call 2 has 8 prompt \\+ 7 output = 15 tokens: expected <= seq_len=14"
    ):
        grpo.make_batch(results, adv, seq_len=14)
    with pytest.raises(ValueError, match="num_rows=6"):
        grpo.make_batch(results, adv, seq_len=SEQ, num_rows=6)
    with pytest.raises(ValueError, match="3 advantages for 4 rollouts"):
        grpo.make_batch(results, adv[:3], seq_len=SEQ)


def test_pack_rows_first_fit_longest_first():
    # hand_results' trained calls have 11, 7, 12, 14, 7, 7, 15 tokens
    assert grpo.pack_rows([11, 7, 12, 14, 7, 7, 15], 32) == [[6, 3], [2, 0, 1], [4, 5]]
    assert grpo.pack_rows([11, 7, 12, 14, 7, 7, 15], 15) == [[6], [3], [2], [0], [1, 4], [5]]
    assert grpo.pack_rows([], 8) == []
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 40, rng.integers(1, 30)).tolist()
        rows = grpo.pack_rows(lengths, 40)
        assert sorted(j for r in rows for j in r) == list(range(len(lengths)))  # each call exactly once
        assert all(sum(lengths[j] for j in r) <= 40 for r in rows)
        assert sum(lengths) / 40 <= len(rows) <= len(lengths)
    with pytest.raises(ValueError, match="a call of 9 tokens does not fit seq_len=8"):
        grpo.pack_rows([3, 9], 8)
    results = hand_results()
    assert grpo.rows_needed(results, SEQ, pack=True) == 3 and grpo.rows_needed(results, SEQ, pack=False) == 7


def test_packed_batch_layout_and_same_loss_and_gradient(tiny):
    _, graphdef, params, ref_params = tiny
    results = hand_results()
    adv = np.array([1.0, -0.5, 0.7, -1.2], np.float32)
    flat = grpo.make_batch(results, adv, seq_len=SEQ, multiple_of=2)
    packed = grpo.make_batch(results, adv, seq_len=SEQ, multiple_of=2, pack=True)
    assert packed["tokens"].shape == (4, SEQ) and flat["tokens"].shape == (8, SEQ)  # 3 rows (+1 padding) vs 7 (+1)
    assert "advantages" not in packed and "rollout" not in packed
    calls = [(i, c) for i, r in enumerate(results) for c in r.calls if len(c.output_tokens)]
    weights = {0: 1 / 4, 1: 1 / 8, 2: 1 / 4, 3: 1 / 12}  # 1 / (calls of the rollout) / (4 rollouts)
    for row, members in enumerate(grpo.pack_rows([len(c.prompt_tokens) + len(c.output_tokens) for _, c in calls], SEQ)):
        off = 0
        for seg, j in enumerate(members, 1):
            i, c = calls[j]
            n, m = len(c.prompt_tokens), len(c.output_tokens)
            np.testing.assert_array_equal(
                packed["tokens"][row, off : off + n + m], np.concatenate([c.prompt_tokens, c.output_tokens])
            )
            np.testing.assert_array_equal(packed["positions"][row, off : off + n + m], np.arange(n + m))
            assert (packed["segment_ids"][row, off : off + n + m] == seg).all()
            np.testing.assert_array_equal(packed["loss_mask"][row, off : off + n + m], [0] * n + [1] * m)
            np.testing.assert_array_equal(packed["old_logprobs"][row, off + n - 1 : off + n - 1 + m], c.logprobs)
            np.testing.assert_allclose(
                packed["token_weights"][row, off + n - 1 : off + n - 1 + m], weights[i] / m, rtol=1e-6
            )
            assert (packed["token_advantages"][row, off + n - 1 : off + n - 1 + m] == adv[i]).all()
            off += n + m
        assert not packed["segment_ids"][row, off:].any()
    np.testing.assert_allclose(packed["token_weights"].sum(), 1.0, rtol=1e-6)
    # weighting="token" packed: every generated token of the batch weighs 1 / 35
    per_token = grpo.make_batch(results, adv, seq_len=SEQ, multiple_of=2, pack=True, weighting="token")
    np.testing.assert_allclose(per_token["token_weights"][per_token["loss_mask"][:, 1:] > 0], 1 / 35, rtol=1e-6)
    assert not per_token["token_weights"][per_token["loss_mask"][:, 1:] == 0].any()
    assert not packed["segment_ids"][3].any() and not packed["token_weights"][3].any()
    # the same loss, metrics and gradient as one call per row (old log-probs moved off-policy)
    for b in (flat, packed):
        logp = np.asarray(token_logprobs(graphdef, params, b["tokens"], b["positions"], b["segment_ids"]))
        shift = np.where(b["positions"][:, 1:] % 3 == 0, 0.4, -0.3).astype(np.float32)  # by place in the call
        b["old_logprobs"] = np.where(b["loss_mask"][:, 1:] > 0, logp + shift, 0.0).astype(np.float32)

    def vg(b):
        return jax.value_and_grad(lambda p: grpo.grpo_loss(graphdef, p, ref_params, b, 0.2, 0.05), has_aux=True)(params)

    (lf, mf), gf = vg(flat)
    (lp, mp), gp = vg(packed)
    assert float(mf["clip_fraction"]) > 0 and float(mf["kl"]) > 0
    np.testing.assert_allclose(float(lp), float(lf), rtol=1e-5)
    for k in ("pg_loss", "kl", "clip_fraction", "ratio_mean", "tokens"):
        np.testing.assert_allclose(float(mp[k]), float(mf[k]), rtol=1e-5, err_msg=k)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(gf)) > 1e-4
    for x, y in zip(jax.tree.leaves(gp), jax.tree.leaves(gf)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)
    # the whole step too: one minibatch, one epoch (row shuffles cannot differ), plain SGD
    cfg = grpo.GRPOConfig(group_size=2, num_minibatches=1, inner_epochs=1, beta=0.05, micro_batch_tokens=2 * SEQ)
    tx = optax.sgd(0.1)
    policy = nnx.merge(graphdef, params)
    outs = []
    for b in (flat, packed):
        gd, state = init_train_state(policy, tx)
        state = jax.tree.map(jnp.copy, state)
        outs.append(grpo.make_grpo_step(gd, tx, cfg)(state, grpo.reference_params(ref_params), b, jax.random.key(0)))
    (sf, mf2), (sp, mp2) = outs
    np.testing.assert_allclose(float(mp2["loss"]), float(mf2["loss"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(sp.params), jax.tree.leaves(sf.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    batch, stats = grpo.build_batch(results, cfg.replace(pack_calls=True), seq_len=SEQ)
    assert stats["calls"] == 7 and stats["rows"] == 3 and "token_weights" in batch
    with pytest.raises(ValueError, match="expected an int >= the number of packed rows \\(3\\)"):
        grpo.make_batch(results, adv, seq_len=SEQ, num_rows=2, pack=True)
    with pytest.raises(ValueError, match="pack_calls='yes'"):
        cfg.replace(pack_calls="yes")


def test_build_batch_combines_rewards_advantages_and_rows():
    results = hand_results()
    batch, stats = grpo.build_batch(results, grpo.GRPOConfig(group_size=2, num_minibatches=2), seq_len=SEQ)
    a = 0.5 / (0.5 + 1e-6)
    np.testing.assert_allclose(batch["advantages"], [a, -a, -a, 0, 0, 0, 0, 0], rtol=1e-6)
    assert stats["zero_groups"] == 0.5 and stats["success_rate"] == 0.25 and stats["calls"] == 7
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        grpo.build_batch(results, grpo.GRPOConfig(group_size=3), seq_len=SEQ)


@pytest.mark.parametrize("pack", [False, True])
def test_skip_zero_advantage_drops_rows_not_the_policy_gradient(tiny, pack):
    _, graphdef, params, ref_params = tiny
    results = hand_results()  # group 0 (rollouts 0, 1): rewards 1, 0; group 1 (2, 3): 0, 0
    cfg = grpo.GRPOConfig(group_size=2, num_minibatches=1, pack_calls=pack)
    np.testing.assert_array_equal(grpo.rollout_mask(results, cfg), [True, True, True, True])
    np.testing.assert_array_equal(
        grpo.rollout_mask(results, cfg.replace(skip_zero_advantage=True)), [True, True, False, False]
    )
    full, s_full = grpo.build_batch(results, cfg, seq_len=SEQ)
    skip, s_skip = grpo.build_batch(results, cfg.replace(skip_zero_advantage=True), seq_len=SEQ)
    keep = grpo.rollout_mask(results, cfg.replace(skip_zero_advantage=True))
    assert s_full["trained_calls"] == s_full["calls"] == s_skip["calls"] == 7 and s_skip["trained_calls"] == 3
    assert grpo.rows_needed(results, SEQ, pack, keep=keep) == (1 if pack else 3)  # 11 + 7 + 12 tokens: one row
    assert skip["tokens"].shape[0] < full["tokens"].shape[0]
    if not pack:  # the kept calls keep their weights 1 / (calls x all 4 rollouts)
        np.testing.assert_allclose(skip["weights"], [1 / 4, 1 / 8, 1 / 8], rtol=1e-6)
        np.testing.assert_array_equal(skip["rollout"], [0, 1, 1])
        # and with the other weightings their weights over all 7 calls / 35 tokens
        for how, want in (("call", [1 / 7] * 3), ("token", [6 / 35, 3 / 35, 5 / 35])):
            b, _ = grpo.build_batch(results, cfg.replace(skip_zero_advantage=True, call_weighting=how), seq_len=SEQ)
            np.testing.assert_allclose(b["weights"], want, rtol=1e-6)

    def loss_and_grad(batch, beta):
        return jax.value_and_grad(lambda p: grpo.grpo_loss(graphdef, p, ref_params, batch, 0.2, beta)[0])(params)

    (lf, gf), (ls, gs) = loss_and_grad(full, 0.0), loss_and_grad(skip, 0.0)
    np.testing.assert_allclose(float(ls), float(lf), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(gs), jax.tree.leaves(gf)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)
    # with beta > 0 the dropped rollouts' KL is all that differs
    assert float(loss_and_grad(skip, 0.5)[0]) != pytest.approx(float(loss_and_grad(full, 0.5)[0]), rel=1e-6)
    # every group equal: nothing to train, a batch of padding only (loss 0)
    flat = [dataclasses.replace(r, success=False) for r in results]
    none, s_none = grpo.build_batch(flat, cfg.replace(skip_zero_advantage=True), seq_len=SEQ)
    assert s_none["trained_calls"] == 0 and none["tokens"].shape[0] == 1 and not none["loss_mask"].any()
    assert float(grpo.grpo_loss(graphdef, params, ref_params, none, 0.2, 0.001)[0]) == 0.0
    with pytest.raises(ValueError, match="expected bool\\[4\\], one per rollout"):
        grpo.make_batch(results, np.zeros(4), seq_len=SEQ, keep=[1, 0, 1, 0])
    with pytest.raises(ValueError, match="skip_zero_advantage=1"):
        cfg.replace(skip_zero_advantage=1)


# ----------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------
def test_clipping_and_k3_by_hand():
    ratio = jnp.array([1.5, 1.5, 0.5, 0.5, 1.1, 0.9])
    adv = jnp.array([1.0, -1.0, 1.0, -1.0, 2.0, -2.0])
    # -min(rA, clip(r, 0.8, 1.2)A): 1.5*1 -> clipped 1.2; 1.5*-1 -> -1.5 (unclipped, pessimistic);
    # 0.5*1 -> 0.5 (unclipped); 0.5*-1 -> clipped -0.8; inside the range: r*A
    np.testing.assert_allclose(grpo.clipped_pg(ratio, adv, 0.2), [-1.2, 1.5, -0.5, 0.8, -2.2, 1.8], rtol=1e-6)
    # k3 = exp(d) - d - 1 with d = ref - logp
    logp = jnp.array([-1.0, -1.0, -2.0])
    ref = jnp.array([-1.0, -1.0 + math.log(2.0), -2.5])
    np.testing.assert_allclose(grpo.k3_kl(logp, ref), [0.0, 1 - math.log(2.0), math.exp(-0.5) + 0.5 - 1], rtol=1e-6)


def test_grpo_loss_matches_hand_computation(tiny):
    _, graphdef, params, ref_params = tiny
    adv = np.array([1.0, -0.5, 0.7, -1.2], np.float32)
    b = grpo.make_batch(hand_results(), adv, seq_len=SEQ, multiple_of=4)
    logp = np.asarray(token_logprobs(graphdef, params, b["tokens"], b["positions"], b["segment_ids"]))
    ref = np.asarray(token_logprobs(graphdef, ref_params, b["tokens"], b["positions"], b["segment_ids"]))
    # old log-probs with known offsets: ratios exp(0.5), exp(0.1), 1, exp(-0.1), exp(-0.5)
    offsets = np.array([-0.5, -0.1, 0.0, 0.1, 0.5], np.float32)
    old = logp + offsets[np.arange(logp.size).reshape(logp.shape) % 5]
    b["old_logprobs"] = np.where(b["loss_mask"][:, 1:] > 0, old, 0.0).astype(np.float32)
    eps, beta = 0.2, 0.05
    loss, m = grpo.grpo_loss(graphdef, params, ref_params, b, eps, beta)

    total = pg_total = kl_sum = clipped = ratio_sum = tokens = 0.0
    for c in range(b["tokens"].shape[0]):
        ts = [t for t in range(SEQ - 1) if b["loss_mask"][c, t + 1]]
        if not ts:
            continue
        a, w = float(b["advantages"][c]), float(b["weights"][c])
        pg_c = kl_c = 0.0
        for t in ts:
            r = math.exp(float(logp[c, t]) - float(b["old_logprobs"][c, t]))
            pg = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            d = float(ref[c, t]) - float(logp[c, t])
            k3 = math.exp(d) - d - 1
            pg_c, kl_c = pg_c + pg, kl_c + k3
            kl_sum, ratio_sum, tokens = kl_sum + k3, ratio_sum + r, tokens + 1
            clipped += abs(r - 1) > eps
        total += w * (pg_c + beta * kl_c) / len(ts)
        pg_total += w * pg_c / len(ts)
    assert 0 < clipped < tokens  # some tokens clipped, some not
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    np.testing.assert_allclose(float(m["pg_loss"]), pg_total, rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), kl_sum / tokens, rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_fraction"]), clipped / tokens, rtol=1e-6)
    np.testing.assert_allclose(float(m["ratio_mean"]), ratio_sum / tokens, rtol=1e-5)
    assert float(m["tokens"]) == tokens == 6 + 3 + 5 + 8 + 4 + 2 + 7
    # jit == eager, and beta = 0 ignores the reference entirely
    jloss, jm = jax.jit(lambda p, r, bb: grpo.grpo_loss(graphdef, p, r, bb, eps, beta))(params, ref_params, b)
    np.testing.assert_allclose(float(jloss), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(jm["kl"]), float(m["kl"]), rtol=1e-5)
    # the step's path: reference log-probs computed once per step (in row chunks, the last one
    # padded with the appended zero row), then looked up
    with_zero = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in b.items()}
    rows = b["tokens"].shape[0]
    chunked = grpo._chunked_logprobs(graphdef, ref_params, with_zero, 3, -(-rows // 3))
    assert chunked.shape[0] == rows
    pre = dict(b, ref_logprobs=chunked)
    np.testing.assert_allclose(float(grpo.grpo_loss(graphdef, params, None, pre, eps, beta)[0]), total, rtol=1e-5)
    loss0, _ = grpo.grpo_loss(graphdef, params, None, b, eps, 0.0)
    np.testing.assert_allclose(float(loss0), pg_total, rtol=1e-5)


@pytest.mark.parametrize("pack", [False, True])
def test_call_weightings_on_policy_loss_by_hand(tiny, pack):
    """On-policy (r_t = 1) with beta = 0 every generated token's loss is -A of its rollout, so
    the loss is -sum_c w_c A_c: -mean_i A_i over rollouts ("rollout"), -mean over calls
    ("call"), -mean over generated tokens ("token"); single-call rollouts make "call" and
    "rollout" the same batch."""
    _, graphdef, params, ref_params = tiny
    results = hand_results()  # trained calls per rollout: 1, 2, 1, 3; tokens 6 | 3, 5 | 8 | 4, 2, 7
    adv = np.array([1.0, -0.5, 0.7, -0.9], np.float32)
    calls = [1, 2, 1, 3]
    tokens = [[6], [3, 5], [8], [4, 2, 7]]
    want = {
        "rollout": -adv.mean(),
        "call": -np.repeat(adv, calls).mean(),
        "token": -sum(a * sum(t) for a, t in zip(adv, tokens)) / 35,
    }
    for how, value in want.items():
        b = grpo.make_batch(results, adv, seq_len=SEQ, pack=pack, weighting=how)
        logp = np.asarray(token_logprobs(graphdef, params, b["tokens"], b["positions"], b["segment_ids"]))
        b["old_logprobs"] = np.where(b["loss_mask"][:, 1:] > 0, logp, 0.0).astype(np.float32)
        loss = float(grpo.grpo_loss(graphdef, params, ref_params, b, 0.2, 0.0)[0])
        np.testing.assert_allclose(loss, value, rtol=1e-5, err_msg=how)
    assert len({round(float(v), 6) for v in want.values()}) == 3  # the three weightings differ here
    single = [dataclasses.replace(r, calls=r.calls[:1]) for r in results]
    a = grpo.make_batch(single, adv, seq_len=SEQ, pack=pack)
    c = grpo.make_batch(single, adv, seq_len=SEQ, pack=pack, weighting="call")
    assert a.keys() == c.keys() and all(np.array_equal(a[k], c[k]) for k in a)


def test_on_policy_gradient_is_reinforce(tiny):
    _, graphdef, params, _ = tiny
    b = grpo.make_batch(hand_results(), np.array([1.0, -0.5, 0.7, -1.2], np.float32), seq_len=SEQ)
    lp = lambda p: token_logprobs(graphdef, p, b["tokens"], b["positions"], b["segment_ids"])
    b["old_logprobs"] = np.asarray(jax.jit(lp)(params))
    g = jax.jit(jax.grad(lambda p: grpo.grpo_loss(graphdef, p, None, b, 0.2, 0.0)[0]))(params)

    mask = jnp.asarray(b["loss_mask"][:, 1:], jnp.float32)

    def reinforce(p):  # -sum_c w_c A_c mean_t logp
        mean_lp = (lp(p) * mask).sum(1) / jnp.maximum(mask.sum(1), 1)
        return -(b["weights"] * b["advantages"] * mean_lp).sum()

    want = jax.jit(jax.grad(reinforce))(params)
    leaves, wleaves = jax.tree.leaves(g), jax.tree.leaves(want)
    assert max(float(jnp.abs(x).max()) for x in wleaves) > 1e-4
    for x, y in zip(leaves, wleaves):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------
# the update
# ----------------------------------------------------------------------------------------
def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def reference_update(vg, tx, cfg, params, opt_state, ref, batch, key):
    """The documented update as a plain Python loop: per epoch e the rows in the order
    ``permutation(fold_in(key, e))``, split into ``num_minibatches`` minibatches, one
    optimizer update each on ``vg`` = value and gradient of ``num_minibatches x grpo_loss(minibatch)``
    with the reference's own forward. -> (params, losses)."""
    rows, m = batch["tokens"].shape[0], cfg.num_minibatches
    losses = []
    for e in range(cfg.inner_epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), rows))
        for idx in perm.reshape(m, rows // m):
            loss, grads = vg(params, ref, {k: v[idx] for k, v in batch.items()})
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
    return params, losses


def test_step_matches_plain_loop_does_not_retrace_and_guards(tiny):
    policy, _, _, _ = tiny
    cfg = grpo.GRPOConfig(group_size=2, num_minibatches=2, inner_epochs=2, beta=0.5)
    tx = optax.sgd(0.1)  # plain SGD: no Adam sign-amplification of round-off in the comparison
    graphdef, state = init_train_state(policy, tx)
    ref = grpo.reference_params(state.params)
    b1, _ = grpo.build_batch(hand_results(0), cfg, seq_len=SEQ)
    other_results = hand_results(1)
    assert grpo.bucket_rows(6, cfg.num_minibatches) != grpo.bucket_rows(
        7, cfg.num_minibatches
    )  # 6 calls: another bucket
    b2, _ = grpo.build_batch(other_results, cfg, seq_len=SEQ)
    b2["advantages"] = b2["advantages"] + 0.25
    step = grpo.make_grpo_step(graphdef, tx, cfg)
    key = jax.random.key(3)

    m = cfg.num_minibatches
    vg = jax.jit(jax.value_and_grad(lambda p, r, mb: m * grpo.grpo_loss(graphdef, p, r, mb, cfg.clip_eps, cfg.beta)[0]))
    want, losses = reference_update(vg, tx, cfg, state.params, state.opt_state, ref, b1, key)
    before = grpo.TRACE_COUNTS["grpo_update"]
    s1, m1 = step(_copy(state), ref, b1, key)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), np.mean(losses), rtol=1e-4)
    assert int(s1.step) == 4 and int(m1["updates"]) == 4 and bool(m1["finite"]) and float(m1["tokens"]) == 35
    assert float(m1["clip_fraction"]) > 0  # the second epoch moved off-policy
    other, _ = step(_copy(state), ref, b1, jax.random.key(5))  # rows are shuffled with the key
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(other.params), jax.tree.leaves(s1.params)))
    # the second step: the policy has moved away from the reference, the KL term is live
    want2, _ = reference_update(vg, tx, cfg, _copy(s1.params), _copy(s1.opt_state), ref, b2, jax.random.key(4))
    s2, m2 = step(s1, ref, b2, jax.random.key(4))
    for x, y in zip(jax.tree.leaves(want2), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert float(m2["kl"]) > 0
    assert grpo.TRACE_COUNTS["grpo_update"] - before == 1  # no re-trace for new data of the same bucket
    assert int(s2.step) == 8
    # Non-finite guard: a NaN in the batch leaves the state unchanged and reports it.
    bad = dict(b1, old_logprobs=np.full_like(b1["old_logprobs"], np.nan))
    keep = _copy(s2.params)
    s3, m3 = step(s2, ref, bad, key)
    assert not bool(m3["finite"]) and int(m3["updates"]) == 0 and int(s3.step) == 8
    for x, y in zip(jax.tree.leaves(keep), jax.tree.leaves(s3.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="expected a multiple of num_minibatches=2"):
        step(s3, ref, grpo.make_batch(hand_results(), np.zeros(4), seq_len=SEQ, num_rows=7), key)


@pytest.fixture(scope="module")
def sampled():
    """Real rollouts of the tiny policy: 2 problems x 4 samples (sosp, temperature 1)."""
    policy = model.Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    cfg = grpo.GRPOConfig(num_problems=2, group_size=4, num_minibatches=2, beta=0.0)
    tx, _ = make_optimizer(1e-2, total_steps=100, schedule="constant")
    graphdef, state = init_train_state(policy, tx)
    eng = engine_lib.Engine(policy, num_slots=8, max_len=64)
    problems = (np.array([[2, 3, 4], [5, 7, 9]]), np.array([10, 21]))
    results = grpo.rollout_groups(eng, state.params, problems, cfg, key=jax.random.key(0), mode="sosp", max_context=64)
    return cfg, tx, graphdef, state, results


def test_rollout_groups_and_engine_logprobs_match_training(sampled):
    _, _, graphdef, state, results = sampled
    assert len(results) == 8 and [r.target for r in results] == [10] * 4 + [21] * 4
    assert len({tuple(r.calls[0].output_tokens) for r in results[:4]}) == 4  # distinct samples per group
    b = grpo.make_batch(results, np.zeros(8), seq_len=64)
    lp = np.asarray(token_logprobs(graphdef, state.params, b["tokens"], b["positions"], b["segment_ids"]))
    on = b["loss_mask"][:, 1:] > 0
    assert on.sum() == sum(r.total_tokens for r in results)
    np.testing.assert_allclose(lp[on], b["old_logprobs"][on], atol=1e-4)  # the ratio starts at 1
    _, m = grpo.grpo_loss(graphdef, state.params, state.params, b, 0.2, 0.001)
    assert abs(float(m["ratio_mean"]) - 1) < 1e-4 and float(m["clip_fraction"]) == 0 and abs(float(m["kl"])) < 1e-6


def test_steps_raise_logprobs_of_rewarded_outputs(sampled):
    cfg, tx, graphdef, state, results = sampled
    # two rewarded samples per group, marked by hand
    results = [dataclasses.replace(r, success=i % 4 in (0, 3)) for i, r in enumerate(results)]
    batch, stats = grpo.build_batch(results, cfg, seq_len=64)
    assert stats["zero_groups"] == 0
    rewarded = np.array([results[i].success for i in batch["rollout"][:8]])

    def output_logprob(params):
        lp = token_logprobs(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return np.asarray((lp * batch["loss_mask"][:, 1:]).sum(1))[:8]

    before = output_logprob(state.params)
    step = grpo.make_grpo_step(graphdef, tx, cfg)
    state = jax.tree.map(jnp.copy, state)  # the fixture's state is shared: donate a copy
    for k in range(3):
        state, m = step(state, None, batch, jax.random.key(k))
        assert bool(m["finite"])
    change = output_logprob(state.params) - before
    assert (change[rewarded] > 0).all() and (change[~rewarded] < 0).all(), change
    assert change[rewarded].sum() > 1.0


def test_micro_batched_update_equals_the_whole_minibatch(tiny):
    """A minibatch split into micro-batches (padded with the zero row) gives the same update."""
    assert grpo.micro_chunks(8, 64, 0) == (1, 8) and grpo.micro_chunks(8, 64, 512) == (1, 8)
    assert grpo.micro_chunks(8, 64, 3 * 64) == (3, 3) and grpo.micro_chunks(8, 64, 10) == (8, 1)
    policy, _, _, _ = tiny
    tx = optax.sgd(0.1)
    graphdef, state = init_train_state(policy, tx)
    ref = grpo.reference_params(state.params)
    key = jax.random.key(3)
    whole = grpo.GRPOConfig(group_size=2, num_minibatches=1, inner_epochs=2, beta=0.5, micro_batch_tokens=0)
    batch, _ = grpo.build_batch(hand_results(0), whole, seq_len=SEQ)
    assert batch["tokens"].shape[0] == 7  # 7 calls
    vg = jax.jit(jax.value_and_grad(lambda p, r, mb: grpo.grpo_loss(graphdef, p, r, mb, whole.clip_eps, whole.beta)[0]))
    want, losses = reference_update(vg, tx, whole, state.params, state.opt_state, ref, batch, key)
    for budget in (3 * SEQ, SEQ):  # 3 micro-batches of 3 rows (two padding), 7 of 1
        cfg = whole.replace(micro_batch_tokens=budget)
        s, m = grpo.make_grpo_step(graphdef, tx, cfg)(_copy(state), ref, batch, key)
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(s.params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(m["loss"]), np.mean(losses), rtol=1e-4)
        assert float(m["tokens"]) == 35 and int(m["updates"]) == 2
    with pytest.raises(ValueError, match="micro_batch_tokens=-1"):
        whole.replace(micro_batch_tokens=-1)


def test_update_on_a_mesh_equals_the_update_on_one_device(tiny):
    """On 8 data devices (each micro-batch split over them, ``make_grpo_step``'s
    ``batch_sharding``) the micro-batched update gives one device's parameters and metrics."""
    from jaxapr import sharding
    from jaxapr.train import mesh as mesh_lib

    policy, _, _, _ = tiny
    tx = optax.sgd(0.1)
    cfg = grpo.GRPOConfig(group_size=2, num_minibatches=2, inner_epochs=2, beta=0.5, micro_batch_tokens=4 * SEQ)
    batch, _ = grpo.build_batch(hand_results(0), cfg, seq_len=SEQ, num_rows=16)  # 2 micro-batches of 4 rows
    key = jax.random.key(3)
    graphdef, state = init_train_state(policy, tx)
    want, want_m = grpo.make_grpo_step(graphdef, tx, cfg)(_copy(state), grpo.reference_params(state.params), batch, key)
    mesh = sharding.make_mesh(data=8)
    graphdef, state, shardings = mesh_lib.init_state_on_mesh(policy, tx, mesh, sharding.RULES["replicated"])
    step = grpo.make_grpo_step(graphdef, tx, cfg, state_shardings=shardings)
    got, got_m = step(state, grpo.reference_params(state.params), mesh_lib.batch_to_device(batch, mesh), key)
    for x, y in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    for name in ("loss", "kl", "clip_fraction", "tokens", "grad_norm"):
        np.testing.assert_allclose(float(got_m[name]), float(want_m[name]), rtol=1e-4, err_msg=name)
    assert int(got_m["updates"]) == 4 and float(got_m["tokens"]) == 35
