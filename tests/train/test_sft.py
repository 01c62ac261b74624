"""jaxapr.train.sft: the masked next-token loss, packing invariance, accumulation, overfitting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxapr import model
from jaxapr.train import sft
from jaxapr.train.state import init_train_state, make_optimizer

CFG = model.get_config("tiny", num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, mlp_dim=64, max_len=64)


def _policy(seed=0):
    return model.Transformer(CFG, rngs=nnx.Rngs(seed))


def _examples(rng, n=5):
    """(tokens, loss_mask) pairs: a masked prompt then trained outputs."""
    out = []
    for _ in range(n):
        length = int(rng.integers(6, 14))
        prompt = int(rng.integers(2, length - 2))
        tokens = np.concatenate([[1], rng.integers(3, 300, length - 2), [2]]).astype(np.int32)
        mask = (np.arange(length) >= prompt).astype(np.int32)
        out.append((tokens, mask))
    return out


def _unpacked(examples, L):
    b = {k: np.zeros((len(examples), L), np.int32) for k in sft.BATCH_KEYS}
    for i, (t, m) in enumerate(examples):
        n = len(t)
        b["tokens"][i, :n], b["loss_mask"][i, :n], b["segment_ids"][i, :n] = t, m, 1
        b["positions"][i, :n] = np.arange(n)
    return b


def _packed(examples, L, rows):
    b = {k: np.zeros((rows, L), np.int32) for k in sft.BATCH_KEYS}
    fill = [0] * rows
    for i, (t, m) in enumerate(examples):
        r = i % rows
        s, n = fill[r], len(t)
        assert s + n <= L
        b["tokens"][r, s : s + n], b["loss_mask"][r, s : s + n] = t, m
        b["segment_ids"][r, s : s + n] = 1 + i // rows
        b["positions"][r, s : s + n] = np.arange(n)
        fill[r] += n
    return b


def _oracle_loss(policy, examples):
    """Each example alone, no padding, plain mean over trained targets."""
    total, count = 0.0, 0
    for t, m in examples:
        logits = policy(jnp.asarray(t)[None])[0, :-1]
        logp = jax.nn.log_softmax(logits)[jnp.arange(len(t) - 1), t[1:]]
        total += float(-(logp * m[1:]).sum())
        count += int(m[1:].sum())
    return total / count


def test_packed_unpacked_and_oracle_agree():
    policy = _policy()
    graphdef, params = nnx.split(policy)
    ex = _examples(np.random.default_rng(0), 6)
    unpacked, packed = _unpacked(ex, 16), _packed(ex, 48, 2)
    lu = sft.sft_loss(graphdef, params, unpacked)
    lp = sft.sft_loss(graphdef, params, packed)
    np.testing.assert_allclose(float(lu), _oracle_loss(policy, ex), rtol=1e-5)
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
    gu = jax.grad(lambda p: sft.sft_loss(graphdef, p, unpacked))(params)
    gp = jax.grad(lambda p: sft.sft_loss(graphdef, p, packed))(params)
    for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_masked_positions_contribute_nothing():
    graphdef, params = nnx.split(_policy())
    rng = np.random.default_rng(1)
    ex = _examples(rng, 4)
    # Two fully masked examples (prompt-only) packed after the trained ones, then padding.
    masked = [(t, np.zeros_like(m)) for t, m in _examples(rng, 2)]
    batch = _packed(ex + masked, 48, 2)
    free = (batch["segment_ids"] == 0) | (batch["segment_ids"] == 3)  # padding + masked segments
    assert free.sum() > 10 and (batch["segment_ids"] == 3).any()
    perturbed = {k: v.copy() for k, v in batch.items()}
    perturbed["tokens"][free] = rng.integers(3, 300, free.sum())
    loss = lambda p, b: sft.sft_loss(graphdef, p, b)
    base, grads = jax.value_and_grad(loss)(params, batch)
    pert, pgrads = jax.value_and_grad(loss)(params, perturbed)
    assert float(pert) == pytest.approx(float(base), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(pgrads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    # The test can fail: perturbing a trained example's tokens changes the loss, and training
    # the masked segments too changes it.
    hit = {k: v.copy() for k, v in batch.items()}
    hit["tokens"][batch["loss_mask"] > 0] = rng.integers(3, 300, int((batch["loss_mask"] > 0).sum()))
    assert float(loss(params, hit)) != pytest.approx(float(base), rel=1e-3)
    unmasked = {k: v.copy() for k, v in batch.items()}
    unmasked["loss_mask"][batch["segment_ids"] > 0] = 1
    assert float(loss(params, unmasked)) != pytest.approx(float(base), rel=1e-3)


def test_accumulation_equals_one_big_batch():
    policy = _policy()
    tx, _ = make_optimizer(1e-3, total_steps=10, schedule="constant")
    ex = _examples(np.random.default_rng(3), 8)
    batch = _unpacked(ex, 16)
    outs = []
    for accum in (1, 4):
        graphdef, state = init_train_state(_policy(), tx)
        state, m = sft.make_sft_step(graphdef, tx, accum)(state, batch)
        outs.append((state, m))
    np.testing.assert_allclose(float(outs[0][1]["loss"]), float(outs[1][1]["loss"]), rtol=1e-6)
    # the gradients agree to float32 rounding (the sums run in another order) ...
    graphdef, params = nnx.split(_policy())
    grads = [jax.jit(lambda p, n=n: sft.sft_grads(graphdef, p, batch, n)[1])(params) for n in (1, 4)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))
    # ... and so do the parameters after one AdamW step of lr 1e-3 (Adam's normalisation turns
    # a rounding difference in a near-zero gradient into at most ~1e-6 of a parameter)
    for a, b in zip(jax.tree.leaves(outs[0][0].params), jax.tree.leaves(outs[1][0].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
    assert (
        max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(outs[0][0].params), jax.tree.leaves(nnx.split(_policy())[1]))
        )
        > 5e-4
    )
    with pytest.raises(ValueError, match="accum_steps=3"):
        sft.make_sft_step(graphdef, tx, 3)(outs[0][0], batch)
    del policy


def test_overfits_a_fixed_batch_without_retracing():
    tx, sched = make_optimizer(1e-2, total_steps=300, warmup_steps=10, schedule="constant")
    graphdef, state = init_train_state(_policy(), tx)
    batch = _packed(_examples(np.random.default_rng(4), 8), 48, 4)
    traces = []
    step = sft.make_sft_step(graphdef, tx, 2, sched)
    fn = step
    first = None
    for _i in range(200):
        state, m = fn(state, batch)
        first = float(m["loss"]) if first is None else first
    assert first > 4.0 and float(m["loss"]) < 0.05, (first, float(m["loss"]))
    assert int(state.step) == 200
    assert step._cache_size() == 1  # one compile for 200 calls
    del traces


def test_non_finite_loss_leaves_state_unchanged():
    tx, _ = make_optimizer(1e-3, total_steps=10, schedule="constant")
    graphdef, state = init_train_state(_policy(), tx)
    before = jax.tree.map(np.asarray, state.params)
    state = jax.tree.map(lambda x: x, state)
    bad = jax.tree.map(
        lambda p: p.at[...].set(jnp.nan) if p.ndim == 2 and p.shape[0] == CFG.vocab_size else p, state.params
    )
    state = state.replace(params=bad)
    bad_np = jax.tree.map(np.asarray, bad)
    batch = _unpacked(_examples(np.random.default_rng(5), 2), 16)
    new, m = sft.make_sft_step(graphdef, tx)(state, batch)
    assert not bool(m["finite"]) and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad_np)):
        np.testing.assert_array_equal(np.asarray(a), b)
    del before


def test_jit_matches_eager():
    graphdef, params = nnx.split(_policy())
    batch = _packed(_examples(np.random.default_rng(6), 4), 40, 2)
    eager = sft.sft_loss(graphdef, params, batch)
    jitted = jax.jit(lambda p, b: sft.sft_loss(graphdef, p, b))(params, batch)
    np.testing.assert_allclose(float(eager), float(jitted), rtol=1e-5)
