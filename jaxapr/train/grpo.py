"""GRPO: group-relative policy optimisation on spawn/join rollouts (the APR paper's RL stage).

One module (over 500 lines) because the batch layout (rows, packing, per-token advantages and
weights) and the loss that reads it are one contract, changed together.

One GRPO step:

1. **Sample.** P problems, each repeated G times (``rollout_groups``: ``runtime.rollout`` at
   temperature 1 with no top-k/top-p, on an ``engine.Engine`` whose parameters are the
   trainer's current ``state.params``: the same device arrays, swapped in with
   ``Engine.update_params``, no copy and no other process). Rollout ``i = p * G + g`` is
   sample g of problem p.
2. **Reward** (``rewards``): ``R_i = 1[verified success] - length_penalty * len_i -
   thread_penalty * children_i``, with ``len_i`` the rollout's generated tokens
   (``length_measure="total"``) or its critical path (``"sequential"``) and ``children_i``
   its number of child threads. Both shaping weights are 0 (off) by default, as in the paper.
3. **Advantage** (``group_advantages``): within each problem's group of G rollouts,
   ``A_i = (R_i - mean_g R) / (std_g R + adv_eps)`` with the *population* standard deviation
   (``ddof=0``, divide by G). A group whose rewards are all equal gets ``A = 0`` exactly.
4. **Batch** (``make_batch``): one row per call c (every decoding of every thread) of every
   rollout: ``tokens = prompt_tokens (BOS + prompt) ++ output_tokens`` (the EOS included when
   the call stopped on it), padded with id 0. Only generated tokens train (``loss_mask``).
   The call inherits its rollout's advantage ``A_c = A_i``, and its weight ``w_c`` (the
   weights of the batch sum to 1) is set by ``call_weighting``:

   - ``"rollout"`` (default): ``w_c = 1 / (K_i * N)`` with ``K_i`` the number of calls of
     rollout i that generated tokens and N the number of rollouts in the batch: every rollout
     counts 1/N, shared among its calls (the APR paper's code divides each thread's loss by
     its rollout's thread count);
   - ``"call"``: ``w_c = 1 / M`` with M the calls that generated tokens in the batch: every
     call counts the same, so a rollout counts by its number of calls (a failing rollout of
     many threads pushes each of them, its root's spawn decisions included, as hard as a
     single-call rollout pushes its one call). With one call per rollout (SoS+) it is
     ``"rollout"``;
   - ``"token"``: ``w_c = |T_c| / T`` with T the generated tokens in the batch: every
     generated token counts the same (the token-level loss of DAPO).

   ``old_logprobs`` are the log-probs the engine recorded while
   sampling: ``log_softmax(logits)[token]`` of the policy at temperature 1 (the engine records
   them before temperature/top-k/top-p, so with GRPO's temperature 1 and no filtering they are
   exactly the sampling distribution's; see ``engine``). Rows are padded to a static bucket
   with zero-weight rows so that the jitted update never re-traces within a bucket. With
   ``pack_calls`` several calls share a row (first fit, longest first; each call its own
   segment, so none attends to another) and the per-call advantage and weight become
   per-token ``token_advantages`` and ``token_weights = w_c / |T_c|``: the same loss below on
   fewer rows (most APR calls are children far shorter than the context). With
   ``skip_zero_advantage`` the calls of rollouts with A = 0 (groups whose rewards are all
   equal) get no rows; N, M and T still count them, so the batch's policy-gradient term is
   the same and only their KL term is left out.
5. **Update** (``make_grpo_step``): ``inner_epochs`` passes (mu) over ``num_minibatches``
   shuffled minibatches of rows, one optimizer update per minibatch, all in one jitted call.

**The loss** (``grpo_loss``), for rows c with generated-token set T_c (|T_c| >= 1), per
token t in T_c with ``logp_t`` the current policy's log-prob, ``old_t`` the rollout's and
``ref_t`` the frozen reference policy's::

    r_t    = exp(logp_t - old_t)
    pg_t   = -min(r_t * A_c, clip(r_t, 1 - clip_eps, 1 + clip_eps) * A_c)
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (low-variance KL estimator)
    L_c    = (1 / |T_c|) * sum_{t in T_c} (pg_t + beta * k3_t)
    loss   = sum_c w_c * L_c

(the log-ratio inside k3 is clamped to [-20, 20] against overflow; values that large never
occur in a healthy run). With ``old = logp`` (on-policy) and ``beta = 0`` the gradient is
REINFORCE's: ``-sum_c w_c A_c mean_{t in T_c} grad logp_t``. In a minibatch update the loss
is ``num_minibatches * sum_{c in minibatch} w_c L_c``: an unbiased estimate of the whole
batch's loss, so the gradient scale does not depend on the number of minibatches.
``beta = 0`` skips the reference forward entirely.

Metrics (``grpo_loss``): ``loss``, ``pg_loss`` (the ``sum_c w_c mean pg`` part), ``kl``
(mean k3 over generated tokens), ``clip_fraction`` (share of generated tokens with
``|r_t - 1| > clip_eps``), ``ratio_mean`` (mean r_t over generated tokens), ``tokens``
(generated tokens). The step returns them aggregated over its updates (token metrics as
token means, loss terms as means over updates) plus ``grad_norm``, ``updates`` (finite
updates applied), ``finite`` and ``lr`` (with ``schedule``).

**Donation and the engine.** The step donates ``state``: after it, the engine must be given
the new ``state.params`` (``rollout_groups`` does that before every rollout) and the
reference must be a real copy (``reference_params``), never the initial state's own arrays.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxapr.train.sft import target_mask, token_logprobs
from jaxapr.train.state import TrainState

# Times the update function was traced (incremented at trace time only): tests check that
# steps with new data of the same bucket do not re-trace.
TRACE_COUNTS: collections.Counter = collections.Counter()

_KL_CLAMP = 20.0
PAD_ID = 0
CALL_WEIGHTINGS = ("rollout", "call", "token")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyper-parameters; defaults are the APR paper's (64 problems x 5 rollouts, lr 1e-5,
    clip 0.2, beta 0.001, 2 inner epochs) where it gives them. ``num_minibatches`` is ours."""

    num_problems: int = 64  # P problems per step
    group_size: int = 5  # G rollouts per problem
    learning_rate: float = 1e-5  # for make_optimizer (the step itself takes a tx)
    clip_eps: float = 0.2  # PPO clip range
    beta: float = 0.001  # weight of the k3 KL to the reference (0 = no reference forward)
    inner_epochs: int = 2  # mu: passes over the batch per step
    num_minibatches: int = 4  # optimizer updates per pass
    temperature: float = 1.0  # sampling temperature of the rollouts
    adv_eps: float = 1e-6  # A = (R - mean) / (std + adv_eps)
    length_penalty: float = 0.0  # reward -= length_penalty * tokens (off by default)
    length_measure: str = "total"  # "total" generated tokens or "sequential" (critical path)
    thread_penalty: float = 0.0  # reward -= thread_penalty * child threads (off by default)
    recompute_old_logprobs: bool = False  # True: old log-probs from the trainer at the step's start
    # Rows x seq_len the update differentiates at once: a minibatch above it is split into
    # micro-batches whose gradients are summed (exact), so memory does not grow with the number
    # of calls (APR rollouts have many). 0: never split.
    micro_batch_tokens: int = 65_536
    # Several calls per row (first-fit by length, each its own segment: no attention across
    # calls) instead of one call per row padded to the context: APR children use a fraction of
    # it. The loss is the same (per-token weights w_c / |T_c|); only the layout changes.
    pack_calls: bool = False
    # Rollouts of groups whose rewards are all equal have advantage 0: their policy-gradient
    # term is exactly 0, so with this on their calls get no rows (they only carried the KL
    # term, beta x a mean k3 of ~1e-4). N in w_c = 1 / (K_i N) still counts them, so the
    # batch's policy-gradient term is unchanged (its minibatches are cut from fewer rows); the
    # update shrinks by the share of such groups (DAPO's dynamic sampling drops them too).
    # The logged kl / clip_fraction are then means over the kept rollouts' tokens only.
    skip_zero_advantage: bool = False
    # How the batch's weight is shared among calls (the module docstring): "rollout" (each
    # rollout 1/N), "call" (each call alike) or "token" (each generated token alike).
    call_weighting: str = "rollout"

    def check(self) -> GRPOConfig:
        for name in ("num_problems", "group_size", "inner_epochs", "num_minibatches"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GRPOConfig.{name}={value!r}: expected a positive int")
        for name, low in (("learning_rate", 0.0), ("temperature", 0.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > low):
                raise ValueError(f"GRPOConfig.{name}={value!r}: expected a finite number > {low}")
        if not (isinstance(self.clip_eps, (int, float)) and 0 < self.clip_eps < 1):
            raise ValueError(f"GRPOConfig.clip_eps={self.clip_eps!r}: expected a number in (0, 1)")
        for name in ("beta", "adv_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"GRPOConfig.{name}={value!r}: expected a finite number >= 0")
        for name in ("length_penalty", "thread_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value)):
                raise ValueError(f"GRPOConfig.{name}={value!r}: expected a finite number (0 = off)")
        mbt = self.micro_batch_tokens
        if not isinstance(mbt, (int, np.integer)) or isinstance(mbt, bool) or mbt < 0:
            raise ValueError(f"GRPOConfig.micro_batch_tokens={mbt!r}: expected an int >= 0 (0 = never split)")
        for name in ("pack_calls", "skip_zero_advantage"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: expected True or False")
        if self.length_measure not in ("total", "sequential"):
            raise ValueError(f"GRPOConfig.length_measure={self.length_measure!r}: expected 'total' or 'sequential'")
        if self.call_weighting not in CALL_WEIGHTINGS:
            raise ValueError(f"GRPOConfig.call_weighting={self.call_weighting!r}: expected one of {CALL_WEIGHTINGS}")
        return self

    def replace(self, **kw) -> GRPOConfig:
        return dataclasses.replace(self, **kw).check()


# ----------------------------------------------------------------------------------------
# host side: sampling, rewards, advantages, the batch
# ----------------------------------------------------------------------------------------
def rollout_groups(
    engine, params, problems, cfg: GRPOConfig, *, key, mode: str = "apr", problem_ids=None, **rollout_kw
) -> list:
    """Samples ``cfg.group_size`` rollouts of each problem with the trainer's current
    ``params`` (swapped into ``engine`` in place: ``engine.update_params(params)``).

    ``problems`` = (numbers int[P, N], targets int[P]). Returns P * G ``RolloutResult``s,
    rollout ``p * G + g`` being sample g of problem p (each sample draws from its own keys:
    the runtime derives them from ``key`` and the repeated problem's index). ``problem_ids``:
    the problems' indices among all of the step's problems when each process rolls out a part
    (default ``0..P-1``), so the samples do not depend on the process count.
    ``rollout_kw``: more ``runtime.rollout`` arguments (``max_context``, ``max_depth``, ...).
    """
    from jaxapr import runtime

    cfg.check()
    numbers, targets = np.asarray(problems[0]), np.asarray(problems[1])
    if numbers.ndim != 2 or targets.shape != (numbers.shape[0],):
        raise ValueError(
            f"problems shapes {numbers.shape}, {targets.shape}: expected (numbers int[P, N], targets int[P])"
        )
    for bad in ("temperature", "top_k", "top_p", "engine"):
        if bad in rollout_kw:
            raise ValueError(
                f"rollout_groups: {bad} is set by GRPO (cfg.temperature, no top-k/top-p, the engine argument)"
            )
    if params is not None:
        engine.update_params(params)
    g = cfg.group_size
    ids = np.arange(len(targets)) if problem_ids is None else np.asarray(problem_ids)
    if ids.shape != targets.shape:
        raise ValueError(f"problem_ids of shape {ids.shape}: expected one per problem ({len(targets)})")
    return runtime.rollout(
        None,
        (np.repeat(numbers, g, axis=0), np.repeat(targets, g, axis=0)),
        mode,
        engine=engine,
        temperature=cfg.temperature,
        key=key,
        problem_ids=(np.repeat(ids, g) * g + np.tile(np.arange(g), len(ids))).astype(np.int64),
        **rollout_kw,
    )


def rewards(results: Sequence, cfg: GRPOConfig) -> np.ndarray:
    """float32[len(results)]: ``1[success] - length_penalty * length - thread_penalty *
    num_children`` (see the module docstring)."""
    cfg.check()
    success = np.array([bool(r.success) for r in results], np.float64)
    out = success
    if cfg.length_penalty:
        attr = "total_tokens" if cfg.length_measure == "total" else "sequential_tokens"
        out = out - cfg.length_penalty * np.array([getattr(r, attr) for r in results], np.float64)
    if cfg.thread_penalty:
        out = out - cfg.thread_penalty * np.array([r.num_children for r in results], np.float64)
    return out.astype(np.float32)


def group_advantages(rewards_pg, eps: float = 1e-6) -> np.ndarray:
    """float32[P, G]: ``(R - mean_g) / (std_g + eps)`` per group (row), with the population
    standard deviation (ddof=0). Groups whose rewards are all equal get exactly 0."""
    r = np.asarray(rewards_pg, np.float64)
    if r.ndim != 2 or r.shape[1] < 1:
        raise ValueError(f"rewards have shape {r.shape}: expected [num_problems, group_size]")
    if not np.isfinite(r).all():
        raise ValueError("rewards contain non-finite values")
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    adv = (r - mean) / (std + eps)
    adv = np.where(np.ptp(r, axis=1, keepdims=True) == 0, 0.0, adv)
    return adv.astype(np.float32)


def bucket_rows(n: int, multiple_of: int = 1) -> int:
    """The row bucket of ``n`` calls, ``make_batch``'s default ``num_rows``: ``multiple_of`` x
    the smallest of 1, 2, 3, then 2**k x (4, 5, 6, 7) / 4 (4, 5, 6, 7, 8, 10, 12, 14, 16, 20,
    ...) that is >= n / multiple_of. Four buckets per doubling: padding rows (computed like real
    ones) stay under 25% of a batch, at the price of up to four compiles per doubling of the
    call count (powers of two alone wasted up to half of an update)."""
    per = max(1, -(-n // multiple_of))
    if per <= 4:
        return multiple_of * per
    base = 1 << ((per - 1).bit_length() - 1)  # the power of two below per: per in (base, 2 base]
    step = base // 4
    return multiple_of * (-(-per // step) * step)


def make_batch(
    results: Sequence,
    advantages,
    *,
    seq_len: int,
    num_rows: int | None = None,
    multiple_of: int = 1,
    pack: bool = False,
    keep=None,
    weighting: str = "rollout",
) -> dict:
    """The training batch of ``results`` (see the module docstring), numpy arrays:

    - ``tokens`` int32[C, L]: prompt_tokens ++ output_tokens, then pad id 0;
    - ``positions`` int32[C, L] (0.. on real tokens, 0 on padding), ``segment_ids`` int32[C, L]
      (1 on real tokens, 0 on padding);
    - ``loss_mask`` int32[C, L]: 1 on generated tokens (output_tokens, EOS included);
    - ``old_logprobs`` f32[C, L-1]: the engine's log-prob of token t+1 at index t (as
      ``sft.token_logprobs``), 0 elsewhere;
    - ``advantages`` f32[C]: the call's rollout's; ``weights`` f32[C]: w_c of ``weighting``
      (``GRPOConfig.call_weighting``; default "rollout": 1 / (calls that generated tokens in
      its rollout) / (rollouts));
    - ``rollout`` int32[C]: the rollout's index in ``results`` (-1 for padding rows).

    ``pack=True``: calls are packed several to a row (first fit, longest first; call j of a row
    has segment id j + 1 and positions from 0), and the per-call fields become per-token ones:
    ``token_advantages`` / ``token_weights`` f32[C, L-1] (at each trained index t: the call's
    advantage, and its weight / its number of generated tokens), with no ``advantages``,
    ``weights`` or ``rollout``. The loss is the same either way.

    ``advantages``: one per rollout (shape [len(results)] or [P, G]). Calls that generated no
    tokens (never run: the context or token budget was full) get no row and do not count.
    ``keep``: optional bool[len(results)]; the calls of rollouts not kept get no row, but the
    rollouts still count in N, M and T (``rollout_mask``: skipping zero-advantage rollouts).
    C = ``num_rows`` (default: ``bucket_rows`` of the rows needed, a multiple of
    ``multiple_of``); the extra rows are padding with weight 0. ``seq_len``: L, at least the
    longest call.
    """
    adv = np.asarray(advantages, np.float32).reshape(-1)
    if adv.shape[0] != len(results):
        raise ValueError(f"{adv.shape[0]} advantages for {len(results)} rollouts: expected one per rollout")
    if not isinstance(multiple_of, (int, np.integer)) or multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of!r}: expected a positive int")
    if weighting not in CALL_WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {CALL_WEIGHTINGS}")
    trained = _trained_calls(results, seq_len)
    weight = _call_weights(trained, len(results), weighting)
    calls, rows = _row_layout(trained, len(results), seq_len, pack, keep)
    if num_rows is None:
        num_rows = bucket_rows(len(rows), multiple_of)
    what = "packed rows" if pack else "calls"
    if not isinstance(num_rows, (int, np.integer)) or num_rows < max(1, len(rows)):
        raise ValueError(f"num_rows={num_rows!r}: expected an int >= the number of {what} ({len(rows)})")
    if num_rows % multiple_of:
        raise ValueError(f"num_rows={num_rows} is not a multiple of {multiple_of}")
    c_rows = int(num_rows)
    batch = {
        "tokens": np.full((c_rows, seq_len), PAD_ID, np.int32),
        "positions": np.zeros((c_rows, seq_len), np.int32),
        "segment_ids": np.zeros((c_rows, seq_len), np.int32),
        "loss_mask": np.zeros((c_rows, seq_len), np.int32),
        "old_logprobs": np.zeros((c_rows, seq_len - 1), np.float32),
    }
    if pack:
        batch["token_advantages"] = np.zeros((c_rows, seq_len - 1), np.float32)
        batch["token_weights"] = np.zeros((c_rows, seq_len - 1), np.float32)
    else:
        batch["advantages"] = np.zeros((c_rows,), np.float32)
        batch["weights"] = np.zeros((c_rows,), np.float32)
        batch["rollout"] = np.full((c_rows,), -1, np.int32)
    for row, members in enumerate(rows):
        off = 0
        for seg, j in enumerate(members, 1):
            i, c, k = calls[j]
            n, m = len(c.prompt_tokens), len(c.output_tokens)
            at = slice(off, off + n + m)
            batch["tokens"][row, at] = np.concatenate([c.prompt_tokens, c.output_tokens])
            batch["positions"][row, at] = np.arange(n + m)
            batch["segment_ids"][row, at] = seg
            batch["loss_mask"][row, off + n : off + n + m] = 1
            trained = slice(off + n - 1, off + n - 1 + m)  # index t scores token t + 1
            batch["old_logprobs"][row, trained] = c.logprobs
            w = weight(k, m)
            if pack:
                batch["token_advantages"][row, trained] = adv[i]
                batch["token_weights"][row, trained] = w / m
            else:
                batch["advantages"][row], batch["weights"][row], batch["rollout"][row] = adv[i], w, i
            off += n + m
    return batch


def _call_weights(trained: list, num_rollouts: int, weighting: str):
    """``w(calls of the call's rollout, generated tokens of the call)``: w_c of ``weighting``
    (the module docstring), its totals over ``trained`` (``_trained_calls``: every rollout's
    calls, so ``keep`` drops rows, not the totals)."""
    if weighting == "rollout":
        return lambda k, m: 1.0 / (k * num_rollouts)
    if weighting == "call":
        return lambda k, m: 1.0 / len(trained)
    total = sum(len(c.output_tokens) for _, c, _ in trained)
    return lambda k, m: m / total


def _row_layout(trained: list, num_rollouts: int, seq_len: int, pack: bool, keep=None) -> tuple[list, list[list[int]]]:
    """(the calls of ``trained`` (``_trained_calls``) whose rollouts are kept, the indices of
    the calls in each row: several per row when packed, else one)."""
    calls = trained
    if keep is not None:
        keep = np.asarray(keep)
        if keep.shape != (num_rollouts,) or keep.dtype != bool:
            raise ValueError(
                f"keep of shape {keep.shape} and dtype {keep.dtype}: expected bool[{num_rollouts}], one per rollout"
            )
        calls = [c for c in calls if keep[c[0]]]
    if not pack:
        return calls, [[j] for j in range(len(calls))]
    return calls, pack_rows([len(c.prompt_tokens) + len(c.output_tokens) for _, c, _ in calls], seq_len)


def _trained_calls(results: Sequence, seq_len: int) -> list:
    """[(rollout index, call, calls of that rollout that generated tokens)], validated."""
    if not len(results):
        raise ValueError("make_batch: no rollouts")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: expected an int >= 2")
    out = []
    for i, res in enumerate(results):
        calls = [c for c in res.calls if len(c.output_tokens)]
        for k, c in enumerate(calls):
            n, m = len(c.prompt_tokens), len(c.output_tokens)
            if len(c.logprobs) != m:
                raise ValueError(f"rollout {i} call {k}: {len(c.logprobs)} log-probs for {m} output tokens")
            if n < 1:
                raise ValueError(f"rollout {i} call {k}: empty prompt (expected BOS + prompt)")
            if n + m > seq_len:
                raise ValueError(
                    f"rollout {i} call {k} has {n} prompt + {m} output = {n + m} tokens: expected <= seq_len={seq_len}"
                )
            out.append((i, c, len(calls)))
    return out


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``seq_len`` tokens: first fit,
    longest first (ties in index order); each row lists its members in placement order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        if lengths[j] > seq_len:
            raise ValueError(f"a call of {lengths[j]} tokens does not fit seq_len={seq_len}")
        r = next((r for r, free in enumerate(room) if free >= lengths[j]), None)
        if r is None:
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
        rows[r].append(j)
        room[r] -= lengths[j]
    return rows


def rows_needed(results: Sequence, seq_len: int, pack: bool, keep=None) -> int:
    """How many rows ``make_batch(results, ..., pack=pack, keep=keep)`` fills before padding."""
    return len(_row_layout(_trained_calls(results, seq_len), len(results), seq_len, pack, keep)[1])


def rollout_mask(results: Sequence, cfg: GRPOConfig) -> np.ndarray:
    """bool[len(results)]: the rollouts whose calls get rows (``make_batch``'s ``keep``): all,
    or with ``cfg.skip_zero_advantage`` those of groups whose rewards are not all equal."""
    cfg.check()
    g = cfg.group_size
    if len(results) % g:
        raise ValueError(f"{len(results)} rollouts: expected a multiple of group_size={g}")
    if not cfg.skip_zero_advantage:
        return np.ones(len(results), bool)
    r = rewards(results, cfg).reshape(-1, g)
    return np.repeat(np.ptp(r, axis=1) > 0, g)


def build_batch(results: Sequence, cfg: GRPOConfig, *, seq_len: int, num_rows: int | None = None) -> tuple[dict, dict]:
    """rewards -> group advantages -> ``make_batch`` (rows a multiple of
    ``cfg.num_minibatches``) for ``results`` ordered as ``rollout_groups`` returns them.
    Returns (batch, host stats: reward_mean, success_rate, advantage_abs_mean,
    zero_groups (share of groups with all-equal rewards), calls, trained_calls (those given
    rows: all, or with ``skip_zero_advantage`` those of groups with an advantage), rows)."""
    keep = rollout_mask(results, cfg)
    r = rewards(results, cfg).reshape(-1, cfg.group_size)
    adv = group_advantages(r, cfg.adv_eps)
    batch = make_batch(
        results,
        adv,
        seq_len=seq_len,
        num_rows=num_rows,
        multiple_of=cfg.num_minibatches,
        pack=cfg.pack_calls,
        keep=keep,
        weighting=cfg.call_weighting,
    )
    stats = {
        "reward_mean": float(r.mean()),
        "success_rate": float(np.mean([x.success for x in results])),
        "advantage_abs_mean": float(np.abs(adv).mean()),
        "zero_groups": float(np.mean(np.ptp(r, axis=1) == 0)),
        "calls": sum(1 for x in results for c in x.calls if len(c.output_tokens)),
        "trained_calls": sum(1 for x, k in zip(results, keep) if k for c in x.calls if len(c.output_tokens)),
        "rows": int(batch["tokens"].shape[0]),
    }
    return batch, stats


def reference_params(params):
    """A frozen copy of ``params`` for the KL term (new buffers: the step donates the state's)."""
    return jax.tree.map(jnp.copy, params)


# ----------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------
def clipped_pg(ratio, advantages, clip_eps):
    """The PPO-clipped policy-gradient loss per token: ``-min(r A, clip(r, 1-eps, 1+eps) A)``."""
    return -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)


def k3_kl(logp, ref_logp):
    """The low-variance KL estimator per token: ``exp(d) - d - 1`` with ``d = ref_logp - logp``
    (clamped to [-20, 20])."""
    d = jnp.clip(ref_logp - logp, -_KL_CLAMP, _KL_CLAMP)
    return jnp.exp(d) - d - 1.0


def _logprobs(graphdef, params, batch, forward=None):
    return token_logprobs(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"], forward)


def _loss_sums(graphdef, params, ref_params, batch: dict, clip_eps, beta, forward=None):
    """(loss, sums) for ``batch``; ``batch["ref_logprobs"]`` (if present) replaces the
    reference forward."""
    logp = _logprobs(graphdef, params, batch, forward)
    mask = target_mask(batch)
    on = mask > 0
    ratio = jnp.exp(jnp.where(on, logp - batch["old_logprobs"], 0.0))
    adv = batch["token_advantages"] if "token_advantages" in batch else batch["advantages"][:, None]
    pg = clipped_pg(ratio, adv, clip_eps)
    if beta:
        ref = batch["ref_logprobs"] if "ref_logprobs" in batch else _logprobs(graphdef, ref_params, batch, forward)
        kl = jnp.where(on, k3_kl(logp, jax.lax.stop_gradient(ref)), 0.0)
    else:
        kl = jnp.zeros_like(logp)
    w = token_weights(batch, mask)
    pg_loss = (w * pg).sum()
    kl_loss = (w * kl).sum()
    loss = pg_loss + beta * kl_loss
    sums = {
        "pg_loss": pg_loss,
        "kl_loss": kl_loss,
        "kl_sum": (kl * mask).sum(),
        "clipped": ((jnp.abs(ratio - 1.0) > clip_eps) * mask).sum(),
        "ratio_sum": (ratio * mask).sum(),
        "tokens": mask.sum(),
    }
    return loss, sums


def token_weights(batch: dict, mask) -> jax.Array:
    """f32[C, L-1]: each trained token's share of the loss, ``w_c / |T_c|`` (0 elsewhere), from
    a packed batch's ``token_weights`` or a one-call-per-row batch's ``weights``."""
    if "token_weights" in batch:
        return batch["token_weights"] * mask
    return batch["weights"][:, None] * mask / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)


def _metrics(loss, sums) -> dict:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    return {
        "loss": loss,
        "pg_loss": sums["pg_loss"],
        "kl": sums["kl_sum"] / tokens,
        "clip_fraction": sums["clipped"] / tokens,
        "ratio_mean": sums["ratio_sum"] / tokens,
        "tokens": sums["tokens"],
    }


def grpo_loss(graphdef, params, ref_params, batch: dict, clip_eps: float, beta: float) -> tuple[jax.Array, dict]:
    """(loss, metrics) of the module docstring's formula on ``batch`` (from ``make_batch``).
    ``ref_params`` is unused (may be None) when ``beta == 0``."""
    loss, sums = _loss_sums(graphdef, params, ref_params, batch, clip_eps, beta)
    return loss, _metrics(loss, sums)


# ----------------------------------------------------------------------------------------
# the update
# ----------------------------------------------------------------------------------------
def micro_chunks(rows: int, seq_len: int, budget_tokens: int) -> tuple[int, int]:
    """(k, size): ``rows`` rows as k chunks of ``size`` rows (k * size >= rows, the rest
    padding), each at most ``budget_tokens`` tokens (at least one row); (1, rows) for budget 0."""
    if not budget_tokens or rows * seq_len <= budget_tokens:
        return 1, rows
    per = max(1, budget_tokens // seq_len)
    k = -(-rows // per)
    return k, -(-rows // k)


def _padded(index, size: int, fill: int):
    """``index`` int32[..., n] padded along its last axis to ``size`` with ``fill``."""
    pad = size - index.shape[-1]
    if pad == 0:
        return index
    return jnp.concatenate([index, jnp.full(index.shape[:-1] + (pad,), fill, index.dtype)], axis=-1)


def _gather_rows(batch: dict, idx, rows_sharding=None) -> dict:
    """``batch``'s rows ``idx``, constrained to ``rows_sharding`` (split over the data devices)
    when given: the partitioner otherwise replicates a gather's result, and every device
    would hold and compute every row of the micro-batch."""
    out = {n: v[idx] for n, v in batch.items()}
    if rows_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, jax.tree.map(lambda _: rows_sharding, out))
    return out


def _chunked_logprobs(graphdef, params, batch: dict, k: int, size: int, forward=None, rows_sharding=None) -> jax.Array:
    """token log-probs f32[C, L-1] of the C real rows of ``batch`` (whose last row is the
    all-zero padding row), k blocks of ``size`` rows at a time (lax.map), each block split
    over ``rows_sharding`` when given (``_gather_rows``)."""
    c = batch["tokens"].shape[0] - 1
    idx = _padded(jnp.arange(c, dtype=jnp.int32), k * size, c).reshape(k, size)
    rows = {n: jnp.asarray(batch[n]) for n in ("tokens", "positions", "segment_ids")}
    out = jax.lax.map(lambda i: _logprobs(graphdef, params, _gather_rows(rows, i, rows_sharding), forward), idx)
    return out.reshape(k * size, -1)[:c]


def grpo_update(
    graphdef,
    tx: optax.GradientTransformation,
    cfg: GRPOConfig,
    state: TrainState,
    ref_params,
    batch: dict,
    key,
    schedule: optax.Schedule | None = None,
    forward=None,
    rows_sharding=None,
) -> tuple[TrainState, dict]:
    """The (unjitted) GRPO update: ``cfg.inner_epochs`` passes, each over the rows shuffled
    with ``fold``s of ``key`` and split into ``cfg.num_minibatches`` minibatches, one
    optimizer update per minibatch (``lax.scan``). An update whose loss or gradient is not
    finite is skipped (params and optimizer state kept) and ``finite`` reports False.
    ``forward``: the training forward's options (``sft.token_logprobs``). ``rows_sharding``:
    a batch's data-split sharding on a mesh; every micro-batch (and reference-forward block)
    gathered from the shuffled rows is split over it (``_gather_rows``)."""
    TRACE_COUNTS["grpo_update"] += 1
    rows = batch["tokens"].shape[0]
    m, epochs = cfg.num_minibatches, cfg.inner_epochs
    if rows % m:
        raise ValueError(
            f"batch has {rows} rows: expected a multiple of num_minibatches={m} "
            "(make_batch(..., multiple_of=num_minibatches))"
        )
    seq_len = batch["tokens"].shape[1]
    # One all-zero row appended (index ``rows``): the padding of micro-batches and forward
    # chunks; its loss mask and weight are 0, so it adds nothing to any loss, sum or gradient.
    batch = {
        k: jnp.concatenate([jnp.asarray(v), jnp.zeros((1,) + np.shape(v)[1:], jnp.asarray(v).dtype)])
        for k, v in batch.items()
    }
    fk, fsize = micro_chunks(rows, seq_len, cfg.micro_batch_tokens)
    if cfg.recompute_old_logprobs:
        old = _chunked_logprobs(graphdef, state.params, batch, fk, fsize, forward, rows_sharding)
        batch["old_logprobs"] = jax.lax.stop_gradient(jnp.concatenate([old, batch["old_logprobs"][-1:]]))
    if cfg.beta:  # the reference is fixed during the step: one forward per row, not one per epoch
        ref = _chunked_logprobs(graphdef, ref_params, batch, fk, fsize, forward, rows_sharding)
        batch["ref_logprobs"] = jax.lax.stop_gradient(jnp.concatenate([ref, jnp.zeros_like(ref[:1])]))
    perms = jnp.stack([jax.random.permutation(jax.random.fold_in(key, e), rows) for e in range(epochs)])
    k, size = micro_chunks(rows // m, seq_len, cfg.micro_batch_tokens)
    order = _padded(perms.reshape(epochs * m, rows // m).astype(jnp.int32), k * size, rows).reshape(epochs * m, k, size)
    grad_fn = jax.value_and_grad(
        lambda p, mb: _loss_sums(graphdef, p, None, mb, cfg.clip_eps, cfg.beta, forward), has_aux=True
    )

    def micro_grad(params, idx):  # idx [size]: one micro-batch's rows
        mb = _gather_rows(batch, idx, rows_sharding)
        for n in ("weights", "token_weights"):  # unbiased estimate of the whole batch's loss
            if n in mb:
                mb[n] = mb[n] * m
        return grad_fn(params, mb)

    def minibatch_grad(params, idx):  # idx [k, size]: the loss is a sum over rows, so are its gradients
        if k == 1:
            return micro_grad(params, idx[0])
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(micro_grad, params, idx[0]))
        total, _ = jax.lax.scan(lambda acc, i: (jax.tree.map(jnp.add, acc, micro_grad(params, i)), None), zeros, idx)
        return total

    def body(carry, idx):
        params, opt_state, step = carry
        (loss, sums), grads = minibatch_grad(params, idx)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        out = dict(sums, loss=loss, grad_norm=optax.tree.norm(grads), finite=finite)
        return (keep(new_params, params), keep(new_opt, opt_state), step + finite.astype(jnp.int32)), out

    (params, opt_state, step), per = jax.lax.scan(body, (state.params, state.opt_state, state.step), order)
    tokens = jnp.maximum(per["tokens"].sum(), 1.0)
    metrics = {
        "loss": per["loss"].mean(),
        "pg_loss": per["pg_loss"].mean(),
        "kl_loss": per["kl_loss"].mean(),
        "kl": per["kl_sum"].sum() / tokens,
        "clip_fraction": per["clipped"].sum() / tokens,
        "ratio_mean": per["ratio_sum"].sum() / tokens,
        "tokens": per["tokens"].sum() / epochs,
        "grad_norm": per["grad_norm"].mean(),
        "updates": step - state.step,
        "finite": jnp.all(per["finite"]),
    }
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    return TrainState(step=step, params=params, opt_state=opt_state), metrics


def make_grpo_step(
    graphdef,
    tx: optax.GradientTransformation,
    cfg: GRPOConfig,
    schedule: optax.Schedule | None = None,
    state_shardings=None,
    batch_sharding=None,
    remat: str = "none",
    attention: str = "blocked",
):
    """A jitted ``step(state, ref_params, batch, key) -> (state, metrics)`` (``grpo_update``;
    state donated). ``ref_params``: ``reference_params(initial params)``, or None when
    ``cfg.beta == 0``. ``state.step`` counts optimizer updates (``inner_epochs x
    num_minibatches`` per call when all are finite). ``remat``, ``attention``: the training
    forward's options (``model.REMATS``, ``model.ATTENTIONS``). On a mesh (``state_shardings``)
    each micro-batch is split like ``batch_sharding`` (default: the mesh's data sharding)."""
    from jaxapr import model as model_lib
    from jaxapr import sharding

    cfg.check()
    model_lib.check_train_options(remat, attention)
    forward = {"remat": remat, "attention": attention}
    rows_sharding = sharding.rows_sharding(state_shardings, batch_sharding)

    def step(state, ref_params, batch, key):
        return grpo_update(graphdef, tx, cfg, state, ref_params, batch, key, schedule, forward, rows_sharding)

    kw: dict[str, Any] = {"donate_argnums": (0,)}
    if state_shardings is not None:
        ref_shardings = state_shardings.params if cfg.beta else None
        kw["in_shardings"] = (state_shardings, ref_shardings, batch_sharding, None)
        kw["out_shardings"] = (state_shardings, None)
    return jax.jit(step, **kw)
