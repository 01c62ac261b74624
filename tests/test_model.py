"""Tests for jaxapr.model: shapes and dtypes, parameter and FLOP counts, packed sequences,
the KV-cache forward against the full forward, GQA, untied embeddings, one-line errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxapr import kernels
from jaxapr import model as M

# Small enough to compile in a second or two; head_dim 8, GQA 4 -> 2.
SMALL = M.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=64)


@nnx.jit
def _forward(model, tokens, positions=None, segment_ids=None):
    """The training forward, jitted (eager op-by-op dispatch is slow on CPU)."""
    return model(tokens, positions, segment_ids)


@nnx.jit
def _cached(model, tokens, positions, cache, write_mask=None):
    return model.forward_cached(tokens, positions, cache, write_mask)


def _build(cfg, seed=0):
    return M.Transformer(cfg, rngs=nnx.Rngs(seed))


def _tokens(shape, cfg, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


def _num_params(tree, skip=()):
    """Parameter count from the actual (or abstract) state."""
    flat = nnx.to_flat_state(nnx.state(tree, nnx.Param))
    return sum(math.prod(v.shape) for path, v in flat if not set(skip) & set(map(str, path)))


# --- shapes and dtypes ------------------------------------------------------------------------


def test_forward_shape_and_float32_logits():
    cfg = M.PRESETS["tiny"]
    model = _build(cfg)
    logits = _forward(model, _tokens((2, 12), cfg))
    assert logits.shape == (2, 12, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert model.embed[...].dtype == jnp.float32


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
    cfg32 = SMALL
    cfg16 = SMALL.replace(dtype="bfloat16")
    tokens = _tokens((2, 10), SMALL)
    ref = _forward(_build(cfg32), tokens)
    model16 = _build(cfg16)  # same seed -> same float32 parameters
    assert model16.embed[...].dtype == jnp.float32
    out = _forward(model16, tokens)
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    assert bool(jnp.all(jnp.isfinite(out)))
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(out - ref).max()) < 0.1 * scale
    assert not np.array_equal(np.asarray(out), np.asarray(ref))  # really computed in bf16


def test_rotary_positions_are_relative():
    model = _build(SMALL)
    tokens = _tokens((1, 6), SMALL)
    pos = jnp.arange(6, dtype=jnp.int32)[None]
    a = _forward(model, tokens)
    np.testing.assert_allclose(_forward(model, tokens, pos + 7), a, atol=1e-4)  # a shift: same
    b = _forward(model, tokens, pos * 2)  # other gaps: different
    assert float(jnp.abs(a - b).max()) > 1e-3


# --- parameter and FLOP counts ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "mini"])
def test_param_count_matches_real_model(name):
    cfg = M.PRESETS[name]
    model = _build(cfg)
    assert M.param_count(cfg) == _num_params(model)
    assert M.param_count(cfg, embeddings=False) == _num_params(model, skip=("embed", "unembed"))


@pytest.mark.parametrize("name", sorted(M.PRESETS))
def test_param_count_matches_abstract_model(name):
    for cfg in (M.PRESETS[name], M.PRESETS[name].replace(tie_embeddings=False, num_kv_heads=2)):
        abstract = nnx.eval_shape(lambda: M.Transformer(cfg, rngs=nnx.Rngs(0)))
        assert M.param_count(cfg) == _num_params(abstract)
        assert M.param_count(cfg, embeddings=False) == _num_params(abstract, skip=("embed", "unembed"))


def test_paper_preset_is_about_228m_non_embedding():
    cfg = M.PRESETS["paper"]
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.max_len) == (18, 1024, 16, 4096)
    n = M.param_count(cfg, embeddings=False)
    assert 227e6 < n < 229e6, n
    assert cfg.dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(M.PRESETS))
def test_flops_per_token(name):
    cfg = M.PRESETS[name]
    abstract = nnx.eval_shape(lambda: M.Transformer(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract.blocks, nnx.Param))
    matmul_params = sum(math.prod(v.shape) for _, v in flat if len(v.shape) >= 2)
    f0 = M.flops_per_token(cfg, 0)
    # 2 FLOPs per weight of every matmul, plus the output projection d x V
    assert f0 == 2 * matmul_params + 2 * cfg.d_model * cfg.vocab_size
    assert f0 == pytest.approx(2 * (M.param_count(cfg, embeddings=False) + cfg.d_model * cfg.vocab_size), rel=1e-2)
    # attention: QK^T and AV, 2 FLOPs each, per layer, head, head dim and key
    ctx = 1000
    attn = M.flops_per_token(cfg, ctx) - f0
    assert attn == 4 * cfg.num_layers * cfg.num_heads * cfg.dims_per_head * ctx


# --- packed sequences -------------------------------------------------------------------------


def test_packed_sequences_equal_examples_run_alone():
    model = _build(SMALL)
    alone = _tokens((2, 6), SMALL, seed=2)  # two examples, each run on its own row
    pad = 3
    tokens = jnp.concatenate([alone[:1], alone[1:], jnp.zeros((1, pad), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 6 + [0] * pad], jnp.int32)
    positions = jnp.array([list(range(6)) * 2 + list(range(pad))], jnp.int32)
    packed = _forward(model, tokens, positions, segments)
    want = _forward(model, alone)
    np.testing.assert_allclose(packed[0, :6], want[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 6:12], want[1], atol=1e-5)
    # other padding ids change nothing for real tokens
    tokens2 = tokens.at[:, 12:].set(_tokens((1, pad), SMALL, seed=4))
    again = _forward(model, tokens2, positions, segments)
    np.testing.assert_allclose(again[:, :12], packed[:, :12], atol=1e-6)
    # in one segment, the second example would see the first: the test can tell the difference
    unsegmented = _forward(model, tokens, positions, jnp.ones_like(segments))
    assert float(jnp.abs(unsegmented[:, 6:12] - packed[:, 6:12]).max()) > 1e-3


def test_training_attention_impls_and_blocks_agree(monkeypatch):
    """The training forward's kernels (jaxapr.kernels, tested on their own there): attention
    block by block or dense, CPU backwards or plain XLA ones, the model's logits and gradients
    are the same."""
    cfg = SMALL.replace(max_len=64)
    model = _build(cfg)
    tokens = _tokens((2, 64), cfg, seed=5)
    segments = jnp.array([[1] * 20 + [2] * 30 + [0] * 14, [1] * 64], jnp.int32)
    positions = jnp.array([list(range(20)) + list(range(30)) + [0] * 14, list(range(64))], jnp.int32)

    def run(impl, block, t=64):  # eager: ATTENTION_BLOCK / kernels.IMPL are read at trace time
        monkeypatch.setattr(M, "ATTENTION_BLOCK", block)
        monkeypatch.setattr(kernels, "IMPL", impl)
        graphdef, params = nnx.split(model)
        loss = lambda p: nnx.merge(graphdef, p)(tokens[:, :t], positions[:, :t], segments[:, :t]).std()
        return model(tokens[:, :t], positions[:, :t], segments[:, :t]), jax.grad(loss)(params)

    dense, dense_grad = run("xla", 1024)
    for impl, block in [("xla", 16), ("cpu", 16), ("cpu", 1024)]:
        logits, grad = run(impl, block)
        np.testing.assert_allclose(logits, dense, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, dense_grad)
    odd, _ = run("cpu", 16, t=60)  # not a multiple of the block
    np.testing.assert_allclose(odd, dense[:, :60], atol=1e-5)


# --- KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(num_kv_heads=1, tie_embeddings=False)], ids=["gqa", "mqa-untied"])
def test_forward_cached_matches_full_forward(cfg):
    """Two rows at different positions: prefill part of each prompt (row 1 shorter, masked),
    then decode token by token; every real token's logits equal the full forward's."""
    model = _build(cfg)
    total, steps = 12, 5
    seqs = _tokens((2, total), cfg, seed=5)
    full = _forward(model, seqs)
    prefill = np.array([6, 3])  # tokens written per row in the prefill
    cache = model.init_cache(2, max_len=32)
    t = int(prefill.max())
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    write = positions < jnp.asarray(prefill)[:, None]
    logits, cache = _cached(model, seqs[:, :t], positions, cache, write)
    for row, n in enumerate(prefill):
        np.testing.assert_allclose(logits[row, :n], full[row, :n], atol=1e-5)
    for i in range(steps):
        pos = jnp.asarray(prefill + i, jnp.int32)[:, None]
        tok = jnp.take_along_axis(seqs, pos, axis=1)
        logits, cache = _cached(model, tok, pos, cache)
        for row in range(2):
            np.testing.assert_allclose(logits[row, 0], full[row, int(pos[row, 0])], atol=1e-5)
    assert len(cache["k"]) == len(cache["v"]) == cfg.num_layers
    assert cache["k"][0].shape == (2, cfg.num_kv_heads, cfg.dims_per_head, 32)
    assert cache["v"][0].shape == (2, cfg.num_kv_heads, 32, cfg.dims_per_head)


def test_cache_entries_beyond_position_are_not_read():
    model = _build(SMALL)
    seqs = _tokens((1, 4), SMALL, seed=6)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    clean = model.init_cache(1, max_len=16)

    def garbage_from_4(c, axis):  # cache entries 4.. hold 7.0
        return jnp.where(jax.lax.broadcasted_iota(jnp.int32, c.shape, axis) >= 4, 7.0, c)

    dirty = {n: tuple(garbage_from_4(c, M.CACHE_SEQ_AXIS[n]) for c in cs) for n, cs in clean.items()}
    assert float(dirty["k"][0].sum()) > 0 and float(dirty["v"][1].sum()) > 0
    a, _ = _cached(model, seqs, pos, clean)
    b, _ = _cached(model, seqs, pos, dirty)
    np.testing.assert_array_equal(a, b)


# --- GQA and untied embeddings ----------------------------------------------------------------


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head h uses kv head h // (heads / kv_heads): a GQA model equals the MHA model whose
    k/v projections repeat each kv head."""
    gqa = _build(SMALL)
    mha = _build(SMALL.replace(num_kv_heads=SMALL.num_heads))
    group = SMALL.num_heads // SMALL.num_kv_heads
    assert gqa.blocks[0].attn.wk[...].shape == (32, 2, 8)
    # the same seed draws the same keys in the same order: only wk / wv differ
    np.testing.assert_array_equal(mha.blocks[1].attn.wq[...], gqa.blocks[1].attn.wq[...])
    for g, m in zip(gqa.blocks, mha.blocks):
        m.attn.wk[...] = jnp.repeat(g.attn.wk[...], group, axis=1)
        m.attn.wv[...] = jnp.repeat(g.attn.wv[...], group, axis=1)
    tokens = _tokens((2, 9), SMALL)
    np.testing.assert_allclose(_forward(mha, tokens), _forward(gqa, tokens), atol=1e-5)


