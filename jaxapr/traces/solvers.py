"""Symbolic Countdown solvers that write search traces (docs/trace_format.md), seeded and deterministic.

One module (over 500 lines) because the three families share one search core (nodes, expansion,
beam pops) and one order of random draws, which a seed pins.

Three families, each a best-first search over the Countdown move tree (moves from
``envs.countdown.rules``, the single definition of the rules):

* ``sos``  -- Stream-of-Search serial traces: ``strategy="dfs"`` (depth-first, children in
  heuristic order, pruned by a heuristic threshold) or ``strategy="bfs"`` (beam search that
  keeps the ``beam_size`` best children of each node, in random order).
* ``sosp`` -- SoS+: the beam search of ``bfs`` in which, after expanding a node, a coin with
  probability ``promising_threshold`` decides to dive into each kept child in turn with an
  inline sub search (``Start Sub Search at level L`` ... ``Exit Sub Search at level L``)
  instead of queueing it. A success restates the winning path from the root.
* ``apr``  -- Adaptive Parallel Reasoning: the same beam search, but a dive is a ``spawn()``
  of one child call per kept child (when more than one is kept); the parent's next call is
  ``join()`` of its text and the children's final calls (``jaxapr.traces.spawn_join``).
  Children search with ``sub_call_beam_size`` and, when ``max_depth > 1``, may spawn too.

Randomness comes only from ``random.Random(seed)`` and is drawn in the same order as the
original APR / Stream-of-Search generators (one ``shuffle`` of the kept children per
expansion, one ``random()`` per dive decision), so that a seed fixes the text exactly.
``shuffle=False`` (not in the original) writes every expansion's kept children best first
instead, which a small policy imitates more easily (BUILD_NOTES, "Best-first expansions").

Fidelity: given the same random choices, ``sosp`` and ``apr`` reproduce all 200 fixture
traces/trees exactly (tests/traces/test_solvers.py replays each fixture's choices). Quirks
of the original kept on purpose: SoS ``bfs`` queues terminal children too; ``dfs`` numbers
children by position among all tried children; after an unsuccessful spawn the APR thread
picks its next "Moving to Node" line as if it were at beam position len(children) - 1 (the
original reuses a loop variable). Differences: the fixtures' seeds are unknown (the
original used the global ``random`` state), so only the random choices, not the seeds,
carry over; ``mult_heuristic`` for a target below 2 uses [target] as the factor list (the
original fails there); moves whose result exceeds int32 are illegal (``rules``).

Speed: a state's children (sorted by heuristic; line text formatted lazily, only for
kept children) are memoised per call; heuristics update the parent's per-number costs;
traces are lists of line strings joined once; the cyclic GC is paused during a call
(no reference cycles are built). Measured single process on a 2-core CPU, 2000
``generate_problems(PRNGKey(0), 2000)`` problems, beams as the original generators drew
them: about 8,800 SoS+ traces/s and 1,750 APR trees/s.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import heapq
import operator
import random
from collections.abc import Callable, Sequence

from envs.countdown import rules

__all__ = ["apr", "mult_heuristic", "sos", "sosp", "sum_heuristic"]


# --------------------------------------------------------------------------------------
# Heuristics (lower is better), as in Stream-of-Search. Both are built from a per-number
# cost, which lets an expansion update the parent's total instead of re-summing.
# --------------------------------------------------------------------------------------
_FACTOR_DIST: dict[int, list[int]] = {}


def _factor_table(target: int) -> list[int]:
    """Per target, the distance of each number 0..target to the nearest factor of the target
    (its divisors from 2 to target, the original's definition; [target] if there are none).
    A number n >= target is n - target away (target is its own largest factor)."""
    table = _FACTOR_DIST.get(target)
    if table is None:
        if len(_FACTOR_DIST) > 1_000:
            _FACTOR_DIST.clear()
        factors = [f for f in range(2, target + 1) if target % f == 0] or [target]
        table = []
        for n in range(target + 1):
            k = bisect.bisect_left(factors, n)
            table.append(min(abs(n - factors[m]) for m in (k - 1, k) if 0 <= m < len(factors)))
        _FACTOR_DIST[target] = table
    return table


def _factor_distance(num: int, target: int) -> int:
    return num - target if num >= target else _factor_table(target)[num]


def mult_heuristic(nums: Sequence[int], target: int) -> int:
    """Sum over the numbers of their distance to the nearest factor of the target."""
    return sum(_factor_distance(n, target) for n in nums)


def sum_heuristic(nums: Sequence[int], target: int) -> float:
    """Mean distance of the numbers to the target (|n - T| for a single number)."""
    if len(nums) == 1:
        return abs(nums[0] - target)
    return sum(abs(n - target) for n in nums) / len(nums)


_HEURISTICS = {"mult": mult_heuristic, "sum": sum_heuristic}


def _heuristic_fn(name: str) -> Callable:
    try:
        return _HEURISTICS[name]
    except KeyError:
        raise ValueError(f"heuristic={name!r} is not known: expected 'sum' or 'mult'") from None


# --------------------------------------------------------------------------------------
# Search nodes and the cached expansion of a state.
# --------------------------------------------------------------------------------------
class _Child:
    """One legal move (i, j, op) out of a state, with the result and its heuristic value.
    The rest (the list after the move, the text of its lines) is filled in lazily, since
    most children are pruned."""

    __slots__ = (
        "end",
        "explore",
        "gen_tail",
        "h",
        "i",
        "j",
        "numbers",
        "nums",
        "nums_str",
        "op",
        "opc",
        "parent_nums",
        "r",
    )

    def __init__(self, h, parent_nums, i, j, opc, r):
        self.h = h  # heuristic value of the resulting list
        self.parent_nums = parent_nums
        self.i, self.j, self.opc, self.r = i, j, opc, r
        self.explore = None  # "Exploring Operation: ..., Resulting Numbers: [...]\n"

    def fill(self, target: int) -> _Child:
        """Fills in op ("53-26=27", ``rules.op_text``), numbers (the list after the move,
        ``rules.apply_move``) and nums (the same as a tuple), and formats the lines:
        nums_str ("[22, 31, 27]"), explore, gen_tail (": T:[...] Operation: op\n", after
        "Generated Node #id") and end (the terminal line, or None)."""
        p = self.parent_nums
        i, j = self.i, self.j
        self.op = op = rules.op_text(p[i], p[j], self.opc, self.r)
        self.numbers = numbers = rules.apply_move(p, i, j, self.opc)  # p: a tuple, read only
        self.nums = tuple(numbers)
        self.nums_str = nums_str = str(numbers)
        self.explore = f"Exploring Operation: {op}, Resulting Numbers: {nums_str}\n"
        if len(numbers) == 1:
            verdict = "equal: Goal Reached" if numbers[0] == target else "unequal: No Solution"
            self.end = f"{numbers[0]},{target} {verdict}\n"
        else:
            self.gen_tail = f": {target}:{nums_str} Operation: {op}\n"
            self.end = None
        return self


_OPS = tuple(range(rules.NUM_OPS))
_BY_H = operator.attrgetter("h")


def _children(cache: dict, nums: tuple, target: int, heuristic: Callable) -> list[_Child]:
    """The legal moves of ``nums``, stably sorted by the heuristic value of the resulting
    list. Memoised in ``cache`` (one dict per solver call: states rarely repeat across
    problems, and objects that outlive a call only add work for the garbage collector).

    Moves are enumerated in the canonical order of ``rules.moves`` (pairs in
    ``rules.pairs`` order, then ops add, mul, sub, div), with legality and results from
    ``rules.apply_op``; a test checks that this is exactly ``rules.moves``. The heuristic of a
    child is the parent's per-number costs, minus the two operands', plus the result's
    (integer sums, so exactly the value the heuristic function gives).
    """
    out = cache.get(nums)
    if out is not None:
        return out
    out = []
    n = len(nums)
    apply_op = rules.apply_op
    if heuristic is mult_heuristic:
        table = _factor_table(target)
        cost = [x - target if x >= target else table[x] for x in nums]
        size = 0
    elif heuristic is sum_heuristic:
        table = None
        cost = [abs(x - target) for x in nums]
        size = n - 1
    else:
        raise ValueError(f"heuristic {heuristic!r}: expected mult_heuristic or sum_heuristic")
    total = sum(cost)
    for i, j in rules.pairs(n):
        a, b = nums[i], nums[j]
        base = total - cost[i] - cost[j]
        for opc in _OPS:
            r = apply_op(a, b, opc)
            if r is None:
                continue
            if table is not None:
                h = base + (r - target if r >= target else table[r])
            else:
                h = base + abs(r - target)
                if size > 1:
                    h = h / size
            out.append(_Child(h, nums, i, j, opc, r))
    out.sort(key=_BY_H)
    cache[nums] = out
    return out


class _Node:
    """A search node: id path, numbers, operations so far, and how it was generated.

    Comparisons mirror the original's heap entries ``(h, node)`` where nodes compare by
    heuristic only: two nodes are never "less" than each other, so ties keep heap order.
    """

    __slots__ = ("h", "idx", "move", "nums", "nums_str", "ops_str", "parent")

    def __init__(self, idx, nums, nums_str, ops_str, h, parent, move):
        self.idx = idx
        self.nums = nums
        self.nums_str = nums_str
        self.ops_str = ops_str  # "['53-26=27', '31-22=9']"
        self.h = h
        self.parent = parent
        self.move = move  # the _Child that generated it (None at the root)

    def __lt__(self, other):
        return False

    def state_line(self, target: int) -> str:
        return f"Current State: {target}:{self.nums_str}, Operations: {self.ops_str}\n"


def _root(nums: Sequence[int], heuristic: Callable, target: int) -> _Node:
    nums = tuple(int(n) for n in nums)
    return _Node("0", nums, str(list(nums)), "[]", heuristic(nums, target), None, None)


def _make_child(parent: _Node, child: _Child, number: int) -> _Node:
    """The node generated from ``parent`` by ``child``, numbered ``number`` among its siblings."""
    p = parent.ops_str
    ops_str = f"['{child.op}']" if p == "[]" else f"{p[:-1]}, '{child.op}']"
    return _Node(f"{parent.idx},{number}", child.nums, child.nums_str, ops_str, child.h, parent, child)


def _restated_path(goal: _Node, start: _Node, target: int) -> list[str]:
    """Lines that restate the path from ``start`` down to ``goal`` (which reached the target):
    per step ``Moving to Node``, its state, the explored move and the generated node; the
    last step ends with the goal line."""
    chain = []
    node = goal
    while node is not start:
        chain.append(node)
        node = node.parent
        if node is None:
            raise RuntimeError("internal error: goal is not below the start node")
    chain.reverse()
    lines = []
    parent = start
    for node in chain:
        mv = node.move
        lines.append(f"Moving to Node #{parent.idx}\n")
        lines.append(parent.state_line(target))
        lines.append(mv.explore)
        lines.append(mv.end if mv.end is not None else f"Generated Node #{node.idx}{mv.gen_tail}")
        parent = node
    return lines


@contextlib.contextmanager
def _gc_paused():
    """Pauses the cyclic garbage collector during one solver call (and restores its state).

    The searches allocate many small objects but build no reference cycles (nodes point to
    their parents only), so reference counting frees everything; without the pause, the
    collector's passes over the caller's (e.g. jax's) objects cost more than the search.
    """
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rng(seed) -> random.Random:
    """``random.Random(seed)`` for an int; an object with ``shuffle`` and ``random`` methods
    (a ``random.Random``, or a scripted stand-in in tests) is used as it is."""
    if hasattr(seed, "shuffle") and hasattr(seed, "random"):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is not an int (or random.Random)")
    return random.Random(seed)


def _check_problem(nums, target, beam_size=1):
    if not isinstance(nums, (list, tuple)) or len(nums) < 1:
        raise ValueError(f"nums={nums!r}: expected a non-empty list of ints")
    if isinstance(target, bool) or int(target) != target or target < 1:
        raise ValueError(f"target={target!r}: expected a positive int")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size!r}: expected an int >= 1")


class _Search:
    """Shared state of one solver call: the problem, heuristic, random source, dive/spawn
    probability ``p``, root node, whether expansions write their kept children in a random
    order (``shuffle``) or best first, and the per-call memo of expansions (``_children``)."""

    __slots__ = ("cache", "heuristic", "p", "rng", "root", "shuffle", "target")

    def __init__(self, target, heuristic, rng, p, root, shuffle=True):
        self.target, self.heuristic, self.rng, self.p, self.root = target, heuristic, rng, p, root
        self.shuffle = _check_shuffle(shuffle)
        self.cache = {}

    def children(self, node: _Node) -> list[_Child]:
        return _children(self.cache, node.nums, self.target, self.heuristic)


def _check_shuffle(shuffle) -> bool:
    if not isinstance(shuffle, bool):
        raise ValueError(
            f"shuffle={shuffle!r}: expected True (kept children in a random order, as the original) "
            "or False (best first)"
        )
    return shuffle


def _kept(s: _Search, node: _Node, keep: int) -> list[_Child]:
    """The ``keep`` best children of ``node`` (lines filled) in the order an expansion writes
    them: shuffled with ``s.rng`` (one call per expansion, as the original) or, when not
    ``s.shuffle``, best first."""
    kept = s.children(node)[:keep]  # a fresh list (slice)
    for child in kept:
        if child.explore is None:
            child.fill(s.target)
    if s.shuffle:
        s.rng.shuffle(kept)
    return kept


def _expand(s: _Search, node: _Node, keep: int, out: list):
    """Writes the explore lines of one expansion of ``node`` (its ``_kept`` children, numbered
    in that order, terminals not numbered). Returns ``(goal_node | None, generated_nodes)``."""
    target = s.target
    kept = _kept(s, node, keep)
    generated = []
    for child in kept:
        out.append(child.explore)
        if child.end is not None:
            out.append(child.end)
            if child.nums[0] == target:
                return _make_child(node, child, len(generated)), generated
        else:
            new = _make_child(node, child, len(generated))
            out.append(f"Generated Node #{new.idx}{child.gen_tail}")
            generated.append(new)
    return None, generated


def _pop_beam(open_set: list, beam_size: int) -> list:
    return [heapq.heappop(open_set) for _ in range(min(beam_size, len(open_set)))]


# --------------------------------------------------------------------------------------
# SoS: depth-first and beam (breadth-first-like) serial traces.
# --------------------------------------------------------------------------------------
def _sos_dfs(s: _Search, node: _Node, threshold, out: list) -> bool:
    """Depth-first search: expand ``node``, try its children (those with heuristic <=
    threshold) in heuristic order; each non-terminal child is entered (``Moving to``) and
    searched recursively; between siblings the trace moves back to ``node``. Children are
    numbered by their position among all tried children. Returns True on the goal."""
    target = s.target
    out.append(node.state_line(target))
    kept = [c for c in s.children(node) if threshold is None or c.h <= threshold]
    for child in kept:
        if child.explore is None:
            child.fill(target)
    last = len(kept) - 1
    for k, child in enumerate(kept):
        out.append(child.explore)
        if child.end is not None:
            out.append(child.end)
            if child.nums[0] == target:
                return True
        else:
            new = _make_child(node, child, k)
            out.append(f"Generated Node #{new.idx}{child.gen_tail}")
            out.append(f"Moving to Node #{new.idx}\n")
            if _sos_dfs(s, new, threshold, out):
                return True
        if k < last:
            out.append(f"Moving to Node #{node.idx}\n")
            out.append(node.state_line(target))
    return False


def _sos_bfs(s: _Search, beam_size: int, out: list) -> bool:
    """Beam search: pop the ``beam_size`` best open nodes; for each, keep its ``beam_size``
    best children (``_kept``: in random order, or best first) and queue all of them (terminal
    ones too, as the original Stream-of-Search generator does; a terminal shares the number of
    the next generated sibling). Moves between nodes are written as ``Moving to Node``."""
    target, root = s.target, s.root
    open_set = [(root.h, root)]
    while open_set:
        current = _pop_beam(open_set, beam_size)
        for k, (_, node) in enumerate(current):
            out.append(node.state_line(target))
            kept = _kept(s, node, beam_size)
            number = 0
            queued = []
            for child in kept:
                new = _make_child(node, child, number)
                out.append(child.explore)
                if child.end is not None:
                    out.append(child.end)
                    if child.nums[0] == target:
                        return True
                else:
                    out.append(f"Generated Node #{new.idx}{child.gen_tail}")
                    number += 1
                queued.append(new)
            queued.sort(key=_BY_H)
            for new in queued:
                heapq.heappush(open_set, (new.h, new))
            if k < len(current) - 1:
                out.append(f"Moving to Node #{current[k + 1][1].idx}\n")
        if open_set:
            out.append(f"Moving to Node #{open_set[0][1].idx}\n")
    out.append("No solution found.")
    return False


def sos(
    nums: Sequence[int],
    target: int,
    *,
    strategy: str = "dfs",
    heuristic: str = "sum",
    beam_size: int = 5,
    seed=0,
    threshold="target",
    shuffle: bool = True,
) -> str:
    """A Stream-of-Search serial trace for (nums, target).

    ``strategy="dfs"``: depth-first search with children in heuristic order, pruned to those
    whose heuristic is <= ``threshold`` (default: the target, as SoS generated its data;
    ``None``: no pruning); deterministic. ``strategy="bfs"``: beam search of width
    ``beam_size`` whose kept children are shuffled with ``random.Random(seed)``; a failed
    search ends with ``No solution found.``; ``shuffle=False`` keeps them best first. Neither
    restates the path: a success ends with the first ``Goal Reached`` line.
    """
    _check_problem(nums, target, beam_size)
    h = _heuristic_fn(heuristic)
    root = _root(nums, h, target)
    out: list[str] = []
    if strategy not in ("dfs", "bfs"):
        raise ValueError(f"strategy={strategy!r} is not known: expected 'dfs' or 'bfs'")
    s = _Search(target, h, _rng(seed), None, root, shuffle)
    with _gc_paused():
        if strategy == "dfs":
            _sos_dfs(s, root, target if threshold == "target" else threshold, out)
        else:
            _sos_bfs(s, beam_size, out)
    return "".join(out)


# --------------------------------------------------------------------------------------
# SoS+: hybrid beam search with inline depth-first sub searches.
# --------------------------------------------------------------------------------------
def _sosp_search(s: _Search, start: _Node, beam_size: int, level: int, out: list) -> _Node | None:
    """One SoS+ (sub) search from ``start``.

    Beam search: pop the ``beam_size`` best open nodes; expand each (``_expand``); sort its
    generated children by heuristic; draw one coin (probability ``p``): heads, run a sub
    search at ``level + 1`` on each child in turn (stopping at a success), tails, queue
    them. On reaching the goal, restate the path from the root of the whole search.
    """
    target = s.target
    open_set = [(start.h, start)]
    while open_set:
        current = _pop_beam(open_set, beam_size)
        for k, (_, node) in enumerate(current):
            out.append(node.state_line(target))
            goal, generated = _expand(s, node, beam_size, out)
            if goal is not None:
                out.extend(_restated_path(goal, s.root, target))
                return goal
            generated.sort(key=_BY_H)
            dive = s.rng.random() < s.p
            sub = level + 1
            for new in generated:
                if dive:
                    out.append(f"Start Sub Search at level {sub}: Moving to Node #{new.idx}\n")
                    goal = _sosp_search(s, new, beam_size, sub, out)
                    out.append(f"Exit Sub Search at level {sub}\n")
                    if goal is not None:
                        return goal
                    out.append("No solution found in sub search\n")
                else:
                    heapq.heappush(open_set, (new.h, new))
            if k < len(current) - 1:
                out.append(f"Moving to Node #{current[k + 1][1].idx}\n")
        if open_set:
            out.append(f"Moving to Node #{open_set[0][1].idx}\n")
    out.append("No solution found.\n")
    return None


def _budget_prefix(token_budget) -> str:
    if token_budget is None:
        return ""
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget <= 0 or token_budget % 512:
        raise ValueError(f"token_budget={token_budget!r}: expected a positive multiple of 512")
    return f"Token Budget: {token_budget} "


def sosp(
    nums: Sequence[int],
    target: int,
    *,
    beam_size: int,
    seed=0,
    promising_threshold: float = 0.5,
    heuristic: str = "mult",
    token_budget: int | None = None,
    shuffle: bool = True,
) -> str:
    """An SoS+ trace: hybrid beam search with inline depth-first sub searches.

    See ``_sosp_search``. The trace starts with the root's ``Current State`` line; a success
    is the first ``Goal Reached`` line, the restated path from ``Moving to Node #0`` and a
    second ``Goal Reached`` line, followed by one ``Exit Sub Search at level L`` line per
    open sub search; a failure ends with ``No solution found.``. ``token_budget`` (a
    multiple of 512) adds the conditioning prefix ``Token Budget: N `` (off by default).
    Defaults match the original generator (``promising_threshold=0.5``, ``mult_heuristic``).
    ``shuffle=False``: every expansion writes its kept children best first (heuristic order)
    instead of the original's random order (see ``apr``).
    """
    _check_problem(nums, target, beam_size)
    h = _heuristic_fn(heuristic)
    root = _root(nums, h, target)
    s = _Search(target, h, _rng(seed), promising_threshold, root, shuffle)
    out = [_budget_prefix(token_budget)]
    with _gc_paused():
        _sosp_search(s, root, beam_size, 0, out)
    return "".join(out)


# --------------------------------------------------------------------------------------
# APR: spawn() children as separate calls, join() their results.
# --------------------------------------------------------------------------------------
def _apr_search(s: _Search, start: _Node, beam_size: int, sub_beam: int, level: int, max_depth: int, sj, prompt=None):
    """One APR thread from ``start`` (level 0: the root thread). Returns (CallTree, goal).

    The beam search of SoS+, written as a sequence of calls. After an expansion that keeps
    more than one non-terminal child, a thread below ``max_depth`` draws a coin
    (probability ``p``); heads, it ends its call with a spawn block naming the children in
    heuristic order, runs one child thread per child (beam ``sub_beam``, first call starting
    with its prompt from ``child_prompts``), and starts its next call with ``join()`` of
    that call and the children's final calls. If a child reached the goal, the thread
    writes the goal line and restates the path from its own start; otherwise it goes on
    with the rest of its beam (the children are not queued).
    A child thread's ``prompt`` already holds its first ``Current State`` line.
    """
    target = s.target
    calls: list[str] = []
    sub_calls: list[list] = []
    if prompt is None:
        out = [f"Moving to Node #{start.idx}\n"]
    else:
        expected = f"Moving to Node #{start.idx}\n{start.state_line(target)}"
        if prompt != expected:
            raise RuntimeError(f"internal error: child_prompts gave {prompt!r}, expected {expected!r}")
        out = [prompt]
    open_set = [(start.h, start)]
    while open_set:
        current = _pop_beam(open_set, beam_size)
        for k, (_, node) in enumerate(current):
            if prompt is None or node is not start:
                out.append(node.state_line(target))
            goal, generated = _expand(s, node, beam_size, out)
            if goal is not None:
                out.extend(_restated_path(goal, start, target))
                calls.append("".join(out))
                return sj.CallTree(main_calls=calls, sub_calls=sub_calls), goal
            generated.sort(key=_BY_H)
            spawn = level < max_depth and len(generated) > 1 and s.rng.random() < s.p
            if not spawn:
                for new in generated:
                    heapq.heappush(open_set, (new.h, new))
            else:
                sub = level + 1
                out.append("<Calling Sub Searches>\n")
                for i, new in enumerate(generated):
                    out.append(f"<Start Sub Search {i} at level {sub}> Moving to Node #{new.idx}\n")
                out.append("<End Calling Sub Searches>\n")
                parent_text = "".join(out)
                calls.append(parent_text)
                prompts = sj.child_prompts(parent_text)
                kids = [
                    _apr_search(s, new, sub_beam, sub_beam, sub, max_depth, sj, prompt=p)
                    for new, p in zip(generated, prompts)
                ]
                sub_calls.append([tree for tree, _ in kids])
                out = [sj.join(parent_text, [tree.main_calls[-1] for tree, _ in kids])]
                for _, kid_goal in kids:
                    if kid_goal is not None:
                        out.append(kid_goal.move.end)
                        out.extend(_restated_path(kid_goal, start, target))
                        calls.append("".join(out))
                        return sj.CallTree(main_calls=calls, sub_calls=sub_calls), kid_goal
                # The original reuses its loop variable here, so the "next node of the beam"
                # line is chosen as if this were node number len(children) - 1.
                k = len(generated) - 1
            if k < len(current) - 1:
                out.append(f"Moving to Node #{current[k + 1][1].idx}\n")
        if open_set:
            out.append(f"Moving to Node #{open_set[0][1].idx}\n")
    out.append("No solution found.\n")
    calls.append("".join(out))
    return sj.CallTree(main_calls=calls, sub_calls=sub_calls), None


def _count_children(tree) -> int:
    return sum(len(group) + sum(_count_children(t) for t in group) for group in tree.sub_calls)


def apr(
    nums: Sequence[int],
    target: int,
    *,
    beam_size: int,
    sub_call_beam_size: int | None = None,
    seed=0,
    max_depth: int = 1,
    spawn_prob: float = 0.9,
    heuristic: str = "mult",
    sub_call_budget=False,
    shuffle: bool = True,
):
    """An APR call tree (``CallTree``) for (nums, target); see ``_apr_search``.

    The root thread searches with ``beam_size``, children with ``sub_call_beam_size``
    (default: ``beam_size``). ``max_depth=1`` spawns from the root thread only, as the
    original; ``max_depth=d`` lets threads at levels below d spawn too (their blocks say
    ``at level 2``, ``3``, ...). Each child's first call starts with its prompt from
    ``spawn_join.child_prompts`` and each continuation call with ``spawn_join.join``.
    ``sub_call_budget``: False (default) no prefix; True prefixes the root's calls with
    ``Sub Call Budget: N `` where N is the number of child calls in the tree; an int N uses N.
    Defaults match the original generator (``promising_threshold`` 0.9, ``mult_heuristic``).
    ``shuffle=False``: every expansion writes its kept children best first (heuristic order),
    not in the original's random order. The kept set and the search are the same; only the
    order of the ``Exploring Operation`` lines (and so the node numbers) changes. A policy
    imitating random orders must remember which of the kept moves it has written; small ones
    repeat them (BUILD_NOTES, "Best-first expansions").
    """
    from jaxapr.traces import spawn_join as sj

    if sub_call_beam_size is None:
        sub_call_beam_size = beam_size
    _check_problem(nums, target, beam_size)
    _check_problem(nums, target, sub_call_beam_size)
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth={max_depth!r}: expected an int >= 0")
    h = _heuristic_fn(heuristic)
    root = _root(nums, h, target)
    s = _Search(target, h, _rng(seed), spawn_prob, root, shuffle)
    with _gc_paused():
        tree, _ = _apr_search(s, root, beam_size, sub_call_beam_size, 0, max_depth, sj)
    if sub_call_budget is not False and sub_call_budget is not None:
        n = _count_children(tree) if sub_call_budget is True else sub_call_budget
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"sub_call_budget={sub_call_budget!r}: expected True, False or an int >= 0")
        tree.main_calls = [sj.budget_prefix(n) + c for c in tree.main_calls]
    return tree
