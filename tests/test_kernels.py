"""Tests for jaxapr.kernels: causal attention in both implementations against a float64 numpy
oracle, the CPU kernels' hand-written backwards against autodiff of the plain ops, block sizes,
jit vs eager, sharded batches, dtypes, one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxapr import kernels as K


def _inputs(b=3, t=40, h=4, kv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    seg = np.zeros((b, t), np.int32)
    seg[0] = 1  # one example
    seg[1, :13], seg[1, 13:31] = 1, 2  # two examples, then padding (segment 0)
    for i, s in enumerate(range(0, t, 7)):  # short examples of 7
        seg[2 % b, s : s + 7] = i + 1
    return q, k, v, jnp.asarray(seg)


def _oracle(q, k, v, seg):
    """Dense masked softmax attention in float64, head by head (GQA: head h uses KV head
    h // (H / KV))."""
    q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    allowed = np.tril(np.ones((t, t), bool))
    for r in range(b):
        mask = allowed & (seg[r][:, None] == seg[r][None, :])
        for j in range(h):
            s = q[r, :, j] @ k[r, :, j // g].T / np.sqrt(d)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[r, :, j] = (p / p.sum(-1, keepdims=True)) @ v[r, :, j // g]
    return out


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("block", [8, 16, 64])
@pytest.mark.parametrize("kv", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_matches_numpy_oracle(impl, block, kv):
    q, k, v, seg = _inputs(kv=kv)  # t = 40: a partial last block for 16, one block for 64
    f = jax.jit(lambda *a: K.causal_attention(*a, block=block, impl=impl))
    np.testing.assert_allclose(f(q, k, v, seg), _oracle(q, k, v, seg), atol=2e-5)


@pytest.mark.parametrize("kv", [1, 2], ids=["mqa", "gqa"])
def test_cpu_backward_equals_autodiff_of_xla(kv):
    """The hand-written backward (recomputed scores) against autodiff of the fused path."""
    q, k, v, seg = _inputs(kv=kv, seed=1)
    w = jax.random.normal(jax.random.key(0), q.shape)

    def grads(impl, block):
        loss = lambda q, k, v: jnp.sum(K.causal_attention(q, k, v, seg, block=block, impl=impl) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want = grads("xla", 64)
    for block in (8, 16):
        for got, ref in zip(grads("cpu", block), want):
            np.testing.assert_allclose(got, ref, atol=1e-5)
    # the gradient is not trivially shared: a wrong mask changes it
    other = jax.grad(lambda q: jnp.sum(K.causal_attention(q, k, v, jnp.ones_like(seg), impl="cpu") * w))(q)
    assert float(jnp.abs(other - want[0]).max()) > 1e-2


def test_cpu_eager_equals_jit_and_other_segments_do_not_leak():
    q, k, v, seg = _inputs(seed=2)
    eager = K.causal_attention(q, k, v, seg, block=16, impl="cpu")
    jitted = jax.jit(lambda *a: K.causal_attention(*a, block=16, impl="cpu"))(q, k, v, seg)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)
    # row 1: changing the keys/values of the second example leaves the first one's outputs alone
    k2, v2 = k.at[1, 13:31].add(3.0), v.at[1, 13:31].add(3.0)
    moved = K.causal_attention(q, k2, v2, seg, block=16, impl="cpu")
    np.testing.assert_allclose(moved[1, :13], eager[1, :13], atol=1e-6)
    assert float(jnp.abs(moved[1, 13:31] - eager[1, 13:31]).max()) > 1e-2


def test_cpu_sharded_batch_equals_unsharded():
    """Batch split over 8 (fake) devices: the loop takes one row per shard; same result and
    gradient as one device."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes them)")
    q, k, v, seg = _inputs(b=8, t=24, seed=3)
    mesh = Mesh(np.array(devices[:8]), ("data",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))

    def f(q, k, v, seg):
        out = K.causal_attention(q, k, v, seg, block=8, impl="cpu")
        return out, jax.grad(lambda q: jnp.sum(K.causal_attention(q, k, v, seg, block=8, impl="cpu") ** 2))(q)

    out, dq = jax.jit(f)(*map(put, (q, k, v, seg)))
    ref_out, ref_dq = jax.jit(f)(q, k, v, seg)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(dq, ref_dq, atol=1e-5)
    np.testing.assert_allclose(out, _oracle(q, k, v, seg), atol=2e-5)


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v, seg = _inputs(seed=4)
    out = K.causal_attention(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg, block=16, impl="cpu"
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _oracle(q, k, v, seg), atol=5e-2)
    g = jax.grad(
        lambda q: jnp.sum(
            K.causal_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg, impl="cpu").astype(jnp.float32)
        )
    )(q.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16


def test_auto_is_cpu_on_cpu_and_bad_impl_is_one_line():
    q, k, v, seg = _inputs(seed=5)
    assert jax.default_backend() == "cpu"
    jaxpr = str(jax.make_jaxpr(lambda *a: K.causal_attention(*a, impl="auto"))(q, k, v, seg))
    assert "custom_vjp" in jaxpr
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda *a: K.causal_attention(*a, impl="xla"))(q, k, v, seg))
    with pytest.raises(ValueError, match=r"kernel impl='flash': expected one of \('auto', 'cpu', 'xla'\)"):
        K.causal_attention(q, k, v, seg, impl="flash")
    with pytest.raises(ValueError, match="kernel impl='flash'"):
        K.dense(q, k[0, 0], impl="flash")


# --- dense ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(8, 24), (24, 8)], ids=["narrow-x", "narrow-dy"])
def test_dense_value_and_gradients_equal_plain_matmul(k, n):
    """Both branches of the CPU backward (which operand it transposes) against autodiff of x @ w,
    on a 3-d input; jit and eager."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 5, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(3, 5, n)), jnp.float32)
    np.testing.assert_allclose(K.dense(x, w), x @ w, atol=1e-5)
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w) * c), argnums=(0, 1))(x, w)
    loss = lambda x, w: jnp.sum(jnp.sin(K.dense(x, w)) * c)
    for got in (jax.grad(loss, argnums=(0, 1))(x, w), jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-4)
    assert "custom_vjp" in str(jax.make_jaxpr(K.dense)(x, w))  # the CPU path is the one tested


def test_dense_mixed_precision_gradient_reaches_float32_params():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(6, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    g = jax.grad(lambda w: jnp.sum(K.dense(x, w.astype(jnp.bfloat16)).astype(jnp.float32)))(w)
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, np.broadcast_to(np.asarray(x, np.float32).sum(0)[:, None], (16, 4)), rtol=2e-2)
