"""The policy: a Llama-style decoder-only transformer in Flax NNX.

RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention (``num_kv_heads`` <
``num_heads``), tied or untied embeddings. Decoding attends through
``cached_attention`` (two einsums over the cache layout below); the training forward through
``jaxapr.kernels.causal_attention`` (block-causal) and every dense layer through
``jaxapr.kernels.dense``: on a CPU both have hand-written backwards (faster SFT
steps there: BUILD_NOTES.md, train suite), elsewhere they are the plain fused ops. Parameters are float32 by default; ``dtype`` is
the compute dtype (float32 on CPU, bfloat16 on GPU/TPU); logits are always float32.

One pass over the layers, ``model.forward(tokens, positions, attention) -> (hidden,
layer_caches)``, serves every forward: each layer computes its queries, keys and values and
hands them to ``attention``, a callback that says where keys and values are kept and which of
them each query sees (``model.logits(hidden)`` then gives the logits). Two forwards are built
on it, and the decoding engine (``jaxapr.engine``) uses only the second:

- ``model(tokens, positions=None, segment_ids=None, remat=..., attention=...) -> logits`` for
  training: causal within a row, and tokens of different segments (packed examples; 0 =
  padding) never attend to each other. ``remat`` (``REMATS``) and ``attention``
  (``ATTENTIONS``) trade memory and speed, never values.
- ``model.forward_cached(tokens, positions, cache, write_mask, rows, window) -> (logits,
  cache)`` for decoding with a KV cache of a fixed number of rows (slots): the keys/values of
  token ``(b, t)`` are written into cache row ``rows[b]`` (default ``b``) at index
  ``positions[b, t]`` where ``write_mask[b, t]``, and each query attends to that row's entries
  at indices ``<= positions[b, t]`` (among the first ``window``). So every row can be at a
  different position: a prefill writes a prompt at 0..n-1, a decode step writes one token per
  row at that row's own position, an extension appends tokens to rows that hold a context.
  Entries beyond a row's position are never read, so a released slot needs no clearing.

**The KV cache** (``init_cache``) is one layout everywhere: per layer, keys
``[rows, kv_heads, head_dim, max_len]`` and values ``[rows, kv_heads, max_len, head_dim]``.
Keys are stored transposed so that a decode step's scores are a matrix product along
contiguous cache entries and its values' weighted sum streams rows of ``v``: on a CPU a decode
step's attention is bound by reading the cache, and this layout reads it faster than a
heads-major one (BUILD_NOTES.md). One array per layer lets a step update each layer in place.
``CACHE_SEQ_AXIS`` names the cache-position axis of each.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``norm``) that ``jaxapr.sharding`` maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxapr import kernels
from jaxapr.tokenizer import CountdownTokenizer

ATTENTION_BLOCK = 128  # query block of the training forward's causal attention

# Activation rematerialisation of the training forward, per block: "none" keeps every
# intermediate for the backward; "block" keeps only each block's input and recomputes the block
# in the backward (the least memory, about one more forward of compute); "dots" keeps the
# outputs of the matrix products without a batch dimension (the dense layers) and recomputes
# the rest (norms, rotary, activations, attention).
REMATS = ("none", "block", "dots")
# The training forward's attention: "blocked" is ``kernels.causal_attention`` (on a CPU the
# row-looped kernel, elsewhere one ``jax.nn.dot_product_attention`` per query block); "fused" is
# one ``jax.nn.dot_product_attention`` call over the whole row with the causal and segment
# mask, through cuDNN's fused kernel on a GPU (XLA's elsewhere, which materialises the scores).
ATTENTIONS = ("blocked", "fused")

# A forward's attention in one layer: (layer, q, k, v) -> (heads out, the layer's new cache);
# see ``Transformer.forward``.
Attend = Callable[[int, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]

# The KV cache layout (see the module docstring): each array's axes by logical name, None for
# the cache position; ``jaxapr.sharding`` maps the names to mesh axes.
CACHE_AXES = {"k": ("batch", "kv_heads", "head_dim", None), "v": ("batch", "kv_heads", None, "head_dim")}
CACHE_SEQ_AXIS = {name: axes.index(None) for name, axes in CACHE_AXES.items()}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = CountdownTokenizer().vocab_size
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # default d_model // num_heads
    mlp_dim: int = 384
    max_len: int = 1024  # the context window of one call
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def check(self) -> ModelConfig:
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "max_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}: set head_dim")
        if self.dims_per_head % 2:
            raise ValueError(f"head dimension {self.dims_per_head} must be even for rotary positions")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {sorted(_DTYPES)}")
        return self

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw).check()


PRESETS: dict[str, ModelConfig] = {
    # ~0.9M parameters: the tests and the 3-number quickstart (--preset=tiny).
    "tiny": ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=384, max_len=1024),
    # ~4.8M parameters: a larger CPU model (reproduce --preset=mini trains the tiny dimensions:
    # this one sees too few tokens in its budget; experiments/configs/sft.py).
    "mini": ModelConfig(d_model=256, num_layers=6, num_heads=8, num_kv_heads=4, mlp_dim=768, max_len=1024),
    # the APR paper: 18 layers, d 1024, 16 heads, MLP 2752, 4096 context (228M non-embedding).
    "paper": ModelConfig(
        d_model=1024, num_layers=18, num_heads=16, num_kv_heads=16, mlp_dim=2752, max_len=4096, dtype="bfloat16"
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides; one-line error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name].check()


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Number of parameters (computed from the shapes, not hand-written)."""
    h, kv, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head, cfg.d_model
    attn = d * h * dh + 2 * d * kv * dh + h * dh * d
    layer = attn + 3 * d * cfg.mlp_dim + 2 * d
    total = cfg.num_layers * layer + d  # final norm
    if embeddings:
        total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return total


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs per token with ``context`` keys attended (2 per multiply-add), including
    the output projection; training costs about 3x this."""
    matmul = 2 * (param_count(cfg, embeddings=False) - cfg.num_layers * 2 * cfg.d_model - cfg.d_model)
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.dims_per_head * context
    return float(matmul + attention + 2 * cfg.d_model * cfg.vocab_size)


def _param(rngs: nnx.Rngs, shape, names, scale: float, dtype) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, dtype) * scale
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on x [B, T, H, D] at integer positions [B, T]."""
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head
        pd = _DTYPES[cfg.param_dtype]
        self.cfg = cfg
        self.wq = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), d**-0.5, pd)
        self.wk = _param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), d**-0.5, pd)
        self.wv = _param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), d**-0.5, pd)
        self.wo = _param(
            rngs, (h, dh, d), ("heads", "head_dim", "embed"), (h * dh) ** -0.5 / math.sqrt(2 * cfg.num_layers), pd
        )

    def qkv(self, x, positions):
        def heads(w):  # [d, n, k] weights -> x's rows as [..., n, k]
            return kernels.dense(x, w[...].reshape(w.shape[0], -1).astype(x.dtype)).reshape(*x.shape[:-1], *w.shape[1:])

        q, k, v = heads(self.wq), heads(self.wk), heads(self.wv)
        theta = self.cfg.rope_theta
        return rotary(q, positions, theta), rotary(k, positions, theta), v

    def project(self, out):
        """Heads [B, T, H, D] -> the residual stream [B, T, d_model]."""
        wo = self.wo[...]
        return kernels.dense(out.reshape(*out.shape[:-2], -1), wo.reshape(-1, wo.shape[-1]).astype(out.dtype))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, m, pd = cfg.d_model, cfg.mlp_dim, _DTYPES[cfg.param_dtype]
        self.w_gate = _param(rngs, (d, m), ("embed", "mlp"), d**-0.5, pd)
        self.w_up = _param(rngs, (d, m), ("embed", "mlp"), d**-0.5, pd)
        self.w_down = _param(rngs, (m, d), ("mlp", "embed"), m**-0.5 / math.sqrt(2 * cfg.num_layers), pd)

    def __call__(self, x):
        dt = x.dtype
        gate = jax.nn.silu(kernels.dense(x, self.w_gate[...].astype(dt)))
        return kernels.dense(gate * kernels.dense(x, self.w_up[...].astype(dt)), self.w_down[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = _DTYPES[cfg.param_dtype]
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.mlp = MLP(cfg, rngs)


class Transformer(nnx.Module):
    """The decoder-only policy; see the module docstring."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg = cfg.check()
        self.cfg = cfg
        pd = _DTYPES[cfg.param_dtype]
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0, pd)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model**-0.5, pd)

    @property
    def dtype(self):
        return _DTYPES[self.cfg.dtype]

    def _embed(self, tokens):
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

    def logits(self, x):
        """Hidden states [..., d_model] (as ``forward`` returns them) -> logits float32[..., V]."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            w = self.embed[...].astype(x.dtype).T * self.cfg.d_model**-0.5
        else:
            w = self.unembed[...].astype(x.dtype)
        return kernels.dense(x, w).astype(jnp.float32)

    def forward(self, tokens, positions, attention: Attend, remat: str = "none") -> tuple[jax.Array, list]:
        """The pass over the layers that every forward runs -> (hidden [B, T, d_model] before
        the final norm, [what ``attention`` returned as each layer's cache]).

        tokens, positions int32[B, T]. In layer ``i``, ``attention(i, q, k, v) -> (out,
        layer_cache)`` gets the layer's queries q [B, T, heads, head_dim] and the tokens' own
        keys/values k, v [B, T, kv_heads, head_dim] (rotary already applied at ``positions``)
        and returns the attended heads ``out`` [B, T, heads, head_dim]; where the keys and
        values come from (these tokens only, or a cache they are first written into) is the
        callback's. ``layer_cache`` is anything (None when there is no cache): returning it
        keeps the callback a pure function, so the whole pass jits.

        ``remat`` (one of ``REMATS``) wraps each block in ``jax.checkpoint``: what its backward
        keeps and what it recomputes (training; a decode keeps "none").
        """
        run = _remat_block(remat)
        x = self._embed(tokens)
        layer_caches = []
        for layer, block in enumerate(self.blocks):
            x, layer_cache = run(block, x, positions, functools.partial(attention, layer))
            layer_caches.append(layer_cache)
        return x, layer_caches

    def __call__(self, tokens, positions=None, segment_ids=None, *, remat: str = "none", attention: str = "blocked"):
        """Training forward: logits float32[B, T, V] for tokens int32[B, T]; ``remat`` one of
        ``REMATS``, ``attention`` one of ``ATTENTIONS`` (same values, different memory and
        speed)."""
        check_train_options(remat, attention)
        b, t = tokens.shape
        idx = jnp.arange(t, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(idx, (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)

        def blocked(layer, q, k, v):
            return kernels.causal_attention(q, k, v, segment_ids, block=ATTENTION_BLOCK), None

        def fused(layer, q, k, v):
            return fused_causal_attention(q, k, v, segment_ids), None

        x, _ = self.forward(tokens, positions, fused if attention == "fused" else blocked, remat=remat)
        return self.logits(x)

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> dict:
        """A zero KV cache (layout in the module docstring): {"k": per layer [B, kv_heads,
        head_dim, max_len], "v": per layer [B, kv_heads, max_len, head_dim]}, tuples of arrays."""
        cfg = self.cfg
        sizes = {"batch": batch_size, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.dims_per_head}
        sizes[None] = max_len or cfg.max_len
        dtype = dtype or self.dtype
        return {
            name: tuple(jnp.zeros(tuple(sizes[a] for a in axes), dtype) for _ in range(cfg.num_layers))
            for name, axes in CACHE_AXES.items()
        }

    def forward_cached(self, tokens, positions, cache: dict, write_mask=None, rows=None, window: int | None = None):
        """Forward with a KV cache -> (logits f32[B, T, V], cache); see the module docstring.

        tokens, positions int32[B, T]; ``write_mask`` bool[B, T] (default all): which tokens'
        keys/values are written. ``rows`` int32[B] (default ``arange(B)``, the cache's own
        rows): the cache row of each batch row; a row index >= the cache's row count writes
        nothing (padding) and its outputs are meaningless. ``window`` (static, default the
        cache length): attention reads only cache indices below it, which must cover every
        position (a short context need not read the whole row).
        """
        b, t = tokens.shape
        num_rows, s = cache["v"][0].shape[0], cache_length(cache)
        window = s if window is None else window
        if write_mask is None:
            write_mask = jnp.ones((b, t), bool)
        where = jnp.where(write_mask, positions, s)  # index s = out of range: dropped
        if rows is None:
            if b != num_rows:
                raise ValueError(f"forward_cached: {b} token rows for a cache of {num_rows} rows: pass rows=")
            rows, gather = jnp.arange(b), None
        else:
            gather = jnp.minimum(rows, num_rows - 1)  # a padding row reads some row; its result is unused
        at = jnp.broadcast_to(rows[:, None], (b, t))
        mask = jnp.arange(window)[None, None, :] <= positions[:, :, None]  # [B, T, window]

        def attention(layer, q, k, v):  # k, v [B, T, kv_heads, head_dim]
            ck, cv = cache["k"][layer], cache["v"][layer]
            ck = ck.at[at, :, :, where].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[at, :, where].set(v.astype(cv.dtype), mode="drop")
            kt = jax.lax.slice_in_dim(ck, 0, window, axis=CACHE_SEQ_AXIS["k"])
            vs = jax.lax.slice_in_dim(cv, 0, window, axis=CACHE_SEQ_AXIS["v"])
            if gather is not None:
                kt, vs = kt[gather], vs[gather]
            return cached_attention(q, kt, vs, mask), (ck, cv)

        x, layer_caches = self.forward(tokens, positions, attention)
        new_k, new_v = zip(*layer_caches)
        return self.logits(x), {"k": tuple(new_k), "v": tuple(new_v)}


def cache_length(cache: dict) -> int:
    """The number of positions a KV cache (``Transformer.init_cache``) holds per row."""
    return cache["k"][0].shape[CACHE_SEQ_AXIS["k"]]


def cached_attention(q, kt, v, mask):
    """q [B, T, H, D] against cached keys kt [B, KV, D, S] and values v [B, KV, S, D] where
    mask bool[B, T, S] -> [B, T, H, D]. Grouped-query heads h = kv * G + g (as
    ``jax.nn.dot_product_attention`` groups them); scores and softmax in float32. The T x G
    queries of a KV head are one matrix against its cache (batch dims lead in every operand,
    so XLA copies no cache entry)."""
    b, t, h, d = q.shape
    kv = kt.shape[1]
    g = h // kv
    qg = (q * d**-0.5).reshape(b, t, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, d)
    scores = jnp.einsum("bkqd,bkds->bkqs", qg, kt.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, :, None, :], scores.reshape(b, kv, t, g, -1), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, t * g, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", weights, v)
    return out.reshape(b, kv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d).astype(q.dtype)


def _block_step(block: Block, x, positions, attend):
    """One block of ``Transformer.forward``: (new residual stream, the layer's cache)."""
    q, k, v = block.attn.qkv(block.attn_norm(x), positions)
    out, layer_cache = attend(q, k, v)
    x = x + block.attn.project(out)
    return x + block.mlp(block.mlp_norm(x)), layer_cache


def _remat_block(remat: str):
    """``_block_step`` as ``remat`` says: itself, or ``_checkpointed`` with the block's
    parameters passed in (so their gradients flow) and the policy of ``remat``."""
    if remat == "none":
        return _block_step
    if remat not in REMATS:
        raise ValueError(f"remat={remat!r}: expected one of {REMATS}")
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None

    def run(block, x, positions, attend):
        graphdef, state = nnx.split(block)
        caches = []

        def step(state, x):
            y, layer_cache = _block_step(nnx.merge(graphdef, state), x, positions, attend)
            caches.append(layer_cache)
            return y

        y = _checkpointed(step, policy)(state, x)
        if any(c is not None for c in caches):
            raise ValueError(f"remat={remat!r} applies to the training forward only (an attention without a cache)")
        return y, None

    return run


def _checkpointed(f, policy):
    """``jax.checkpoint(f, policy=policy)`` whose backward recomputes only once the cotangent
    has arrived: the saved residuals are tied to it (``+ 0 * dy[0]``). Without the tie XLA's
    CPU compiler drops checkpoint's optimisation barriers and merges the recomputation back into
    the forward, so nothing is saved (tests/train/test_plan.py measures the compiled peak)."""
    remat_f = jax.checkpoint(f, policy=policy)

    @jax.custom_vjp
    def g(*args):
        return f(*args)

    def fwd(*args):
        return jax.vjp(remat_f, *args)  # (output, the pullback: its leaves are the residuals)

    def bwd(pullback, dy):
        zero = jnp.zeros((), jnp.float32) * jax.tree.leaves(dy)[0].reshape(-1)[0].astype(jnp.float32)
        tie = lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r
        return jax.tree.map(tie, pullback)(dy)

    g.defvjp(fwd, bwd)
    return g


def check_train_options(remat: str, attention: str) -> None:
    """One-line errors for the training forward's ``remat`` and ``attention`` options."""
    if remat not in REMATS:
        raise ValueError(f"remat={remat!r}: expected one of {REMATS}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTIONS}")


def fused_causal_attention(q, k, v, segment_ids):
    """``kernels.causal_attention``'s values (causal within a row, no attention across
    segments) in one ``jax.nn.dot_product_attention`` call: cuDNN's fused kernel on a GPU in a
    16-bit compute dtype (it keeps no [T, S] scores for the backward), XLA's elsewhere."""
    seg = segment_ids.astype(jnp.int32)
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, T, S]; causal via is_causal
    cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    impl = "cudnn" if cudnn else None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)


def cache_bytes_per_slot(cfg: ModelConfig, max_len: int | None = None, dtype=None) -> int:
    """Bytes of KV cache one slot holds."""
    itemsize = jnp.dtype(dtype or _DTYPES[cfg.dtype]).itemsize
    return 2 * cfg.num_layers * (max_len or cfg.max_len) * cfg.num_kv_heads * cfg.dims_per_head * itemsize


def check_tokens(tokens: Any, cfg: ModelConfig, what: str = "tokens") -> None:
    """One-line errors for host-side token input: ids outside the vocabulary, too long."""
    import numpy as np

    arr = np.asarray(tokens)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} has dtype {arr.dtype}: expected integer token ids")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = int(arr[(arr < 0) | (arr >= cfg.vocab_size)].flat[0])
        raise ValueError(f"{what} contains token id {bad}: expected ids in [0, {cfg.vocab_size})")
    if arr.ndim and arr.shape[-1] > cfg.max_len:
        raise ValueError(f"{what} has length {arr.shape[-1]}: longer than the context max_len={cfg.max_len}")
