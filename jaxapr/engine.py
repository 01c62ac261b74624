"""A static-shape slot engine: batched prefill into free slots, k-step jitted decode chunks.

One module (over 500 lines) because the slot state, the jitted kernels and the host-side
bookkeeping (buckets, position bounds, input checks) change together.

Threads are rows. The engine holds a fixed pool of ``num_slots`` slots; each slot is one row
of the policy's KV cache (``Transformer.init_cache``, the one cache layout) plus a row of slot
state (generated tokens, their log-probabilities, position, per-slot limit, stop ids, sampling
parameters and key). Every slot can hold a sequence of a different length at a different
step: the cache is written and read at per-row positions. Everything the engine runs on the
model is ``Transformer.forward_cached``: a prefill writes prompts into chosen rows, an
extension appends tokens to rows that hold a context (the same jitted kernel, ``_prefill``,
with a start position), and a decode step feeds one token per slot.

The interface the APR runtime drives (all host-side calls; the work is in three jitted
functions, ``_prefill``, ``_decode`` and ``_release``, which take the parameters explicitly
and donate the cache and the slot state)::

    eng = Engine(policy, num_slots=64)
    slots = eng.insert(prompts, max_new_tokens=256, stop_ids=(eos,), temperature=1.0, key=key)
    eng.decode(32)                  # up to 32 steps for every running slot, ONE jitted call
    for s in eng.finished():        # occupied slots that hit a stop token or their limit
        out = eng.read([s])[0]      # SlotOutput(tokens int32[n], logprobs f32[n])
    eng.release(eng.finished())     # the slots are free again
    eng.free_slots()                # -> list[int]
    eng.extend([s], [suffix], [start], max_new_tokens=256)  # continue a finished slot, keeping
                                    # its cache below `start`: a new call, as if inserted whole

A finished slot keeps its outputs (and its cache) until released; ``release`` of a running
slot cancels it. ``extend`` starts a new call in a finished slot whose prompt is the slot's
first ``start`` tokens (prompt, then generated) followed by ``suffix``: only the suffix is
prefilled (the runtime's ``join="keep_slot"``).
Errors in the input (busy slot, prompt too long or leaving no room for a new token, id outside
the vocabulary, bad sampling parameters) are one-line ``ValueError``s raised before anything
is compiled or launched.

Compiles are bounded: ``_decode`` compiles once per engine shape (the step count is a traced
argument), ``_prefill`` once per (prompt-batch bucket, prompt-length bucket) pair actually used,
per (batch bucket, suffix-length bucket, context bucket) for ``extend``: attention reads only
the smallest prefill bucket of cache entries that covers start + suffix.
The jitted functions live at module level with the graphdef as a static argument, so two
engines over the same architecture (e.g. successive ``generate`` calls) share compiles.

**Log-probabilities.** For every generated token the engine records
``log_softmax(logits)[token]`` where ``logits`` are the policy's float32 logits for that step
*before* temperature, top-k or top-p are applied: the policy's own log-probability of the
sampled token (at temperature 1). The value does NOT depend on the sampling temperature,
top-k or top-p; with temperature 1 and no top-k/top-p (GRPO's setting) it is exactly the
log-probability under the distribution the token was sampled from.

**Sampling.** Per slot: temperature 0 is greedy (argmax); otherwise logits / temperature, then
top-k (keep the k largest; 0 = off), then top-p (keep the smallest set of most likely tokens
whose probability reaches p, always at least one; 1.0 = off), then a categorical draw. The
key of a draw is ``fold_in(prompt_key, i)`` for the i-th generated token of that prompt, so a
prompt's samples depend only on its key, never on which slot it landed in or which other
slots are active.

**Forced decoding.** ``insert(..., forced=[tokens or None per prompt])`` makes a slot emit
given tokens instead of samples (inside the same jitted prefill/decode: the forced tokens
wait in the slot's ``tokens`` row and a ``jnp.where`` picks them over the sampled token), with
the policy's log-probability of each forced token recorded; the slot finishes when they run
out (or at a stop token or its limit, whichever comes first). The model runs every step as
usual, so the cost per token is that of free decoding: ``scripted_engine.ForcedEngine`` uses
it to drive real compute with scripted outputs. No extra compiles: the buffer has the slot
row's static shape.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxapr import model as model_lib

# Number of times each jitted function was traced (incremented at trace time only); tests
# use it to check that repeated calls do not re-trace.
TRACE_COUNTS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------------------
# slot state
# ----------------------------------------------------------------------------------------
@flax.struct.dataclass
class SlotState:
    """Per-slot device state; every leading axis is the slot axis S (L = engine max_len)."""

    # Each field: dtype[shape], then what it holds.
    tokens: jax.Array  # int32[S, L]: generated tokens (the first num_tokens are valid); a forced slot holds
    # the tokens it has still to emit at num_tokens..num_forced-1
    logprobs: jax.Array  # f32[S, L]: the policy's log-prob of each generated token
    num_tokens: jax.Array  # int32[S]: tokens generated so far
    next_pos: jax.Array  # int32[S]: the cache index where the last token will be written
    limit: jax.Array  # int32[S]: the most tokens this slot may generate
    done: jax.Array  # bool[S]: finished (stop token or limit)
    active: jax.Array  # bool[S]: holds a sequence (inserted, not released)
    stop_ids: jax.Array  # int32[S, K]: stop token ids, -1 = none
    temperature: jax.Array  # f32[S]: 0 = greedy
    top_k: jax.Array  # int32[S]: 0 = off
    top_p: jax.Array  # f32[S]: 1 = off
    key: jax.Array  # uint32[S, 2]: raw PRNG key data of the prompt
    num_forced: jax.Array  # int32[S]: forced decoding, emit tokens[:num_forced] (0 = free sampling)

    @property
    def running(self) -> jax.Array:
        return self.active & ~self.done

    @property
    def last_token(self) -> jax.Array:
        idx = jnp.maximum(self.num_tokens - 1, 0)
        return jnp.take_along_axis(self.tokens, idx[:, None], axis=1)[:, 0]


def init_slots(num_slots: int, max_len: int, max_stop_ids: int) -> SlotState:
    s = num_slots
    return SlotState(
        tokens=jnp.zeros((s, max_len), jnp.int32),
        logprobs=jnp.zeros((s, max_len), jnp.float32),
        num_tokens=jnp.zeros((s,), jnp.int32),
        next_pos=jnp.zeros((s,), jnp.int32),
        limit=jnp.zeros((s,), jnp.int32),
        done=jnp.zeros((s,), bool),
        active=jnp.zeros((s,), bool),
        stop_ids=jnp.full((s, max_stop_ids), -1, jnp.int32),
        temperature=jnp.zeros((s,), jnp.float32),
        top_k=jnp.zeros((s,), jnp.int32),
        top_p=jnp.ones((s,), jnp.float32),
        key=jnp.zeros((s, 2), jnp.uint32),
        num_forced=jnp.zeros((s,), jnp.int32),
    )


# ----------------------------------------------------------------------------------------
# sampling (pure, per row)
# ----------------------------------------------------------------------------------------
def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Logits of the sampling distribution for one row: ``logits / temperature``, then top-k
    (k largest kept, 0 = off), then top-p (smallest most-likely set with mass >= p, at least
    one token; 1 = off). Removed entries are -inf. ``temperature`` must be > 0."""
    x = logits.astype(jnp.float32) / temperature
    vocab = x.shape[-1]
    order = jnp.argsort(-x)  # descending
    ranked = x[order]
    rank_keep = jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab)
    probs = jax.nn.softmax(jnp.where(rank_keep, ranked, -jnp.inf))
    mass_before = jnp.cumsum(probs) - probs
    rank_keep &= (mass_before < top_p) | (jnp.arange(vocab) == 0)
    keep = jnp.zeros((vocab,), bool).at[order].set(rank_keep)
    return jnp.where(keep, x, -jnp.inf)


