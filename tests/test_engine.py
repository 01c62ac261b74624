"""The slot engine against a no-cache reference (full forward per token) on a random tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxapr import engine, model

CFG = model.ModelConfig(
    d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=64, tie_embeddings=False
)  # untied: random weights give varied greedy tokens
NEW = 10


@pytest.fixture(scope="module")
def policy():
    return model.Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, CFG.vocab_size, size=n).astype(np.int32) for n in (1, 5, 9, 17, 3, 30)]


@functools.cache
def _forward(graphdef):
    """Jitted full forward of a fixed-length [1, max_len] row: logits at every position."""
    return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])


def full_logits(policy, seq):
    """No-cache reference: logits f32[len(seq), V] of the full (non-cached) forward."""
    graphdef, params = nnx.split(policy)
    row = np.zeros((1, CFG.max_len), np.int32)
    row[0, : len(seq)] = seq
    return np.asarray(_forward(graphdef)(params, row))[: len(seq)]


def greedy_reference(policy, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(full_logits(policy, seq)[-1])))
    return np.array(seq[len(prompt) :], np.int32)


@pytest.fixture(scope="module")
def reference(policy, prompts):
    return [greedy_reference(policy, p, NEW) for p in prompts]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------
def test_greedy_cache_equals_no_cache(policy, prompts, reference):
    out = engine.generate(policy, prompts, max_new_tokens=NEW)
    assert out.tokens.shape == (len(prompts), NEW) and out.tokens.dtype == np.int32
    assert out.lengths.tolist() == [NEW] * len(prompts)
    for row, ref in zip(out.tokens, reference):
        np.testing.assert_array_equal(row, ref)
    assert len({tuple(r) for r in reference}) > 1 and any(len(set(r)) > 2 for r in reference)  # not degenerate


def test_batch_equals_each_alone(policy, prompts):
    batched = engine.generate(policy, prompts, max_new_tokens=NEW, num_slots=8)
    for i, p in enumerate(prompts):
        alone = engine.generate(policy, [p], max_new_tokens=NEW, num_slots=1, max_len=batched_max_len(prompts))
        np.testing.assert_array_equal(alone.tokens[0], batched.tokens[i])
        np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[i], atol=1e-5)


def batched_max_len(prompts):
    return min(CFG.max_len, engine._next_pow2(max(len(p) for p in prompts) + NEW))


def test_queue_more_prompts_than_slots(policy, prompts, reference):
    out = engine.generate(policy, prompts, max_new_tokens=NEW, num_slots=2, steps_per_call=3)
    np.testing.assert_array_equal(out.tokens, np.stack(reference))


def test_insert_while_others_decode(policy, prompts, reference):
    eng = engine.Engine(policy, num_slots=4)
    a = eng.insert(prompts[:2], max_new_tokens=NEW)
    eng.decode(4)
    assert eng.finished() == [] and eng.free_slots() == [2, 3]
    b = eng.insert(prompts[2:4], max_new_tokens=NEW)  # mid-way, others at step 5
    eng.decode(3)
    eng.release([a[0]])  # cancel a running slot
    c = eng.insert(prompts[4:5], slots=[a[0]], max_new_tokens=NEW)
    eng.decode(100)
    assert sorted(eng.finished()) == [0, 1, 2, 3]
    outs = eng.read([a[1]] + b + c)
    for out, ref in zip(outs, [reference[1], reference[2], reference[3], reference[4]]):
        np.testing.assert_array_equal(out.tokens, ref)


def test_stop_tokens_and_limits(policy, prompts, reference):
    stop = int(reference[3][4])  # prompt 3 stops at its first occurrence of this token
    first = int(np.flatnonzero(reference[3] == stop)[0])
    long_prompt = np.resize(prompts[5], CFG.max_len - 3)  # context end: room for 3 tokens
    eng = engine.Engine(policy, num_slots=4)
    ps = [prompts[3], prompts[0], prompts[1], long_prompt]
    eng.insert(ps, max_new_tokens=[NEW, NEW, 4, NEW], stop_ids=[stop])
    eng.decode(1)
    eng.decode(100)
    out = eng.read(range(4))
    np.testing.assert_array_equal(out[0].tokens, reference[3][: first + 1])  # stop token included
    assert out[0].tokens[-1] == stop
    for j, (o, ref) in enumerate(zip(out[1:3], (reference[0], reference[1]))):
        stops = np.flatnonzero(ref == stop)
        end = min(stops[0] + 1 if stops.size else NEW, (NEW, 4)[j])
        np.testing.assert_array_equal(o.tokens, ref[:end])
    assert len(out[3].tokens) <= 3 and (len(out[3].tokens) == 3 or out[3].tokens[-1] == stop)
    assert eng.finished() == [0, 1, 2, 3]
    eng.decode(5)  # finished slots neither write nor advance
    assert [len(o.tokens) for o in eng.read(range(4))] == [len(o.tokens) for o in out]
    eng.release([1])
    assert eng.finished() == [0, 2, 3] and eng.free_slots() == [1]


def test_stop_ids_empty_runs_to_max_new(policy, prompts):
    out = engine.generate(policy, prompts[:2], max_new_tokens=5, stop_ids=())
    assert out.lengths.tolist() == [5, 5]


# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)]
)
def test_seed_reproduces_and_slot_independent(policy, prompts, kw):
    key = jax.random.key(3)
    a = engine.generate(policy, prompts, max_new_tokens=NEW, key=key, **kw)
    b = engine.generate(policy, prompts, max_new_tokens=NEW, key=key, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    c = engine.generate(policy, prompts, max_new_tokens=NEW, key=key, num_slots=2, steps_per_call=3, **kw)
    np.testing.assert_array_equal(a.tokens, c.tokens)  # other slots / queueing do not matter
    d = engine.generate(policy, prompts, max_new_tokens=NEW, key=jax.random.key(4), **kw)
    assert not np.array_equal(a.tokens, d.tokens)


def test_top_k_one_is_greedy(policy, prompts, reference):
    out = engine.generate(policy, prompts, max_new_tokens=NEW, temperature=1.0, top_k=1, key=jax.random.key(0))
    np.testing.assert_array_equal(out.tokens, np.stack(reference))


def test_top_p_keeps_the_right_set():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda p, k=0: np.isfinite(np.asarray(engine.filter_logits(logits, 1.0, k, p))).nonzero()[0].tolist()
    assert kept(0.3) == [1]  # 0.4 >= 0.3
    assert kept(0.5) == [1, 3]  # 0.4 < 0.5 <= 0.7
    assert kept(0.7) == [1, 3]  # exactly reached: no more
    assert kept(0.71) == [1, 3, 4]
    assert kept(0.96) == [0, 1, 2, 3, 4]
    assert kept(1.0) == [0, 1, 2, 3, 4]
    assert kept(1.0, k=2) == [1, 3]
    assert kept(0.9, k=3) == [1, 3, 4]
    # samples only ever come from the kept set
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 2000))
    toks, _ = engine.sample_logits(
        jnp.tile(logits, (2000, 1)), keys, jnp.ones(2000), jnp.zeros(2000, jnp.int32), jnp.full(2000, 0.5)
    )
    assert set(np.asarray(toks).tolist()) == {1, 3}
    frac = float(np.mean(np.asarray(toks) == 1))
    assert abs(frac - 0.4 / 0.7) < 0.05  # renormalized within the set


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5, top_p=0.9), dict(temperature=0.0)])
def test_logprobs_match_full_forward(policy, prompts, kw):
    out = engine.generate(policy, prompts[:3], max_new_tokens=NEW, key=jax.random.key(7), **kw)
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        logits = full_logits(policy, np.concatenate([p, toks]))
        ref = log_softmax(logits[len(p) - 1 : len(p) - 1 + NEW])[np.arange(NEW), toks]
        np.testing.assert_allclose(lps, ref, atol=2e-4)


# ----------------------------------------------------------------------------------------
def test_decode_reads_only_the_used_prefix(policy, prompts, reference):
    """Decode attends to the smallest bucket of cache entries covering every occupied slot's
    position; across bucket changes, inserts mid-way and releases it gives the reference tokens,
    and the same log-probs as attending to the whole cache."""
    outs = {}
    for buckets in ((64,), (8, 16, 32, 64)):
        eng = engine.Engine(policy, num_slots=4, decode_buckets=buckets)
        a = eng.insert(prompts[:2], max_new_tokens=NEW)  # lengths 1, 5: bucket 8
        eng.decode(2)
        b = eng.insert(prompts[2:4], max_new_tokens=NEW)  # lengths 9, 17: bucket 32
        eng.decode(3)
        eng.release([a[0]])
        c = eng.insert(prompts[5:6], slots=[a[0]], max_new_tokens=NEW)  # length 30: bucket 64
        for _ in range(5):
            eng.decode(2)
        outs[buckets] = eng.read([a[1]] + b + c)
        expected = {64: 7} if len(buckets) == 1 else {8: 1, 32: 2, 64: 4}  # positions < 7, 20, 32, then 34..
        assert dict(eng.attend_counts) == expected, eng.attend_counts
        # the read accounting, by hand: each decode call reads steps x 4 rows x its window; the
        # occupied slots' prefixes hold position + 1 entries at each step (finished slots too)
        windows = [64] * 7 if len(buckets) == 1 else [8, 32, 32, 64, 64, 64, 64]
        steps = [2, 3, 2, 2, 2, 2, 2]
        held = [[1, 5], [3, 7, 9, 17]] + [[30 + 2 * i, 10 + 2 * i, 12 + 2 * i, 20 + 2 * i] for i in range(5)]
        prefix = sum(min(p + k, CFG.max_len) for n, ps in zip(steps, held) for p in ps for k in range(1, n + 1))
        assert eng.decode_reads == {"window": sum(n * 4 * w for n, w in zip(steps, windows)), "prefix": prefix}
        for out, ref in zip(outs[buckets], [reference[1], reference[2], reference[3], reference[5]]):
            np.testing.assert_array_equal(out.tokens, ref)
    for full, small in zip(outs[(64,)], outs[(8, 16, 32, 64)]):
        np.testing.assert_allclose(small.logprobs, full.logprobs, atol=1e-5)


def test_finished_slots_leave_the_decode_window(policy, prompts, reference):
    """A slot seen finished but kept (as a parent keeps its slot through its children) no longer
    sets the decode window: the window follows the running slot alone, whose tokens are the
    reference's."""
    eng = engine.Engine(policy, num_slots=2, decode_buckets=(8, 16, 32, 64))
    held = eng.insert([prompts[5]], max_new_tokens=1)  # length 30: finished at its prefill
    eng.decode(1)  # not yet seen finished: the window covers it (31 entries -> 32)
    assert eng.finished() == held and eng.running() == []
    run = eng.insert([prompts[0]], max_new_tokens=NEW)  # length 1
    for _ in range(NEW):
        eng.decode(1)
    # the running slot needs 2..11 entries over its ten calls; the held one would need 32 on
    assert dict(eng.attend_counts) == {32: 1, 8: 7, 16: 3}, eng.attend_counts
    np.testing.assert_array_equal(eng.read(run)[0].tokens, reference[0])
    np.testing.assert_array_equal(eng.read(held)[0].tokens, reference[5][:1])
    assert eng.decode_reads["prefix"] == 31 + sum(range(2, 12))  # the held slot counts until seen