def test_untied_embeddings_use_unembed():
    cfg = SMALL.replace(tie_embeddings=False)
    model = _build(cfg)
    assert model.unembed[...].shape == (cfg.d_model, cfg.vocab_size)
    assert not hasattr(_build(SMALL), "unembed")
    tokens = _tokens((1, 5), cfg)
    assert float(jnp.abs(_forward(model, tokens)).max()) > 0
    model.unembed[...] = jnp.zeros_like(model.unembed[...])
    np.testing.assert_array_equal(_forward(model, tokens), 0.0)


# --- errors -----------------------------------------------------------------------------------


def _one_line_error(fn, *match):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg


def test_config_errors_are_one_line():
    _one_line_error(lambda: SMALL.replace(num_heads=4, num_kv_heads=3), "num_heads=4", "num_kv_heads=3")
    _one_line_error(lambda: SMALL.replace(dtype="float64"), "float64")
    _one_line_error(lambda: SMALL.replace(param_dtype="int8"), "int8")
    _one_line_error(lambda: SMALL.replace(d_model=30), "d_model=30")
    _one_line_error(lambda: SMALL.replace(num_layers=0), "num_layers=0")
    _one_line_error(lambda: M.Transformer(M.ModelConfig(num_kv_heads=3), rngs=nnx.Rngs(0)), "num_kv_heads=3")
    _one_line_error(lambda: M.get_config("nope"), "'nope'", "tiny")


def test_get_config_overrides():
    cfg = M.get_config("tiny", max_len=256)
    assert cfg.max_len == 256 and cfg.d_model == M.PRESETS["tiny"].d_model
    assert M.get_config("paper") is M.PRESETS["paper"]


def test_check_tokens():
    cfg = SMALL
    M.check_tokens(np.array([[0, 1, cfg.vocab_size - 1]]), cfg)  # fine
    M.check_tokens(np.zeros((0,), np.int32), cfg)  # empty is fine
    _one_line_error(lambda: M.check_tokens(np.array([1, cfg.vocab_size]), cfg), str(cfg.vocab_size))
    _one_line_error(lambda: M.check_tokens(np.array([-1, 2]), cfg, what="prompt"), "prompt", "-1")
    _one_line_error(lambda: M.check_tokens(np.zeros((1, cfg.max_len + 1), np.int32), cfg), str(cfg.max_len + 1))
    _one_line_error(lambda: M.check_tokens(np.array([0.5]), cfg), "float")