def sample_logits(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    forced: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row -> (tokens int32[B], logprobs f32[B]).

    logits f32[B, V]; keys uint32[B, 2] (raw key data); temperature/top_p f32[B]; top_k int32[B].
    ``forced`` int32[B] (optional): rows with an id >= 0 emit that token instead of a sample.
    logprobs = ``log_softmax(logits)[token]`` of the unmodified logits (see module docstring),
    for a forced row the policy's log-probability of the forced token.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        def one(row, key, t, k, p):
            filtered = jax.lax.cond((k > 0) | (p < 1.0), lambda: filter_logits(row, t, k, p), lambda: row / t)
            return jax.random.categorical(jax.random.wrap_key_data(key), filtered).astype(jnp.int32)

        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        drawn = jax.vmap(one)(logits, keys, safe_t, top_k, top_p)
        return jnp.where(temperature > 0, drawn, greedy)

    tokens = jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
    if forced is not None:
        tokens = jnp.where(forced >= 0, forced, tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
    """Raw key data of draw ``step`` (per row) from each row's prompt key."""
    fold = lambda k, i: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), i))
    return jax.vmap(fold)(keys, step)


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == stop_ids, axis=-1)


# ----------------------------------------------------------------------------------------
# jitted kernels
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static shardings (None = let the compiler choose, single device): ``cache`` as ((name,
    sharding), ...) pairs for the cache arrays "k" and "v", ``slots`` for the slot state."""

    cache: Any = None
    slots: Any = None

    def constrain(self, cache, slots):
        if self.cache is not None:
            cache = jax.lax.with_sharding_constraint(cache, self.cache_shardings(cache))
        return cache, self.constrain_slots(slots)

    def cache_shardings(self, cache):
        by_name = dict(self.cache)  # (name, sharding) pairs: a static argument must hash
        return {name: tuple(by_name[name] for _ in arrays) for name, arrays in cache.items()}

    def constrain_slots(self, slots):
        if self.slots is None:
            return slots
        return jax.lax.with_sharding_constraint(slots, jax.tree.map(lambda _: self.slots, slots))


def _start_rows(
    slots: SlotState,
    slot_ids,
    first,
    logp,
    next_pos,
    limit,
    stop_ids,
    temperature,
    top_k,
    top_p,
    keys,
    forced,
    num_forced,
) -> SlotState:
    """Slot state of rows ``slot_ids`` after a prefill (``insert``) or an extension
    (``extend``): a new call whose first token ``first`` (log-prob ``logp``) came with it, the
    next token's cache index ``next_pos``, its limits, stop ids and sampling parameters."""
    n = first.shape[0]

    def put(field, values):
        return field.at[slot_ids].set(values, mode="drop")

    max_len = slots.tokens.shape[1]
    row = forced.at[:, 0].set(first)  # a forced slot's remaining tokens wait in its row
    lp_row = jnp.zeros((n, max_len), jnp.float32).at[:, 0].set(logp)
    return slots.replace(
        tokens=put(slots.tokens, row),
        logprobs=put(slots.logprobs, lp_row),
        num_tokens=put(slots.num_tokens, jnp.ones((n,), jnp.int32)),
        next_pos=put(slots.next_pos, next_pos),
        limit=put(slots.limit, limit),
        done=put(slots.done, _is_stop(first, stop_ids) | (limit <= 1) | (num_forced == 1)),
        active=put(slots.active, jnp.ones((n,), bool)),
        stop_ids=put(slots.stop_ids, stop_ids),
        temperature=put(slots.temperature, temperature),
        top_k=put(slots.top_k, top_k),
        top_p=put(slots.top_p, top_p),
        key=put(slots.key, keys),
        num_forced=put(slots.num_forced, num_forced),
    )


