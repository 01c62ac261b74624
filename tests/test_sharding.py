"""Tests for jaxapr.sharding on 8 fake CPU devices (see conftest.py): meshes, rules, parameters
really split, and sharded forwards equal to the unsharded model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxapr import model as M
from jaxapr import sharding as S

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

# Divides evenly by 2 everywhere except the Countdown vocabulary (335, odd).
CFG = M.ModelConfig(
    d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=64, tie_embeddings=False
)
assert CFG.vocab_size % 2 == 1


@pytest.fixture(scope="module")
def mesh8():
    return S.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (4, 12), 0, CFG.vocab_size, dtype=jnp.int32)


@pytest.fixture(scope="module")
def reference(tokens):
    """Unsharded logits of the same model (parameters from the same seed)."""
    return nnx.jit(lambda m, t: m(t))(M.Transformer(CFG, rngs=nnx.Rngs(0)), tokens)


def _params(model):
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


# --- meshes -----------------------------------------------------------------------------------


def test_make_mesh_shapes():
    one = S.make_mesh(devices=jax.devices()[:1])
    assert one.axis_names == ("data", "fsdp", "tensor") and one.devices.size == 1
    m = S.make_mesh(2, 2, 2)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(m.axis_types) == {AxisType.Auto}
    assert dict(S.make_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert dict(S.make_mesh(fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(S.make_mesh(tensor=-1, devices=jax.devices()[:4]).shape)["tensor"] == 4


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((3, 1, 1), "3 devices: expected 8"),
        ((2, 2, 1), "4 devices: expected 8"),
        ((-1, -1, 1), "at most one -1"),
        ((3, -1, 1), "not a multiple of 3"),
        ((0, 8, 1), "positive"),
        (("2", 4, 1), "positive"),
    ],
)
def test_make_mesh_errors(sizes, match):
    with pytest.raises(ValueError, match=match) as info:
        S.make_mesh(*sizes)
    assert "\n" not in str(info.value)


# --- rules ------------------------------------------------------------------------------------


def test_rules_for():
    assert S.rules_for("paper") == S.RULES["fsdp_tp"]
    assert S.rules_for("tiny") == S.rules_for("mini") == S.RULES["replicated"]
    assert S.rules_for(M.PRESETS["paper"]) == S.RULES["fsdp_tp"]
    assert S.rules_for(M.PRESETS["tiny"]) == S.RULES["replicated"]
    assert S.rules_for("replicated") == S.RULES["replicated"]
    over = dict(S.rules_for("paper", vocab=None, embed=("fsdp", "data")))
    assert over["vocab"] is None and over["embed"] == ("fsdp", "data") and over["mlp"] == "tensor"
    with pytest.raises(ValueError, match="'nope'"):
        S.rules_for("nope")
    with pytest.raises(ValueError, match="'vocabulary'"):
        S.rules_for("paper", vocabulary=None)


def test_rule_sets_cover_every_logical_name_of_the_model():
    specs = jax.tree.leaves(
        nnx.get_partition_spec(nnx.state(nnx.eval_shape(lambda: M.Transformer(CFG, rngs=nnx.Rngs(0))), nnx.Param))
    )
    names = {n for spec in specs for n in spec}
    assert names == {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}
    for rules in S.RULES.values():
        assert names <= dict(rules).keys()
    assert all(axes is None for name, axes in S.RULES["replicated"] if name in names)
    fsdp_tp = dict(S.RULES["fsdp_tp"])
    assert fsdp_tp["embed"] == "fsdp" and fsdp_tp["norm"] is None and fsdp_tp["head_dim"] is None
    assert all(fsdp_tp[n] == "tensor" for n in ("heads", "kv_heads", "mlp", "vocab"))


def test_logical_to_mesh():
    rules = S.RULES["fsdp_tp"]
    assert S.logical_to_mesh(("embed", "heads", "head_dim"), rules) == P("fsdp", "tensor", None)
    assert S.logical_to_mesh(P("batch", None), rules) == P(("data", "fsdp"), None)
    assert S.logical_to_mesh((), rules) == P()
    with pytest.raises(ValueError, match="'layers' has no rule"):
        S.logical_to_mesh(("layers", "embed"), rules)


def test_fit_spec_falls_back_to_replication(mesh8):
    assert S.fit_spec(P("tensor", "fsdp"), (335, 64), mesh8) == P(None, "fsdp")
    assert S.fit_spec(P("tensor", "fsdp"), (336, 64), mesh8) == P("tensor", "fsdp")
    assert S.fit_spec(P(("data", "fsdp")), (6, 3), mesh8) == P("data", None)  # 4 does not divide 6
    assert S.fit_spec(P(("data", "fsdp")), (3,), mesh8) == P(None)
    assert S.fit_spec(P("tensor", "tensor"), (4, 4), mesh8) == P("tensor", None)  # an axis once


def test_paper_shardings_without_allocating(mesh8):
    abstract = nnx.eval_shape(lambda: M.Transformer(M.PRESETS["paper"], rngs=nnx.Rngs(0)))
    shardings = _params(S.param_shardings(abstract, mesh8, S.rules_for("paper")))
    assert shardings[("embed",)].get_value().spec == P(None, "fsdp")  # vocab 335: replicated
    wq = shardings[("blocks", 0, "attn", "wq")].get_value()
    assert wq.spec == P("fsdp", "tensor", None)
    assert wq.shard_shape((1024, 16, 64)) == (512, 8, 64)
    assert shardings[("blocks", 0, "mlp", "w_down")].get_value().spec == P("tensor", "fsdp")
    assert shardings[("final_norm", "scale")].get_value().spec == P(None)


# --- parameters really split ------------------------------------------------------------------

EXPECTED_FSDP_TP = {
    ("embed",): P(None, "fsdp"),
    ("unembed",): P("fsdp", None),
    ("final_norm", "scale"): P(None),
    ("blocks", 0, "attn", "wq"): P("fsdp", "tensor", None),
    ("blocks", 0, "attn", "wk"): P("fsdp", "tensor", None),
    ("blocks", 0, "attn", "wo"): P("tensor", None, "fsdp"),
    ("blocks", 0, "mlp", "w_gate"): P("fsdp", "tensor"),
    ("blocks", 0, "mlp", "w_down"): P("tensor", "fsdp"),
    ("blocks", 0, "attn_norm", "scale"): P(None),
}


def _check_placed(model, mesh, expected):
    params = _params(model)
    for path, spec in expected.items():
        array = params[path][...]
        assert array.sharding.spec == spec, path
        assert array.sharding.mesh.shape == mesh.shape
        ways = [math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax or ())) for ax in spec]
        ways += [1] * (array.ndim - len(ways))
        shard = tuple(d // w for d, w in zip(array.shape, ways))
        assert len(array.addressable_shards) == 8
        assert all(s.data.shape == shard for s in array.addressable_shards), path
    for path, var in params.items():  # every parameter is on all 8 devices
        assert len(var[...].sharding.device_set) == 8, path


def test_shard_model_fsdp_tp(mesh8, tokens, reference):
    model = S.shard_model(M.Transformer(CFG, rngs=nnx.Rngs(0)), mesh8, S.RULES["fsdp_tp"])
    _check_placed(model, mesh8, EXPECTED_FSDP_TP)
    params = _params(model)
    assert params[("blocks", 0, "attn", "wq")][...].addressable_shards[0].data.shape == (32, 2, 16)  # of [64, 4, 16]
    assert params[("blocks", 0, "attn", "wk")][...].addressable_shards[0].data.shape == (32, 1, 16)  # of [64, 2, 16]
    assert params[("embed",)][...].addressable_shards[0].data.shape == (335, 32)
    # an NNX-jitted call of the sharded model still computes the same function
    np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, tokens), reference, atol=1e-5)


def test_shard_model_replicated(mesh8):
    model = S.shard_model(M.Transformer(CFG, rngs=nnx.Rngs(0)), mesh8, S.RULES["replicated"])
    expected = {path: P(*(None,) * var[...].ndim) for path, var in _params(model).items()}
    _check_placed(model, mesh8, expected)


def test_divisible_vocab_is_split(mesh8):
    cfg = CFG.replace(vocab_size=336)
    model = S.shard_model(M.Transformer(cfg, rngs=nnx.Rngs(0)), mesh8, S.RULES["fsdp_tp"])
    _check_placed(model, mesh8, {("embed",): P("tensor", "fsdp"), ("unembed",): P("fsdp", "tensor")})


# --- sharded forwards equal the unsharded model -----------------------------------------------


@pytest.mark.parametrize("rules", ["fsdp_tp", "replicated"])
def test_sharded_forward_equals_unsharded(rules, mesh8, tokens, reference):
    model = M.Transformer(CFG, rngs=nnx.Rngs(0))
    forward = S.sharded_forward(model, mesh8, S.RULES[rules])
    logits = forward(tokens)
    assert logits.sharding == S.data_sharding(mesh8)
    assert logits.addressable_shards[0].data.shape == (1, 12, CFG.vocab_size)  # batch 4 / (2 x 2)
    np.testing.assert_allclose(logits, reference, atol=1e-5)
    segments = jnp.ones_like(tokens).at[:, 8:].set(2)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (4, 12))
    unsharded = nnx.jit(lambda m, *a: m(*a))(model, tokens, positions, segments)
    np.testing.assert_allclose(forward(tokens, positions, segments), unsharded, atol=1e-5)


def test_sharded_forward_one_device(tokens, reference):
    mesh = S.make_mesh(devices=jax.devices()[:1])
    forward = S.sharded_forward(M.Transformer(CFG, rngs=nnx.Rngs(0)), mesh, S.rules_for("paper"))
    np.testing.assert_allclose(forward(tokens), reference, atol=1e-5)


def test_sharded_forward_rejects_indivisible_batch(mesh8, tokens):
    forward = S.sharded_forward(M.Transformer(CFG, rngs=nnx.Rngs(0)), mesh8, S.RULES["replicated"])
    with pytest.raises(ValueError, match="batch size 3 is not divisible by data x fsdp = 4"):
        forward(tokens[:3])


def test_data_and_replicated_shardings(mesh8):
    assert S.data_sharding(mesh8).spec == P(("data", "fsdp"))
    assert S.replicated(mesh8).spec == P()
    x = jax.device_put(jnp.zeros((8, 3)), S.data_sharding(mesh8))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
    keys = S.cache_sharding(mesh8, S.RULES["fsdp_tp"], "k", (4, 2, 16, 32))  # [rows, kv_heads, head_dim, len]
    assert keys.spec == P(("data", "fsdp"), "tensor", None, None)
    values = S.cache_sharding(mesh8, S.RULES["fsdp_tp"], "v", (4, 2, 32, 16))  # [rows, kv_heads, len, head_dim]
    assert values.spec == P(("data", "fsdp"), "tensor", None, None)


def test_sharded_forward_cached_equals_unsharded(mesh8, tokens):
    rules = "fsdp_tp"
    model = M.Transformer(CFG, rngs=nnx.Rngs(0))
    step = S.sharded_forward_cached(model, mesh8, S.RULES[rules])
    plain = nnx.jit(lambda m, *a: m.forward_cached(*a))
    b, prefill = tokens.shape[0], 6
    positions = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (b, prefill))
    write = positions < jnp.array([[6], [4], [5], [2]])  # rows at different positions
    sharded_cache, plain_cache = model.init_cache(b, 32), model.init_cache(b, 32)
    got, sharded_cache = step(tokens[:, :prefill], positions, sharded_cache, write)
    want, plain_cache = plain(model, tokens[:, :prefill], positions, plain_cache, write)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for name in ("k", "v"):
        expected = S.cache_sharding(mesh8, S.RULES[rules], name, sharded_cache[name][0].shape)
        assert all(c.sharding.spec == expected.spec for c in sharded_cache[name])
    pos = jnp.array([[6], [4], [5], [2]], jnp.int32)
    for i in range(3):
        tok = jnp.take_along_axis(tokens, pos + i, axis=1)
        got, sharded_cache = step(tok, pos + i, sharded_cache)
        want, plain_cache = plain(model, tok, pos + i, plain_cache, jnp.ones_like(tok, bool))
        np.testing.assert_allclose(got, want, atol=1e-5)
    for got_c, want_c in zip(jax.tree.leaves(sharded_cache), jax.tree.leaves(plain_cache)):
        np.testing.assert_allclose(got_c, want_c, atol=1e-5)
