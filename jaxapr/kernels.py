"""The training forward's dense layers and attention, with backwards laid out for CPUs.

On the CPU backend XLA materialises every intermediate of a backward pass, and two of them
dominate a small transformer's SFT step on 2 cores: the weight gradient of a dense layer,
x^T @ dy, is fed by a transposed copy of one of its [tokens, features] operands (XLA picks
the wider one, and transposing writes are slow), and attention's [B, H, T, S] scores and
probabilities stream through main memory several times per layer. The two functions here are
what ``jaxapr.model``'s training forward calls. Two implementations, same values and
gradients (tests/test_kernels.py):

- ``"cpu"``: ``dense``'s backward transposes the narrower of x and dy itself, behind an
  optimisation barrier so XLA keeps that choice. ``causal_attention`` runs its query blocks a
  few rows at a time in a ``lax.map`` with a hand-written backward that recomputes the
  probabilities from the saved log-sum-exp (as flash attention does): row by row the scores
  stay in cache, and only q, k, v, the output and the log-sum-exp are kept.
- ``"xla"``: plain ``x @ w``; ``jax.nn.dot_product_attention`` (a fused kernel where the
  backend has one) per query block.

``IMPL = "auto"`` (read when a function is traced; the ``impl`` argument overrides it) picks
``"cpu"`` on the CPU backend and ``"xla"`` elsewhere; BUILD_NOTES' train suite records the SFT
step times of both.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLS = ("auto", "cpu", "xla")
IMPL = "auto"
_NEG = -1e30  # masked scores; every query sees at least itself, so no row is all-masked


def resolve(impl: str | None = None) -> str:
    """``impl`` (default: ``IMPL``) with "auto" resolved for the default backend."""
    impl = IMPL if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"kernel impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


# --- dense ------------------------------------------------------------------------------------


def dense(x, w, *, impl: str | None = None):
    """x [..., K] @ w [K, N] -> [..., N] (x and w in the compute dtype)."""
    return _dense_cpu(x, w) if resolve(impl) == "cpu" else x @ w


@jax.custom_vjp
def _dense_cpu(x, w):
    return x @ w


def _dense_fwd(x, w):
    return x @ w, (x, w)


def _dense_bwd(res, dy):
    x, w = res
    k, n = w.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    if k <= n:
        dw = jax.lax.optimization_barrier(x2.T) @ dy2
    else:
        dw = (jax.lax.optimization_barrier(dy2.T) @ x2).T
    return dy @ w.T, dw


_dense_cpu.defvjp(_dense_fwd, _dense_bwd)


# --- causal attention over packed rows --------------------------------------------------------


def causal_attention(q, k, v, segment_ids, *, block: int = 128, impl: str | None = None) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, KV, D] (H a multiple of KV), segment_ids int[B, T] ->
    [B, T, H, D] in q's dtype. Query ``t`` sees keys ``s <= t`` of its own segment (packed
    examples; segment 0 is padding and sees only padding). ``block``: query rows per block
    (block b attends to the keys before its end only: about half the score work of one dense
    [T, T] block)."""
    impl = resolve(impl)
    t = q.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    allowed = (idx[:, None] >= idx[None, :]) & (seg[:, :, None] == seg[:, None, :])  # [B, T, S]
    if impl == "xla":
        mask = allowed[:, None]  # [B, 1, T, S]
        return jnp.concatenate(
            [
                jax.nn.dot_product_attention(
                    q[:, i : i + block],
                    k[:, : i + block],
                    v[:, : i + block],
                    mask=mask[:, :, i : i + block, : i + block],
                )
                for i in range(0, t, block)
            ],
            axis=1,
        )
    b, _, h, d = q.shape
    kv = k.shape[2]
    f32 = jnp.float32
    qt = (q.astype(f32) * d**-0.5).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    kt = k.astype(f32).transpose(0, 2, 1, 3)  # [B, KV, S, D]
    vt = v.astype(f32).transpose(0, 2, 1, 3)
    # Each loop iteration takes n rows, one from each of n equal parts of the batch: where the
    # batch is split over devices (n a multiple of the data shards), every device keeps its rows.
    n = math.gcd(b, jax.device_count())

    def split(a):  # [B, ...] -> [B / n, n, ...]
        return jnp.swapaxes(a.reshape(n, b // n, *a.shape[1:]), 0, 1)

    o = _rows_kernel(block)(split(qt), split(kt), split(vt), split(allowed))
    o = jnp.swapaxes(o, 0, 1).reshape(b, kv, h // kv, t, d)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def _scores(q, k, allowed, i, end):
    """Scores [n, KV, G, C, S] of query rows [i, end) against keys [0, end), masked."""
    s = jnp.einsum("nkgtd,nksd->nkgts", q[:, :, :, i:end], k[:, :, :end])
    return jnp.where(allowed[:, None, None, i:end, :end], s, _NEG)


def _fwd_rows(block, q, k, v, allowed):
    """One iteration: q [n, KV, G, T, D] (scaled), k/v [n, KV, S, D], allowed [n, T, S] ->
    (out [n, KV, G, T, D], log-sum-exp [n, KV, G, T, 1])."""
    t = q.shape[3]
    outs, lses = [], []
    for i in range(0, t, block):
        end = min(i + block, t)
        s = _scores(q, k, allowed, i, end)
        m = s.max(-1, keepdims=True)
        e = jnp.exp(s - m)
        z = e.sum(-1, keepdims=True)
        outs.append(jnp.einsum("nkgts,nksd->nkgtd", e, v[:, :, :end]) / z)
        lses.append(m + jnp.log(z))
    return jnp.concatenate(outs, 3), jnp.concatenate(lses, 3)


def _bwd_rows(block, q, k, v, allowed, o, lse, do):
    t = q.shape[3]
    delta = (do * o).sum(-1, keepdims=True)
    dq, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
    for i in range(0, t, block):
        end = min(i + block, t)
        p = jnp.exp(_scores(q, k, allowed, i, end) - lse[:, :, :, i:end])
        doi = do[:, :, :, i:end]
        dv = dv.at[:, :, :end].add(jnp.einsum("nkgts,nkgtd->nksd", p, doi))
        ds = p * (jnp.einsum("nkgtd,nksd->nkgts", doi, v[:, :, :end]) - delta[:, :, :, i:end])
        dq.append(jnp.einsum("nkgts,nksd->nkgtd", ds, k[:, :, :end]))
        dk = dk.at[:, :, :end].add(jnp.einsum("nkgts,nkgtd->nksd", ds, q[:, :, :, i:end]))
    return jnp.concatenate(dq, 3), dk, dv


@functools.cache
def _rows_kernel(block: int):
    """The row-looped attention for one block size: a custom_vjp over [iterations, n, ...]."""

    @jax.custom_vjp
    def attend(q, k, v, allowed):
        return jax.lax.map(lambda a: _fwd_rows(block, *a)[0], (q, k, v, allowed))

    def fwd(q, k, v, allowed):
        o, lse = jax.lax.map(lambda a: _fwd_rows(block, *a), (q, k, v, allowed))
        return o, (q, k, v, allowed, o, lse)

    def bwd(res, do):
        dq, dk, dv = jax.lax.map(lambda a: _bwd_rows(block, *a), (*res, do))
        return dq, dk, dv, None

    attend.defvjp(fwd, bwd)
    return attend