def _prefill(
    graphdef,
    layout,
    window,
    params,
    cache,
    slots: SlotState,
    suffixes,
    lengths,
    starts,
    slot_ids,
    limit,
    stop_ids,
    temperature,
    top_k,
    top_p,
    keys,
    forced,
    num_forced,
):
    """Prefill ``suffixes`` int32[n, T] (right-padded, true ``lengths``) into rows ``slot_ids``
    (index num_slots = padding row, dropped) at cache indices ``starts`` on, attending within
    the first ``window`` cache entries (``Transformer.forward_cached``), sample each first
    token and start a new call in each row. ``insert`` is the case ``starts == 0`` (a whole
    prompt into a free row); ``extend`` appends to the context a finished row holds.
    ``forced`` int32[n, L] / ``num_forced`` int32[n]: forced tokens per prompt (0 = free)."""
    TRACE_COUNTS["prefill"] += 1
    policy = nnx.merge(graphdef, params)
    n, t = suffixes.shape
    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    write = jnp.arange(t)[None, :] < lengths[:, None]
    logits, cache = policy.forward_cached(suffixes, positions, cache, write, rows=slot_ids, window=window)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first, logp = sample_logits(
        last,
        _step_keys(keys, jnp.zeros((n,), jnp.int32)),
        temperature,
        top_k,
        top_p,
        jnp.where(num_forced > 0, forced[:, 0], -1),
    )
    slots = _start_rows(
        slots,
        slot_ids,
        first,
        logp,
        starts + lengths,
        limit,
        stop_ids,
        temperature,
        top_k,
        top_p,
        keys,
        forced,
        num_forced,
    )
    return layout.constrain(cache, slots)


def _decode_step(policy, cache, slots: SlotState):
    """One token for every running slot; finished or free slots neither write nor advance.
    ``cache`` may be the first entries of the engine's (see ``_decode``): running slots'
    positions are below its length."""
    run = slots.running
    max_len = model_lib.cache_length(cache)
    pos = jnp.clip(slots.next_pos, 0, max_len - 1)
    logits, cache = policy.forward_cached(slots.last_token[:, None], pos[:, None], cache, run[:, None])
    logits = logits[:, 0]
    rows = jnp.arange(run.shape[0])
    max_cols = slots.tokens.shape[1]
    forced = jnp.where(
        slots.num_tokens < slots.num_forced, slots.tokens[rows, jnp.minimum(slots.num_tokens, max_cols - 1)], -1
    )
    tok, logp = sample_logits(
        logits, _step_keys(slots.key, slots.num_tokens), slots.temperature, slots.top_k, slots.top_p, forced
    )
    col = jnp.where(run, slots.num_tokens, max_cols)  # out of range: dropped
    n = slots.num_tokens + run
    out_of_forced = (slots.num_forced > 0) & (n >= slots.num_forced)
    slots = slots.replace(
        tokens=slots.tokens.at[rows, col].set(tok, mode="drop"),
        logprobs=slots.logprobs.at[rows, col].set(logp, mode="drop"),
        num_tokens=n,
        next_pos=slots.next_pos + run,
        done=slots.done | (run & (_is_stop(tok, slots.stop_ids) | (n >= slots.limit) | out_of_forced)),
    )
    return cache, slots


def _decode(graphdef, layout, attend_len, params, cache, slots: SlotState, num_steps):
    """Up to ``num_steps`` decode steps in one ``lax.while_loop`` (stops early once no slot
    is running) -> (cache, slots, steps run). Attention reads the first ``attend_len`` cache
    entries (static; the host's bound on every running slot's position, see ``Engine.decode``)."""
    TRACE_COUNTS["decode"] += 1
    policy = nnx.merge(graphdef, params)
    max_len = model_lib.cache_length(cache)
    span = min(int(attend_len), max_len)

    def cond(carry):
        i, _, slots = carry
        return (i < num_steps) & jnp.any(slots.running)

    def body(carry):
        i, cache, slots = carry
        cache, slots = _decode_step(policy, cache, slots)
        cache, slots = layout.constrain(cache, slots)
        return i + 1, cache, slots

    # The loop runs on the first ``span`` cache entries, copied out once per call and written
    # back once at its end: slicing inside the step would copy them every step (XLA:CPU's dot
    # reads whole buffers), and a decode step is bound by reading its cache.
    axis = model_lib.CACHE_SEQ_AXIS
    window = cache
    if span < max_len:
        window = {n: tuple(jax.lax.slice_in_dim(c, 0, span, axis=axis[n]) for c in cs) for n, cs in cache.items()}
    steps, window, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), window, slots))
    if span < max_len:
        window = {
            n: tuple(jax.lax.dynamic_update_slice_in_dim(c, w, 0, axis=axis[n]) for c, w in zip(cache[n], window[n]))
            for n in cache
        }
    cache, slots = layout.constrain(window, slots)
    return cache, slots, steps


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1, 2), donate_argnums=(4, 5))
_decode_jit = jax.jit(_decode, static_argnums=(0, 1, 2), donate_argnums=(4, 5))


