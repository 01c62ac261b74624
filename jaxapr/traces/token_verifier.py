"""``verify_tokens``: the trace verifier on token arrays, jittable (the RL reward on device).

It agrees with ``traces.verify(tokenizer.decode(ids), nums, target)`` for every token sequence
that is the tokenizer's own encoding of its text (what ``CountdownTokenizer.encode`` makes;
a policy that spells a digit as a byte token, say, is simply not solved). The rule is the one
in ``jaxapr/traces/verifier.py``; here it runs as two vectorised passes and one ``lax.scan``:

1. drop pad/bos/eos tokens (``decode`` skips them) and append a newline, so that every line
   ends in one;
2. find the lines that contain ``Goal Reached`` -- inside the phrase tokens
   `` equal: Goal Reached`` and ``<Goal Reached in Sub Search ``, or spelled in byte tokens
   -- and from them the second-to-last (``g2``) and last (``g1``) goal lines;
3. scan the tokens once with a small state machine that parses each line after ``g2``
   (``Exploring Operation`` lines into x, op, y, z and the listed numbers; goal and ``Exit``
   lines) and, at each newline, replays the move on the multiset (int32 values; the rules'
   bound of 2**31 - 1 makes every valid path representable) or checks the final goal line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from envs.countdown import rules
from jaxapr.tokenizer import CountdownTokenizer

# Line kinds.
_EMPTY, _UNCHECKED, _EXPLORE, _GOAL, _EXIT, _BAD = range(6)
_BIG = jnp.int32(2**31 - 1)


@functools.cache
def _ids() -> dict:
    tok = CountdownTokenizer()
    t = tok.token_id
    spelled = [tok.byte_offset + b if ch != " " else t(" ") for ch, b in zip("Goal Reached", b"Goal Reached")]
    return dict(
        nl=t("\n"),
        digit0=int(tok.digit_ids[0]),
        specials=(tok.pad_id, tok.bos_id, tok.eos_id),
        eq_goal=t(" equal: Goal Reached"),
        sub_goal=t("<Goal Reached in Sub Search "),
        spelled=tuple(spelled),
        unchecked=(t("Current State: "), t("Generated Node #"), t("Moving to Node #")),
        explore=t("Exploring Operation: "),
        resulting=t(", Resulting Numbers: "),
        exit=t("Exit Sub Search at level "),
        ops=tuple(t(s) for s in rules.OP_SYMBOLS),
        eq=t("="),
        comma=t(","),
        sep=t(", "),
        lbr=t("["),
        rbr=t("]"),
        empty_list=t("[]"),
    )


def _compact(tokens, length, specials):
    """Valid non-special tokens moved to the front (order kept); returns (tokens, count)."""
    n = tokens.shape[0]
    keep = jnp.arange(n) < length
    for s in specials:
        keep &= tokens != s
    order = jnp.argsort(~keep, stable=True)
    return tokens[order], jnp.sum(keep, dtype=jnp.int32)


def _verify_one(tokens, length, nums, target):
    ids = _ids()
    n = nums.shape[0]
    tokens = jnp.asarray(tokens, jnp.int32)
    toks, count = _compact(tokens, length, ids["specials"])
    L = toks.shape[0] + 1
    pos = jnp.arange(L)
    toks = jnp.concatenate([toks, jnp.full((1,), -1, jnp.int32)])
    toks = jnp.where(pos < count, toks, jnp.where(pos == count, ids["nl"], -1))  # final newline
    is_nl = toks == ids["nl"]
    line = jnp.cumsum(is_nl) - is_nl  # line index of each token (a newline ends its line)

    goal = (toks == ids["eq_goal"]) | (toks == ids["sub_goal"])
    spelled = jnp.ones((L,), bool)
    for k, t in enumerate(ids["spelled"]):
        shifted = jnp.pad(toks, (0, k), constant_values=-1)[k : k + L]
        spelled &= shifted == t
    goal |= spelled
    line_goal = jax.ops.segment_max(goal.astype(jnp.int32), line, num_segments=L) > 0
    idx = jnp.arange(L)
    g1 = jnp.max(jnp.where(line_goal, idx, -1))
    g2 = jnp.max(jnp.where(line_goal & (idx < g1), idx, -1))

    d0 = ids["digit0"]
    ops = jnp.asarray(ids["ops"], jnp.int32)

    def start_number(c):
        return c | dict(nd=jnp.int32(0), val=jnp.int32(0), lead0=jnp.bool_(False), over=jnp.bool_(False))

    def line_reset(c):
        c = start_number(c)
        return c | dict(
            kind=jnp.int32(_EMPTY),
            field=jnp.int32(0),
            x=jnp.int32(0),
            y=jnp.int32(0),
            z=jnp.int32(0),
            op=jnp.int32(0),
            nlist=jnp.int32(0),
            listed=jnp.full((n,), _BIG, jnp.int32),
            lover=jnp.bool_(False),
        )

    def number_value(c):
        """(value, ok) of the number just read: non-empty, canonical, no overflow."""
        good = (c["nd"] > 0) & ~(c["lead0"] & (c["nd"] > 1)) & ~c["over"]
        return jnp.where(good, c["val"], _BIG), good

    def step(c, t):
        is_digit = (t >= d0) & (t < d0 + 10)
        d = t - d0
        # Accumulate digits (overflow-checked) whenever a number is being read.
        over = c["over"] | (c["val"] > (_BIG - d) // 10)
        digit_state = dict(
            nd=c["nd"] + 1,
            val=jnp.where(over, 0, c["val"] * 10 + d),
            lead0=jnp.where(c["nd"] == 0, d == 0, c["lead0"]),
            over=over,
        )
        kind, field = c["kind"], c["field"]
        new = dict(c)
        # First token of a line decides its kind.
        first = kind == _EMPTY
        is_unchecked = (t == ids["unchecked"][0]) | (t == ids["unchecked"][1]) | (t == ids["unchecked"][2])
        first_kind = jnp.select(
            [is_unchecked, t == ids["explore"], is_digit, t == ids["exit"]], [_UNCHECKED, _EXPLORE, _GOAL, _EXIT], _BAD
        )
        val, good = number_value(c)
        is_op = jnp.any(t == ops)
        op_index = jnp.argmax(t == ops).astype(jnp.int32)
        # Exploring: field 0 x, 1 y, 2 z, 3 expect '[', 4 list numbers, 5 closed.
        ex_next = jnp.select(
            [
                (field == 0) & is_op & good,
                (field == 1) & (t == ids["eq"]) & good,
                (field == 2) & (t == ids["resulting"]) & good,
                (field == 3) & (t == ids["lbr"]),
                (field == 3) & (t == ids["empty_list"]),
                (field == 4) & (t == ids["sep"]) & good,
                (field == 4) & (t == ids["rbr"]) & good,
                (field < 3) & is_digit,
                (field == 4) & is_digit,
            ],
            [1, 2, 3, 4, 5, 4, 5, field, field],
            -1,
        )
        # Goal: field 0 a, 1 b, 2 closed.  Exit: field 0 digits.
        goal_next = jnp.select(
            [
                (field == 0) & (t == ids["comma"]) & good,
                (field == 1) & (t == ids["eq_goal"]) & good,
                (field < 2) & is_digit,
            ],
            [1, 2, field],
            -1,
        )
        exit_next = jnp.where(is_digit & (field == 0), 0, -1)
        nxt = jnp.select([kind == _EXPLORE, kind == _GOAL, kind == _EXIT], [ex_next, goal_next, exit_next], field)
        kind = jnp.where(first, first_kind, jnp.where((nxt < 0) & (kind != _UNCHECKED), _BAD, kind))
        new["kind"] = kind
        # Numbers: record the finished one, then reset or accumulate.
        finishing = ~first & ~is_digit & (nxt >= 0)
        ex, gl = c["kind"] == _EXPLORE, c["kind"] == _GOAL
        new["x"] = jnp.where(finishing & ((ex | gl) & (field == 0)), val, c["x"])
        new["y"] = jnp.where(finishing & ((ex & (field == 1)) | (gl & (field == 1))), val, c["y"])
        new["z"] = jnp.where(finishing & ex & (field == 2), val, c["z"])
        new["op"] = jnp.where(finishing & ex & (field == 0), op_index, c["op"])
        into_list = finishing & ex & (field == 4)
        slot = jnp.clip(c["nlist"], 0, n - 1)
        new["listed"] = jnp.where(into_list & (jnp.arange(n) == slot), val, c["listed"])
        new["lover"] = c["lover"] | (into_list & (c["nlist"] >= n))
        new["nlist"] = c["nlist"] + into_list
        new["field"] = jnp.where(first, 0, jnp.maximum(nxt, 0))
        reading = is_digit & ((kind == _EXPLORE) | (kind == _GOAL) | (kind == _EXIT))
        for k in ("nd", "val", "lead0", "over"):
            new[k] = jnp.where(reading, digit_state[k], jnp.zeros_like(c[k]) if k != "val" else 0)
        # Exit numbers must not start with 0 ([1-9][0-9]*).
        new["kind"] = jnp.where((new["kind"] == _EXIT) & reading & (c["nd"] == 0) & (d == 0), _BAD, new["kind"])
        return new

    def end_line(c, ell):
        """Apply the finished line ``ell`` to the replay."""
        kind, field = c["kind"], c["field"]
        in_path = ell > g2
        explore_ok = (kind == _EXPLORE) & (field == 5)
        goal_ok = (kind == _GOAL) & (field == 2)
        exit_ok = (kind == _EXIT) & (c["nd"] > 0)  # any length: the text rule has no bound here
        # Replay a move.
        s, cnt = c["state"], c["count"]
        valid = jnp.arange(n) < cnt
        x, y, z, op = c["x"], c["y"], c["z"], c["op"]
        ix = jnp.argmax(valid & (s == x))
        has_x = jnp.any(valid & (s == x))
        rest = valid & (jnp.arange(n) != ix)
        iy = jnp.argmax(rest & (s == y))
        has_y = jnp.any(rest & (s == y))
        values, legal = rules.op_values(x, y)
        order_ok = (op != rules.SUB) & (op != rules.DIV) | (x >= y)
        move_ok = has_x & has_y & order_ok & legal[op] & (values[op] == z)
        keep = rest & (jnp.arange(n) != iy)
        new_state = jnp.where(keep, s, _BIG)
        new_state = jnp.sort(new_state).at[cnt - 2].set(z)
        new_count = cnt - 1
        listed_ok = ~c["lover"] & (c["nlist"] == new_count) & jnp.all(jnp.sort(c["listed"]) == jnp.sort(new_state))
        apply = in_path & (ell < g1) & explore_ok
        ok = c["ok"]
        ok &= ~in_path | jnp.select(
            [ell < g1, ell == g1],
            [
                (kind == _EMPTY) | (kind == _UNCHECKED) | (explore_ok & move_ok & listed_ok),
                goal_ok & (c["x"] == target) & (c["y"] == target) & (cnt == 1) & (s[0] == target),
            ],
            (kind == _EMPTY) | exit_ok,
        )
        state = jnp.where(apply, new_state, s)
        count_ = jnp.where(apply, new_count, cnt)
        return line_reset(c | dict(ok=ok, state=state, count=count_))

    def body(c, inputs):
        t, ell, nl = inputs
        c = jax.lax.cond(nl, lambda c: end_line(c, ell), lambda c: step(c, t), c)
        return c, None

    init = line_reset(dict(ok=g2 >= 0, state=jnp.sort(nums.astype(jnp.int32)), count=jnp.int32(n)))
    # Only tokens after the second-to-last goal line matter; earlier ones are skipped as
    # no-ops (their newlines still end lines, which resets the line state harmlessly).
    live = (line > g2) | is_nl
    final, _ = jax.lax.scan(body, init, (jnp.where(live, toks, -1), line, is_nl & (toks != -1)))
    return final["ok"]


def verify_tokens(tokens, lengths, nums, targets) -> jax.Array:
    """bool[B]: whether each token sequence solves its problem (jit/vmap-friendly twin of ``verify``).

    tokens int32[B, L] (tokenizer ids, any padding past ``lengths``), lengths int32[B],
    nums int32[B, N] (the multiset the restated path starts from), targets int32[B].
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens has shape {tokens.shape}: expected int32[B, L]")
    nums = jnp.asarray(nums, jnp.int32)
    if nums.ndim != 2 or nums.shape[0] != tokens.shape[0]:
        raise ValueError(f"nums has shape {nums.shape}: expected int32[B, N] with B = {tokens.shape[0]}")
    return jax.vmap(_verify_one)(tokens, jnp.asarray(lengths, jnp.int32), nums, jnp.asarray(targets, jnp.int32))