def test_no_retrace_beyond_buckets(policy):
    before = dict(engine.TRACE_COUNTS)
    eng = engine.Engine(policy, num_slots=4, prefill_buckets=(8, 32), batch_buckets=(4,))
    rng = np.random.default_rng(5)
    for _ in range(6):
        lens = rng.integers(1, 30, size=rng.integers(1, 5))
        eng.insert(
            [rng.integers(3, CFG.vocab_size, size=n) for n in lens],
            max_new_tokens=int(rng.integers(1, 20)),
            temperature=float(rng.choice([0.0, 1.0])),
            top_p=0.9,
            key=jax.random.key(1),
        )
        eng.decode(int(rng.integers(1, 9)))
        eng.release(eng.finished())
        eng.release(eng.running())
    eng.update_params(model.Transformer(CFG, rngs=nnx.Rngs(9)))  # new weights, no recompile
    eng.insert([np.arange(3, 10)], max_new_tokens=3)
    eng.decode(3)
    again = engine.Engine(policy, num_slots=4, prefill_buckets=(8, 32), batch_buckets=(4,))
    again.insert([np.arange(3, 10)], max_new_tokens=3)
    again.decode(3)
    delta = {k: engine.TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode", "release")}
    assert delta["prefill"] <= 2 and delta["decode"] <= 1 and delta["release"] <= 1, delta


def test_params_placement_does_not_recompile(policy, prompts, reference):
    # A trainer hands the engine its parameters on a one-device mesh (NamedSharding); the
    # evaluation, the loaded policy's default placement. Both must run the same compiled kernels.
    def run(p):
        eng = engine.Engine(p, num_slots=2, prefill_buckets=(32,), batch_buckets=(2,), decode_buckets=(64,))
        eng.insert(prompts[:1], max_new_tokens=NEW)
        eng.decode(NEW)
        return eng.read([0])[0].tokens

    run(policy)
    before = dict(engine.TRACE_COUNTS)
    graphdef, params = nnx.split(policy)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    placed = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    tokens = run(nnx.merge(graphdef, placed))
    assert {k: engine.TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode")} == {"prefill": 0, "decode": 0}
    np.testing.assert_array_equal(tokens, reference[0])


def test_update_params_changes_outputs(policy, prompts, reference):
    eng = engine.Engine(policy, num_slots=2)
    other = model.Transformer(CFG, rngs=nnx.Rngs(11))
    eng.update_params(nnx.split(other)[1])
    eng.insert(prompts[:1], max_new_tokens=NEW)
    eng.decode(NEW)
    np.testing.assert_array_equal(eng.read([0])[0].tokens, greedy_reference(other, prompts[0], NEW))


# ----------------------------------------------------------------------------------------
def test_sharded_equals_unsharded(policy, prompts):
    from jaxapr import sharding

    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    rules = sharding.rules_for("fsdp_tp")  # heads, kv heads, mlp over "tensor"; slots over data
    shard_policy = model.Transformer(CFG, rngs=nnx.Rngs(0))
    for kw in (dict(), dict(temperature=1.0, top_p=0.9, key=jax.random.key(2))):
        plain = engine.generate(policy, prompts, max_new_tokens=NEW, num_slots=8, **kw)
        sharded = engine.generate(shard_policy, prompts, max_new_tokens=NEW, num_slots=8, mesh=mesh, rules=rules, **kw)
        np.testing.assert_array_equal(plain.tokens, sharded.tokens)
        np.testing.assert_allclose(plain.logprobs, sharded.logprobs, atol=1e-4)
    eng = engine.Engine(shard_policy, num_slots=8, mesh=mesh, rules=rules)
    eng.insert(prompts[:3], max_new_tokens=NEW)
    eng.decode(2)
    for arr in (eng.cache["k"][0], eng.slots.tokens):  # layouts survive prefill and decode
        assert arr.sharding.spec[0] in ("data", ("data", "fsdp")), arr.sharding
    assert eng.cache["k"][0].sharding.spec[1] == "tensor"
    with pytest.raises(ValueError, match="divisible"):
        engine.Engine(shard_policy, num_slots=6, mesh=mesh)


# ----------------------------------------------------------------------------------------
def _raises_before_compile(fn, match):
    before = dict(engine.TRACE_COUNTS)
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    assert dict(engine.TRACE_COUNTS) == before


def test_bad_input_one_line_errors_before_compile(policy):
    eng = engine.Engine(policy, num_slots=2, max_len=32)
    ok = np.arange(3, 8)
    _raises_before_compile(lambda: eng.insert([np.arange(40) % 300], max_new_tokens=2), "length 40")
    _raises_before_compile(lambda: eng.insert([np.arange(3, 35)], max_new_tokens=2), "room for at least one")
    _raises_before_compile(
        lambda: eng.insert([np.array([3, CFG.vocab_size])], max_new_tokens=2), f"token id {CFG.vocab_size}"
    )
    _raises_before_compile(lambda: eng.insert([np.array([-1])], max_new_tokens=2), "token id -1")
    _raises_before_compile(lambda: eng.insert([np.array([], np.int32)], max_new_tokens=2), "non-empty")
    _raises_before_compile(lambda: eng.insert([ok], max_new_tokens=2, temperature=1.0), "PRNG key")
    _raises_before_compile(lambda: eng.insert([ok], max_new_tokens=2, top_p=0.0), "top_p")
    _raises_before_compile(lambda: eng.insert([ok], max_new_tokens=0), "max_new_tokens")
    _raises_before_compile(lambda: eng.insert([ok], max_new_tokens=2, stop_ids=[999]), "stop_ids")
    _raises_before_compile(lambda: eng.insert([ok] * 3, max_new_tokens=2), "3 prompts but only 2 free")
    _raises_before_compile(lambda: engine.generate(policy, [np.arange(3, 100)], max_new_tokens=2), "length 97")
    eng.insert([ok], slots=[1], max_new_tokens=2)
    with pytest.raises(ValueError, match="slot 1 is busy") as info:
        eng.insert([ok], slots=[1], max_new_tokens=2)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="slot 0 holds no sequence"):
        eng.read([0])


# ----------------------------------------------------------------------------------------
def test_forced_decoding_tokens_logprobs_and_free_slots(policy, prompts, reference):
    rng = np.random.default_rng(8)
    forced = [rng.integers(3, CFG.vocab_size, size=n).astype(np.int32) for n in (7, 1, 12)]
    eng = engine.Engine(policy, num_slots=8)
    # forced slots (0, 2, 4, 5) mixed with free ones (1, 3); slot 5 stops at a stop id inside
    # its forced tokens, slot 4 at its max_new_tokens
    stop = int(forced[2][5])
    ps = [prompts[0], prompts[1], prompts[2], prompts[3], prompts[4], prompts[5]]
    fs = [forced[0], None, forced[1], None, forced[2], forced[2]]
    eng.insert(ps[:4], max_new_tokens=NEW, forced=fs[:4])
    eng.decode(3)
    eng.insert(ps[4:5], max_new_tokens=4, forced=fs[4:5])  # inserted while others decode
    eng.insert(ps[5:], max_new_tokens=NEW, forced=fs[5:], stop_ids=[stop])
    eng.decode(100)
    assert sorted(eng.finished()) == list(range(6))
    out = eng.read(range(6))
    np.testing.assert_array_equal(out[0].tokens, forced[0])
    np.testing.assert_array_equal(out[2].tokens, forced[1])
    np.testing.assert_array_equal(out[4].tokens, forced[2][:4])
    first_stop = int(np.flatnonzero(forced[2] == stop)[0])
    np.testing.assert_array_equal(out[5].tokens, forced[2][: first_stop + 1])
    for s in (1, 3):  # free slots: exactly the greedy reference
        np.testing.assert_array_equal(out[s].tokens, reference[s])
    for p, o in zip(ps, out):  # log-probs: the full forward's, at the emitted (forced) tokens
        logits = full_logits(policy, np.concatenate([p, o.tokens]))
        n = len(o.tokens)
        ref = log_softmax(logits[len(p) - 1 : len(p) - 1 + n])[np.arange(n), o.tokens]
        np.testing.assert_allclose(o.logprobs, ref, atol=2e-4)
    # a released forced slot reused by a free prompt samples freely again
    eng.release([0])
    eng.insert(ps[1:2], slots=[0], max_new_tokens=NEW)
    eng.decode(100)
    np.testing.assert_array_equal(eng.read([0])[0].tokens, reference[1])
    with pytest.raises(ValueError, match="forced has 1 entries for 2 prompts"):
        eng.insert(ps[:2], slots=[6, 7], max_new_tokens=2, forced=[None])
    with pytest.raises(ValueError, match=r"forced\[0\] has shape \(0,\)"):
        eng.insert(ps[:1], slots=[6], max_new_tokens=2, forced=[np.array([], np.int32)])
    with pytest.raises(ValueError, match=r"forced\[0\] contains token id"):
        eng.insert(ps[:1], slots=[6], max_new_tokens=2, forced=[np.array([CFG.vocab_size])])


def test_forced_decoding_no_retrace(policy):
    eng = engine.Engine(policy, num_slots=4, prefill_buckets=(8, 32), batch_buckets=(4,))
    eng.insert([np.arange(3, 10), np.arange(3, 30)], max_new_tokens=3)  # compile each bucket once
    eng.decode(3)
    eng.release(eng.finished())
    before = dict(engine.TRACE_COUNTS)
    rng = np.random.default_rng(6)
    for _ in range(4):
        lens = rng.integers(1, 30, size=rng.integers(1, 5))
        fs = [None if rng.random() < 0.5 else rng.integers(3, CFG.vocab_size, size=rng.integers(1, 40)) for _ in lens]
        eng.insert([rng.integers(3, CFG.vocab_size, size=n) for n in lens], max_new_tokens=8, forced=fs)
        eng.decode(int(rng.integers(1, 9)))
        eng.release(range(4))
    assert {k: engine.TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode")} == {"prefill": 0, "decode": 0}


# ----------------------------------------------------------------------------------------
# extend: continue a finished slot from a common prefix, keeping its cache
def _held(eng, slots, prompts):
    """What each finished slot holds: its prompt + generated tokens."""
    return [np.concatenate([p, o.tokens]) for p, o in zip(prompts, eng.read(slots))]


def test_extend_equals_full_insert(policy, prompts, reference):
    rng = np.random.default_rng(12)
    eng = engine.Engine(policy, num_slots=8)
    base = [prompts[1], prompts[3], prompts[2], prompts[5], prompts[0]]
    eng.insert(base, max_new_tokens=NEW)
    eng.decode(NEW)
    held = _held(eng, range(5), base)
    # start positions: 0 (nothing kept), inside the prompt, inside the generated tokens, and
    # everything cached (prompt + all but the last generated token)
    starts = [0, 3, len(held[2]) - 4, len(held[3]) - 1, len(held[4]) - 1]
    tails = [rng.integers(3, CFG.vocab_size, size=n).astype(np.int32) for n in (4, 1, 7, 12, 2)]
    joined = [np.concatenate([h[:s], t]) for h, s, t in zip(held, starts, tails)]
    forced = [None, None, rng.integers(3, CFG.vocab_size, size=6).astype(np.int32), None, None]
    sampling = dict(max_new_tokens=NEW, temperature=[0.0, 1.0, 0.0, 0.0, 1.0], key=jax.random.key(5))
    eng.insert([prompts[4]], slots=[6], max_new_tokens=NEW)  # slot 6 keeps decoding meanwhile
    eng.decode(2)
    assert eng.extend(range(5), [j[s:] for j, s in zip(joined, starts)], starts, forced=forced, **sampling) == [
        0,
        1,
        2,
        3,
        4,
    ]
    eng.decode(100)
    got = eng.read(range(5))
    ref = engine.Engine(policy, num_slots=8)
    ref.insert(joined, forced=forced, **sampling)
    ref.decode(100)
    want = ref.read(range(5))
    for g, w in zip(got, want):  # the same tokens (greedy, sampled with the same key, forced)
        np.testing.assert_array_equal(g.tokens, w.tokens)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    np.testing.assert_array_equal(got[2].tokens, forced[2])
    np.testing.assert_array_equal(eng.read([6])[0].tokens, reference[4])  # the other slot is untouched
    # the no-cache forward agrees on the greedy rows
    for k in (0, 3):
        logits = full_logits(policy, np.concatenate([joined[k], got[k].tokens]))
        np.testing.assert_array_equal(got[k].tokens, np.argmax(logits[len(joined[k]) - 1 : -1], -1))
    # an extended slot extends again (a chain of joins), here keeping all of its cache
    again = np.concatenate([joined[0], got[0].tokens, [7, 8, 9]]).astype(np.int32)
    eng.extend([0], [again[len(again) - 4 :]], [len(again) - 4], max_new_tokens=NEW)
    eng.decode(100)
    ref.release(range(8))
    ref.insert([again], max_new_tokens=NEW)
    ref.decode(100)
    np.testing.assert_array_equal(eng.read([0])[0].tokens, ref.read([0])[0].tokens)


def test_extend_no_retrace(policy):
    traced_before = dict(engine.TRACE_COUNTS)
    eng = engine.Engine(policy, num_slots=4, prefill_buckets=(8, 32), batch_buckets=(4,))
    rng = np.random.default_rng(13)

    def refill():
        eng.release(range(4))
        lens = rng.integers(1, 20, size=4)
        eng.insert([rng.integers(3, CFG.vocab_size, size=n) for n in lens], max_new_tokens=4)
        eng.decode(8)
        return lens + 3  # cached tokens per slot: prompt + 4 generated - 1

    # compile each (suffix bucket, context bucket) pair once: contexts 8, 32 and 64 (max_len)
    for n, start in ((5, 0), (5, 10), (5, 40), (20, 0), (20, 30)):
        eng.release(range(4))
        eng.insert([np.arange(3, 48)] * 4, max_new_tokens=4)
        eng.decode(8)
        eng.extend(range(4), [np.arange(3, 3 + n)] * 4, [start] * 4, max_new_tokens=2)
    for n in (5, 20):  # and the prefill buckets refill() uses
        eng.release(range(4))
        eng.insert([np.arange(3, 3 + n)] * 4, max_new_tokens=1)
    before = dict(engine.TRACE_COUNTS)
    # at most one compile per (suffix bucket, context bucket) pair: the 5 above and the 45-token insert
    assert before["prefill"] - traced_before.get("prefill", 0) <= 6
    for _ in range(5):
        cached = refill()
        slots = sorted(rng.choice(4, size=int(rng.integers(1, 5)), replace=False).tolist())
        starts = [int(rng.integers(0, cached[s] + 1)) for s in slots]
        suffixes = [rng.integers(3, CFG.vocab_size, size=int(rng.integers(1, 30))) for _ in slots]
        forced = [None if rng.random() < 0.5 else rng.integers(3, CFG.vocab_size, size=3) for _ in slots]
        eng.extend(
            slots,
            suffixes,
            starts,
            max_new_tokens=int(rng.integers(1, 9)),
            forced=forced,
            temperature=float(rng.choice([0.0, 1.0])),
            top_k=3,
            key=jax.random.key(2),
        )
        eng.decode(int(rng.integers(1, 9)))
    delta = {k: engine.TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode", "release")}
    assert delta == {"prefill": 0, "decode": 0, "release": 0}, delta


def test_extend_bad_input_one_line_errors_before_compile(policy):
    eng = engine.Engine(policy, num_slots=3, max_len=32)
    ok, suf = np.arange(3, 8), np.arange(3, 6)
    eng.insert([ok], slots=[0], max_new_tokens=2)
    eng.decode(5)  # slot 0 finished: it caches 5 + 2 - 1 = 6 tokens
    eng.insert([ok], slots=[1], max_new_tokens=20)  # slot 1 running; slot 2 free
    ext = eng.extend
    _raises_before_compile(lambda: ext([2], [suf], [0], max_new_tokens=2), "slot 2 holds no sequence")
    _raises_before_compile(lambda: ext([1], [suf], [0], max_new_tokens=2), "slot 1 is still running")
    _raises_before_compile(lambda: ext([5], [suf], [0], max_new_tokens=2), "slot 5 is out of range")
    _raises_before_compile(lambda: ext([0, 0], [suf, suf], [0, 0], max_new_tokens=2), "duplicates")
    _raises_before_compile(
        lambda: ext([0], [suf], [7], max_new_tokens=2), r"start_positions\[0\]=7 for slot 0: expected an int in 0\.\.6"
    )
    _raises_before_compile(lambda: ext([0], [suf], [-1], max_new_tokens=2), r"start_positions\[0\]=-1")
    _raises_before_compile(
        lambda: ext([0], [np.arange(3, 30)], [6], max_new_tokens=2), "ends at 33: expected < max_len=32"
    )
    _raises_before_compile(
        lambda: ext([0], [suf], [0, 1], max_new_tokens=2), "1 slots, 1 suffixes and 2 start_positions"
    )
    _raises_before_compile(lambda: ext([0], [np.array([], np.int32)], [0], max_new_tokens=2), "suffix 0 has shape")
    _raises_before_compile(
        lambda: ext([0], [np.array([CFG.vocab_size])], [0], max_new_tokens=2), f"token id {CFG.vocab_size}"
    )
    _raises_before_compile(lambda: ext([0], [suf], [0], max_new_tokens=0), "max_new_tokens")
    _raises_before_compile(lambda: ext([0], [suf], [0], max_new_tokens=2, temperature=1.0), "PRNG key")
    _raises_before_compile(lambda: ext([0], [suf], [0], max_new_tokens=2, forced=[None, None]), "forced has 2 entries")
    assert eng.extend([], [], [], max_new_tokens=2) == []