def _release(layout, slots: SlotState, mask):
    TRACE_COUNTS["release"] += 1
    slots = slots.replace(active=slots.active & ~mask)
    return layout.constrain_slots(slots)


_release_jit = jax.jit(_release, static_argnums=(0,), donate_argnums=(1,))


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
class SlotOutput(NamedTuple):
    tokens: np.ndarray  # int32[n]: generated tokens (a stop token, if hit, is the last)
    logprobs: np.ndarray  # f32[n]: policy log-prob of each (see module docstring)


def _pow2_buckets(limit: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


def _step_buckets(limit: int, step: int) -> tuple[int, ...]:
    """Multiples of ``step`` below ``limit``, then ``limit``."""
    return tuple(range(step, limit, step)) + (limit,)


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def _per_prompt(value, n: int, name: str, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        return np.full((n,), arr, dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}: expected a scalar or one value per prompt ({n})")
    return arr


def _key_data(key, n: int) -> np.ndarray:
    """Per-prompt raw key data uint32[n, 2]: one key -> fold_in(key, i); n keys -> as given."""
    if key is None:
        return np.zeros((n, 2), np.uint32)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = np.asarray(key, np.uint32)
    if key.shape == (2,):
        return np.asarray(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n)), np.uint32)
    if key.shape != (n, 2):
        raise ValueError(f"key has shape {key.shape}: expected one PRNG key or {n} keys (shape ({n}, 2))")
    return key


class Engine:
    """A fixed pool of decoding slots over one policy; see the module docstring.

    Args:
      policy: a ``model.Transformer``; the engine keeps ``nnx.split(policy)``.
      num_slots: S, the number of rows (concurrent sequences).
      max_len: context length of a slot (default and maximum: ``policy.cfg.max_len``).
      prefill_buckets: prompt-length buckets (default: powers of two up to max_len).
      batch_buckets: prompt-count buckets of one prefill (default: powers of two up to S).
      decode_buckets: how many cache entries a decode call's attention reads (default:
        multiples of max(128, max_len / 8) up to max_len, at most 8): the smallest that covers
        every occupied slot's position after the call; one compile per bucket used (finer
        buckets read less cache but compile more; a short evaluation spends the difference on
        compiles: BUILD_NOTES.md, sampler suite).
      max_stop_ids: most stop ids per slot.
      mesh: optional ``jaxapr.sharding.make_mesh(...)`` mesh: parameters placed by ``rules``
        (default ``sharding.rules_for(cfg)``), slots split over ("data", "fsdp"), KV heads
        like ``kv_heads``. ``num_slots`` must be divisible by data x fsdp.
    """

    def __init__(
        self,
        policy: nnx.Module,
        num_slots: int,
        max_len: int | None = None,
        prefill_buckets: Sequence[int] | None = None,
        batch_buckets: Sequence[int] | None = None,
        max_stop_ids: int = 8,
        mesh=None,
        rules=None,
        cache_dtype=None,
        decode_buckets: Sequence[int] | None = None,
    ):
        cfg = policy.cfg
        max_len = cfg.max_len if max_len is None else max_len
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r}: expected a positive int")
        if not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_len:
            raise ValueError(f"max_len={max_len!r}: expected an int in [2, {cfg.max_len}] (the model's context)")
        self.cfg, self.num_slots, self.max_len, self.max_stop_ids = cfg, num_slots, max_len, max_stop_ids
        self.prefill_buckets = self._check_buckets(
            prefill_buckets or _pow2_buckets(max_len), max_len, "prefill_buckets"
        )
        self.batch_buckets = self._check_buckets(batch_buckets or _pow2_buckets(num_slots), num_slots, "batch_buckets")
        self.decode_buckets = self._check_buckets(
            decode_buckets or _step_buckets(max_len, max(128, max_len // 8)), max_len, "decode_buckets"
        )
        self.mesh, self._layout, self._param_shardings = mesh, _Layout(), None
        cache = policy.init_cache(num_slots, max_len, dtype=cache_dtype)
        slots = init_slots(num_slots, max_len, max_stop_ids)
        if mesh is not None:
            cache, slots = self._setup_mesh(policy, mesh, rules, cache, slots)
        self.graphdef, params = nnx.split(policy)
        self.params = self._place(params)
        self.cache, self.slots = cache, slots
        self._busy = np.zeros((num_slots,), bool)
        self._pos_bound = np.zeros((num_slots,), np.int64)  # >= each occupied slot's next cache index
        self._stopped = np.zeros((num_slots,), bool)  # occupied slots seen finished (``done``): they advance no more
        self.attend_counts: collections.Counter = collections.Counter()  # decode calls per attention bucket
        # Cache entries (per row, layer and KV head) that decode attention read ("window": every
        # row, the call's window) and that the prefixes of the occupied slots not seen finished
        # hold ("prefix": what an attention reading each row's prefix in place would read), summed
        # over dispatched steps (a call that ends early counts all of them on both sides).
        self.decode_reads = {"window": 0, "prefix": 0}

    # -- setup -------------------------------------------------------------------------
    @staticmethod
    def _check_buckets(buckets, limit: int, name: str) -> tuple[int, ...]:
        buckets = tuple(sorted(int(b) for b in buckets))
        if not buckets or buckets[0] < 1 or buckets[-1] > limit:
            raise ValueError(f"{name}={buckets}: expected positive sizes up to {limit}")
        return buckets if buckets[-1] == limit else buckets + (limit,)

    def _setup_mesh(self, policy, mesh, rules, cache, slots):
        from jaxapr import sharding

        rules = rules or sharding.rules_for(self.cfg)
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.num_slots % ways:
            raise ValueError(f"num_slots={self.num_slots} is not divisible by data x fsdp = {ways} on this mesh")
        self._param_shardings = sharding.param_shardings(policy, mesh, rules)
        self._layout = _Layout(
            cache=tuple((name, sharding.cache_sharding(mesh, rules, name, cache[name][0].shape)) for name in cache),
            slots=sharding.data_sharding(mesh),
        )
        cache = jax.device_put(cache, self._layout.cache_shardings(cache))
        slots = jax.device_put(slots, jax.tree.map(lambda _: self._layout.slots, slots))
        return cache, slots

    def _place(self, params):
        """Parameters as the kernels take them: by the mesh's shardings, or else committed to
        one device (that of the first leaf), so that the same policy reaching the engine with
        another placement (e.g. a trainer's one-device mesh) hits the same compiled kernels
        (jit keys on input shardings)."""
        if self._param_shardings is not None:
            return jax.device_put(params, self._param_shardings)
        leaves = [x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)]
        device = min(leaves[0].devices(), key=lambda d: d.id) if leaves else jax.local_devices()[0]
        return jax.device_put(params, jax.sharding.SingleDeviceSharding(device))

    def update_params(self, policy_or_state) -> None:
        """Swap in new parameters (a policy of the same architecture, or its ``nnx.split``
        state); nothing is recompiled."""
        if isinstance(policy_or_state, nnx.Module):
            graphdef, params = nnx.split(policy_or_state)
            if graphdef != self.graphdef:
                raise ValueError("update_params: the policy's architecture differs from the engine's")
        else:
            params = policy_or_state
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise ValueError("update_params: the state's structure differs from the engine's policy state")
        self.params = self._place(params)

    # -- the runtime interface -------------------------------------------------------------
    def free_slots(self) -> list[int]:
        """Slots that hold no sequence."""
        return np.flatnonzero(~self._busy).tolist()

    def insert(
        self,
        prompts: Sequence,
        slots: Sequence[int] | None = None,
        *,
        max_new_tokens,
        stop_ids: Sequence[int] = (),
        temperature=0.0,
        top_k=None,
        top_p=None,
        key=None,
        forced: Sequence | None = None,
    ) -> list[int]:
        """Prefill ``prompts`` (list of int arrays) into free slots (``slots``, default the
        lowest free ones) and sample each first token; returns the slot ids.

        ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``: a scalar or one per prompt.
        A slot also stops at the context end (prompt + generated = max_len). ``key``: one key
        (prompt i gets ``fold_in(key, i)``) or one key per prompt; required when sampling.
        ``forced``: None, or one entry per prompt, None (sample freely) or a non-empty int array:
        **forced decoding** -- the slot emits exactly those tokens in order (the model still runs
        every step, and each recorded log-prob is the policy's log-prob of the forced token, so
        this also scores given outputs) and finishes when they run out, or earlier at a stop
        token, its ``max_new_tokens`` or the context end.
        All checks run before anything is compiled or launched.
        """
        prompts = [self._check_prompt(p, i) for i, p in enumerate(prompts)]
        n = len(prompts)
        forced = self._check_forced(forced, n)
        if n == 0:
            return []
        slots = self._choose_slots(n, slots)
        sampling = self._check_sampling(n, max_new_tokens, temperature, top_k, top_p, key, stop_ids)
        lengths = np.array([len(p) for p in prompts], np.int32)
        self._launch(prompts, lengths, np.zeros((n,), np.int32), slots, forced, sampling)
        return list(slots)

    def extend(
        self,
        slots: Sequence[int],
        suffixes: Sequence,
        start_positions: Sequence[int],
        *,
        max_new_tokens,
        stop_ids: Sequence[int] = (),
        temperature=0.0,
        top_k=None,
        top_p=None,
        key=None,
        forced: Sequence | None = None,
    ) -> list[int]:
        """Continue finished slots with a new prompt that shares a prefix with what they hold,
        keeping their KV cache: ``suffixes[i]`` (an int array) is written into slot
        ``slots[i]`` at cache positions ``start_positions[i]`` on, attending to the slot's
        cached entries below that position, then the first token is sampled and a new call
        starts in the slot, exactly as ``insert`` of the whole prompt (the slot's tokens up to
        ``start_positions[i]``, then the suffix) would start it; returns the slot ids.

        A slot's cached tokens are its prompt and all but the last of its generated tokens
        (``len(prompt) + len(generated) - 1``); ``start_positions[i]`` may be anything from 0
        to that count. Entries from the start position on are overwritten or never read again,
        so truncating needs no clearing. The slots must be occupied and finished (not
        released). Sampling arguments, keys and ``forced`` as in ``insert``; the new call's
        samples depend only on its key, as there. One compile per (slot-count bucket,
        suffix-length bucket, context bucket): attention reads only the smallest prefill bucket
        of cache entries that covers every ``start + len(suffix)``. All checks run before
        anything is compiled or launched.
        """
        slots, suffixes, starts = list(slots), list(suffixes), list(start_positions)
        if not (len(slots) == len(suffixes) == len(starts)):
            raise ValueError(
                f"extend got {len(slots)} slots, {len(suffixes)} suffixes and {len(starts)} "
                "start_positions: expected one suffix and one start position per slot"
            )
        suffixes = [self._check_prompt(p, i, what="suffix") for i, p in enumerate(suffixes)]
        n = len(suffixes)
        forced = self._check_forced(forced, n)
        if n == 0:
            return []
        slots = self._check_extend_slots(slots)
        starts = self._check_starts(slots, starts, suffixes)
        sampling = self._check_sampling(n, max_new_tokens, temperature, top_k, top_p, key, stop_ids)
        lengths = np.array([len(p) for p in suffixes], np.int32)
        self._launch(suffixes, lengths, np.asarray(starts, np.int32), slots, forced, sampling)
        return list(slots)

    def _launch(self, prompts, lengths, starts, slots, forced, sampling) -> None:
        """Pad to the buckets and run ``_prefill_jit``: attention reads the smallest bucket of
        cache entries that covers every row's ``start + length``."""
        limit, temp, tk, tp, keys, stops = sampling
        n = len(prompts)
        end = starts + lengths
        limit = np.minimum(limit, self.max_len - end).astype(np.int32)
        nb = _bucket(n, self.batch_buckets, "number of prompts")
        tb = _bucket(int(lengths.max()), self.prefill_buckets, "prompt length")
        tokens = np.full((nb, tb), 0, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        forced_rows = np.zeros((nb, self.max_len), np.int32)
        num_forced = np.zeros((nb,), np.int32)
        for i, f in enumerate(forced):
            if f is not None:
                num_forced[i] = min(f.size, self.max_len)
                forced_rows[i, : num_forced[i]] = f[: num_forced[i]]
        pad = lambda a, fill: np.concatenate([a, np.full((nb - n,) + a.shape[1:], fill, a.dtype)])
        window = _bucket(int(end.max()), self.prefill_buckets, "context")
        self.cache, self.slots = _prefill_jit(
            self.graphdef,
            self._layout,
            window,
            self.params,
            self.cache,
            self.slots,
            tokens,
            pad(lengths, 1),
            pad(starts, 0),
            pad(np.asarray(slots, np.int32), self.num_slots),
            pad(limit, 1),
            np.repeat(stops[None], nb, 0),
            pad(temp, 0),
            pad(tk.astype(np.int32), 0),
            pad(tp, 1),
            pad(keys, 0),
            forced_rows,
            num_forced,
        )
        self._busy[slots] = True
        self._stopped[slots] = False
        self._pos_bound[slots] = end  # the cache index of each new call's next token

    def decode(self, num_steps: int) -> jax.Array:
        """Run up to ``num_steps`` decode steps for all running slots in one jitted call
        (it ends early when no slot is running). Asynchronous: returns at once, with the
        number of steps actually run as a device int32 scalar (``int()`` of it blocks)."""
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
            raise ValueError(f"num_steps={num_steps!r}: expected an int >= 0")
        # Every running slot advances at most one position per step, so its position stays below
        # its start + the steps dispatched since (the host's bound, no device read); attention
        # reads the smallest bucket of cache entries that covers the bound of every occupied
        # slot not yet seen finished (a finished slot neither advances nor writes, so its
        # entries need not be in the window: e.g. a parent holding its slot through its children).
        live = self._busy & ~self._stopped
        bound = np.where(live, np.minimum(self._pos_bound + num_steps, self.max_len), self._pos_bound)
        need = int(bound[live].max()) if live.any() else 1
        attend = _bucket(need, self.decode_buckets, "context")
        self.cache, self.slots, steps = _decode_jit(
            self.graphdef, self._layout, attend, self.params, self.cache, self.slots, np.int32(num_steps)
        )
        self.decode_reads["window"] += num_steps * self.num_slots * attend
        ahead = np.arange(1, num_steps + 1)  # a slot at cache index p reads p + 1 entries, then p + 2, ...
        self.decode_reads["prefix"] += int(np.minimum(self._pos_bound[live][:, None] + ahead, self.max_len).sum())
        self._pos_bound = bound
        self.attend_counts[attend] += 1
        return steps

    def wait(self) -> None:
        """Block until the work dispatched so far (prefills, decodes) is done."""
        jax.block_until_ready((self.cache, self.slots))

    def done(self) -> np.ndarray:
        """bool[S]: slot holds a sequence that has finished (blocks on the device)."""
        done = np.asarray(self.slots.done) & self._busy
        self._stopped |= done  # until the slot is released or a new call starts in it
        return done

    def finished(self) -> list[int]:
        """Occupied slots whose sequence has finished (stop token, max new tokens or context end)."""
        return np.flatnonzero(self.done()).tolist()

    def running(self) -> list[int]:
        """Occupied slots still generating."""
        return np.flatnonzero(self._busy & ~self.done()).tolist()

    def read(self, slots: Sequence[int]) -> list[SlotOutput]:
        """Tokens generated so far in each slot and their log-probs (finished or not)."""
        slots = list(slots)
        for s in slots:
            if not (0 <= s < self.num_slots) or not self._busy[s]:
                raise ValueError(f"slot {s} holds no sequence: expected one of {np.flatnonzero(self._busy).tolist()}")
        tokens, logprobs, counts = jax.device_get((self.slots.tokens, self.slots.logprobs, self.slots.num_tokens))
        return [SlotOutput(tokens[s, : counts[s]].copy(), logprobs[s, : counts[s]].copy()) for s in slots]

    def release(self, slots: Sequence[int]) -> None:
        """Free the slots, finished or not (a running one stops decoding). Their cache rows
        need no clearing: entries past a slot's position are never read."""
        slots = [int(s) for s in slots]
        for s in slots:
            if not (0 <= s < self.num_slots):
                raise ValueError(f"slot {s} is out of range: expected 0..{self.num_slots - 1}")
        if not slots:
            return
        mask = np.zeros((self.num_slots,), bool)
        mask[slots] = True
        self.slots = _release_jit(self._layout, self.slots, mask)
        self._busy[slots] = False
        self._stopped[slots] = False

    # -- input checks ------------------------------------------------------------------
    def _check_prompt(self, prompt, i: int, what: str = "prompt") -> np.ndarray:
        arr = np.asarray(prompt)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{what} {i} has shape {arr.shape}: expected a non-empty 1-D array of token ids")
        model_lib.check_tokens(arr, self.cfg, what=f"{what} {i}")
        if arr.size >= self.max_len:
            raise ValueError(
                f"{what} {i} has length {arr.size}: expected < max_len={self.max_len} (room for at least one new token)"
            )
        return arr.astype(np.int32)

    def _check_sampling(self, n: int, max_new_tokens, temperature, top_k, top_p, key, stop_ids) -> tuple:
        """(limit, temperature, top_k, top_p, keys, stop row) per prompt, checked."""
        limit = _per_prompt(max_new_tokens, n, "max_new_tokens", np.int64)
        if limit.min() < 1:
            raise ValueError(f"max_new_tokens={limit.min()}: expected >= 1")
        temp = _per_prompt(temperature, n, "temperature", np.float32)
        tk = _per_prompt(0 if top_k is None else top_k, n, "top_k", np.int64)
        tp = _per_prompt(1.0 if top_p is None else top_p, n, "top_p", np.float32)
        if temp.min() < 0 or not np.isfinite(temp).all():
            raise ValueError(f"temperature={temp.min()}: expected a finite value >= 0 (0 = greedy)")
        if tk.min() < 0:
            raise ValueError(f"top_k={tk.min()}: expected >= 0 (0 or None = off)")
        if not ((tp > 0) & (tp <= 1)).all():
            raise ValueError(f"top_p={tp[(tp <= 0) | (tp > 1)][0]}: expected a value in (0, 1]")
        if key is None and (temp > 0).any():
            raise ValueError("temperature > 0 needs a PRNG key: pass key=jax.random.key(seed)")
        stops = self._stop_row(stop_ids)
        return limit, temp, tk, tp, _key_data(key, n), stops

    def _check_extend_slots(self, slots) -> list[int]:
        slots = [int(s) for s in slots]
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} contain duplicates")
        done = self.done()  # blocks on the device: one read per extend, not per token
        for s in slots:
            if not 0 <= s < self.num_slots:
                raise ValueError(f"slot {s} is out of range: expected 0..{self.num_slots - 1}")
            if not self._busy[s]:
                raise ValueError(
                    f"slot {s} holds no sequence: extend continues an occupied, finished slot (insert into a free one)"
                )
            if not done[s]:
                raise ValueError(f"slot {s} is still running: extend needs a finished slot")
        return slots

    def _check_starts(self, slots, starts, suffixes) -> np.ndarray:
        cached = np.asarray(jax.device_get(self.slots.next_pos))  # cache entries 0..next_pos-1 are valid
        out = np.zeros((len(slots),), np.int32)
        for i, (s, start, suffix) in enumerate(zip(slots, starts, suffixes)):
            if not isinstance(start, (int, np.integer)) or not 0 <= start <= cached[s]:
                raise ValueError(
                    f"start_positions[{i}]={start!r} for slot {s}: expected an int in 0..{cached[s]} "
                    "(the slot's cached tokens: its prompt and all but its last generated token)"
                )
            if start + suffix.size >= self.max_len:
                raise ValueError(
                    f"suffix {i} of length {suffix.size} from position {start} ends at "
                    f"{start + suffix.size}: expected < max_len={self.max_len} (room for at least one new token)"
                )
            out[i] = start
        return out

    def _check_forced(self, forced, n: int) -> list:
        if forced is None:
            return [None] * n
        forced = list(forced)
        if len(forced) != n:
            raise ValueError(
                f"forced has {len(forced)} entries for {n} prompts: expected one (an array or None) per prompt"
            )
        out = []
        for i, f in enumerate(forced):
            if f is None:
                out.append(None)
                continue
            arr = np.asarray(f)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(
                    f"forced[{i}] has shape {arr.shape} and dtype {arr.dtype}: expected None or a "
                    "non-empty 1-D int array of token ids"
                )
            arr = arr[: self.max_len]  # a slot never emits more than max_len - 1 tokens
            model_lib.check_tokens(arr, self.cfg, what=f"forced[{i}]")
            out.append(arr.astype(np.int32))
        return out

    def _choose_slots(self, n: int, slots) -> list[int]:
        free = self.free_slots()
        if slots is None:
            if n > len(free):
                raise ValueError(f"{n} prompts but only {len(free)} free slots (of {self.num_slots})")
            return free[:n]
        slots = [int(s) for s in slots]
        if len(slots) != n:
            raise ValueError(f"{len(slots)} slots for {n} prompts: expected one slot per prompt")
        if len(set(slots)) != n:
            raise ValueError(f"slots {slots} contain duplicates")
        for s in slots:
            if not 0 <= s < self.num_slots:
                raise ValueError(f"slot {s} is out of range: expected 0..{self.num_slots - 1}")
            if self._busy[s]:
                raise ValueError(f"slot {s} is busy: release it first (free slots: {free})")
        return slots

    def _stop_row(self, stop_ids) -> np.ndarray:
        stops = np.asarray(list(stop_ids), np.int64).reshape(-1)
        if stops.size > self.max_stop_ids:
            raise ValueError(f"{stops.size} stop ids: expected at most max_stop_ids={self.max_stop_ids}")
        if stops.size and (stops.min() < 0 or stops.max() >= self.cfg.vocab_size):
            raise ValueError(f"stop_ids {stops.tolist()}: expected ids in [0, {self.cfg.vocab_size})")
        return np.concatenate([stops, np.full(self.max_stop_ids - stops.size, -1)]).astype(np.int32)


# ----------------------------------------------------------------------------------------
# generate: a thin loop over an Engine
# ----------------------------------------------------------------------------------------
class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # int32[B, T] generated tokens, T = max_new_tokens, pad_id after lengths
    lengths: np.ndarray  # int32[B] tokens generated per prompt (a stop token counts)
    logprobs: np.ndarray  # f32[B, T] policy log-prob of each token (0 after lengths)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def generate(
    policy: nnx.Module,
    prompts: Sequence,
    max_new_tokens: int,
    temperature: float = 0.0,
    key=None,
    stop_ids: Sequence[int] = (),
    top_k: int | None = None,
    top_p: float | None = None,
    num_slots: int | None = None,
    *,
    max_len: int | None = None,
    steps_per_call: int = 32,
    mesh=None,
    rules=None,
    pad_id: int = 0,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` for each prompt (list of int arrays).

    ``stop_ids=()`` decodes every prompt to ``max_new_tokens`` (or to the context end).
    Prompts beyond ``num_slots`` (default: B rounded up to a power of two, at most 256) are
    queued into slots as they free up. Prompt i samples with ``fold_in(key, i)``, so its output
    does not depend on the other prompts or on ``num_slots``. ``max_len`` (the slots' context)
    defaults to the longest prompt + max_new_tokens rounded up to a power of two, capped at
    the model's context. ``mesh``/``rules``: see ``Engine``.
    """
    prompts = [np.asarray(p) for p in prompts]
    b = len(prompts)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")
    if b == 0:
        return GenerateOutput(
            np.zeros((0, max_new_tokens), np.int32), np.zeros((0,), np.int32), np.zeros((0, max_new_tokens), np.float32)
        )
    cfg = policy.cfg
    longest = max(p.size for p in prompts)
    if max_len is None:
        max_len = min(cfg.max_len, max(2, _next_pow2(longest + max_new_tokens)))
    num_slots = num_slots or min(_next_pow2(b), 256)
    engine = Engine(
        policy, num_slots, max_len=max_len, max_stop_ids=max(1, len(tuple(stop_ids))), mesh=mesh, rules=rules
    )
    for i, p in enumerate(prompts):  # every check before any compile
        engine._check_prompt(p, i)
    keys = None if key is None else _key_data(key, b)
    sampling = dict(max_new_tokens=max_new_tokens, stop_ids=stop_ids, temperature=temperature, top_k=top_k, top_p=top_p)

    tokens = np.full((b, max_new_tokens), pad_id, np.int32)
    logprobs = np.zeros((b, max_new_tokens), np.float32)
    lengths = np.zeros((b,), np.int32)
    owner: dict[int, int] = {}  # slot -> prompt index
    queue = collections.deque(range(b))

    def fill():
        take = [queue.popleft() for _ in range(min(len(queue), len(engine.free_slots())))]
        if take:
            slots = engine.insert([prompts[i] for i in take], key=None if keys is None else keys[take], **sampling)
            owner.update(zip(slots, take))

    fill()
    while owner:
        engine.decode(min(steps_per_call, max_new_tokens))  # chunks: attention grows with the used context
        done = engine.finished()
        for s, out in zip(done, engine.read(done)):
            i = owner.pop(s)
            n = len(out.tokens)
            tokens[i, :n], logprobs[i, :n], lengths[i] = out.tokens, out.logprobs, n
        engine.release(done)
        fill()
    return GenerateOutput(tokens, lengths, logprobs)
