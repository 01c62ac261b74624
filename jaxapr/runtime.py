"""The APR runtime: spawn/join rollouts with threads as rows of one slot engine.

One module (over 500 lines) because the scheduler, its time accounting and the per-problem
results share one thread/call model; split, each part would import the others' internals.

``rollout(policy, problems, mode=...)`` runs every problem's threads through one engine
(``jaxapr.engine.Engine`` or anything with its small interface: ``num_slots``, ``max_len``,
``free_slots``, ``insert``, ``decode``, ``finished``, ``read``, ``release``; optionally ``wait``,
and ``extend`` for ``join="keep_slot"``):

- A **call** is one decoding of a thread: a prompt (BOS + text) inserted into a free slot and
  decoded until EOS or its limit. Calls wait in a FIFO queue when no slot is free.
- ``apr``: a problem starts with its root call (``traces.root_prompt``). When a call's output
  ends with a spawn block, its children's prompts (``traces.child_prompts``) are queued as new
  threads; when all of them have finished, the parent's next call is queued with
  ``traces.join(parent_text, children's final texts)`` as its prompt. Children may spawn again
  while their level is below ``max_depth``; a spawn by a thread at ``max_depth``, a malformed
  spawn block, or a join context that no longer fits the context window ends the thread there.
  At most ``max_children`` children of one spawn run; the rest are joined as "no solution".
- ``sosp``: one serial call per problem.
- ``pass@n``, ``cons@n``, ``best-of-n``: n sampled serial calls per problem. pass@n solves if any
  sample verifies; cons@n takes a majority vote over the answers (the restated path's
  operations) of the samples that claim success, as the APR paper does, and verifies the
  winner; best-of-n verifies the claiming sample with the highest mean log-probability.

**Joins: ``join="reprefill"`` (the default) or ``join="keep_slot"``.** With reprefill a
waiting parent gives up its slot, and its join context is queued as a new call and prefilled
whole. With keep_slot the parent keeps its slot and KV cache while its children run; at the
join, ``engine.extend`` prefills only the join prompt's tokens after the longest common prefix
with what the slot ran (``reusable_prefix``: the join text is the parent's text up to its
spawn block, then the children's results, so about everything before the spawn block is
kept), and decoding continues in the same slot. **Eviction rule**, which is also the deadlock
guard (every slot held by a waiting parent while children queue): before each insert, if more
calls are queued than slots are free, the most recently suspended waiting parents give up their
slots, as many as are missing (their joins are re-prefilled later). A held slot thus never
keeps a queued call out: decode steps and latencies equal reprefill's, and the results are
the same (at temperature 0 the same tokens; log-probs equal up to float rounding). Evicting
only at a deadlock would leave held slots idle while children queue. Reprefill is the
default: keep_slot saves prefill tokens only while the pool has spare slots (under load every
parent is evicted), and re-prefilling the joins is a small share of device time on Countdown
(BUILD_NOTES.md, runtime suite), so wall time barely moves; reprefill also needs no
``extend`` from the engine. keep_slot is for setups where prefill weighs more (long join
contexts, spare slots).

Metrics per problem (``jaxapr.evaluation`` defines the reported ones from these): generated
tokens (``total_tokens``), prompt tokens (``prompt_tokens``: every call's whole prompt, join
contexts included, however much of it was prefilled; the batch's ``schedule`` counts the tokens
actually prefilled, extends, reused prefix tokens, evictions and the pool's decode steps),
``sequential_tokens`` (the longest causal chain: a thread's own generated tokens plus, per
spawn, its longest child's, recursively), ``latency_steps`` (the decode steps of that critical
path, children in parallel: independent of the slot count and of queueing), children, spawns,
and the batch's wall time.
Every call keeps its prompt tokens, output tokens and per-token log-probabilities (GRPO
trains on them). Randomness: a call's key is derived from (key, problem index, its thread's
path, call index), so results do not depend on the number of slots or the schedule, and with
``problem_ids`` (global indices) not on how a batch is split over processes either.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

import jax
import numpy as np

from jaxapr import traces
from jaxapr.tokenizer import CountdownTokenizer

_TOK = CountdownTokenizer()
_MODE_RE = re.compile(r"^(apr|sosp|pass@(\d+)|cons@(\d+)|best-of-(\d+))$")


@dataclasses.dataclass
class Call:
    """One decoding of a thread."""

    prompt: str
    prompt_tokens: np.ndarray  # int32: BOS + prompt
    output_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    logprobs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    output: str = ""  # decoded output (EOS not included)
    stopped: str = ""  # "eos", "length" (its token limit or the context end), "" if never run

    @property
    def text(self) -> str:
        """The call's full text, as in the fixtures' ``main_calls``."""
        return self.prompt + self.output


@dataclasses.dataclass
class Thread:
    id: int
    problem: int
    path: tuple  # (spawn index, child index) pairs from the root
    level: int  # 0 = root; children of a level-L spawn block are at level L
    parent: int | None
    calls: list = dataclasses.field(default_factory=list)
    spawns: list = dataclasses.field(default_factory=list)  # per spawn: child thread ids (None = not run)
    waiting: int = 0
    done: bool = False


@dataclasses.dataclass
class RolloutResult:
    nums: list
    target: int
    success: bool
    reason: str
    text: str  # the root's final call text
    tree: dict  # {"main_calls": [...], "sub_calls": [[tree, ...], ...]} as in the fixtures
    calls: list  # every Call of the problem, parents before children
    total_tokens: int
    prompt_tokens: int
    sequential_tokens: int
    num_children: int
    num_spawns: int
    latency_steps: int
    wall_s: float
    samples: list = dataclasses.field(default_factory=list)  # pass@n / cons@n / best-of-n: per sample
    schedule: dict = dataclasses.field(default_factory=dict)  # the whole batch: steps, prefill tokens, times

    @property
    def num_calls(self) -> int:
        return len(self.calls)


def reusable_prefix(held: np.ndarray, prompt: np.ndarray) -> int:
    """How many leading tokens of ``prompt`` a slot that ran ``held`` (its call's prompt and
    generated tokens) keeps in its cache for a ``join="keep_slot"`` extend: their longest
    common prefix, at most the cached tokens (all but the last generated one, whose key/value
    is never written) and at most ``len(prompt) - 1`` (the last prompt token must run to
    give the next token's logits)."""
    m = min(len(held), len(prompt))
    diff = np.flatnonzero(np.asarray(held[:m]) != np.asarray(prompt[:m]))
    common = int(diff[0]) if diff.size else m
    return max(0, min(common, len(held) - 1, len(prompt) - 1))


def parse_mode(mode: str) -> tuple[str, int]:
    """("apr" | "sosp" | "pass" | "cons" | "best", n)."""
    m = _MODE_RE.match(mode) if isinstance(mode, str) else None
    if m is None:
        raise ValueError(f"mode={mode!r}: expected 'apr', 'sosp', 'pass@n', 'cons@n' or 'best-of-n'")
    if mode in ("apr", "sosp"):
        return mode, 1
    n = int(next(g for g in m.groups()[1:] if g))
    if n < 1:
        raise ValueError(f"mode={mode!r}: n must be >= 1")
    return mode.split("@")[0].split("-")[0], n


class _Scheduler:
    """Runs threads of many problems through one engine (see the module docstring)."""

    def __init__(
        self,
        engine,
        *,
        mode,
        temperature,
        key,
        max_context,
        decode_chunk,
        max_depth,
        max_children,
        max_total_tokens,
        top_k,
        top_p,
        join="reprefill",
        key_ids=None,
    ):
        self.engine, self.mode, self.temperature, self.key = engine, mode, temperature, key
        self.key_ids = key_ids  # problem -> the index its keys are drawn from (default: itself)
        self.join = join
        self.max_context = min(max_context or engine.max_len, engine.max_len)
        self.decode_chunk, self.max_depth, self.max_children = decode_chunk, max_depth, max_children
        self.max_total_tokens, self.top_k, self.top_p = max_total_tokens, top_k, top_p
        self.threads: list[Thread] = []
        self.queue: collections.deque = collections.deque()
        self.in_slot: dict[int, tuple[int, Call]] = {}
        self.step = 0
        self.generated = collections.Counter()  # per problem
        self.prefill_tokens = 0
        self.prefill_s = 0.0  # time blocked waiting for prefills (see ``run``)
        self.decode_s = 0.0  # time blocked waiting for decode chunks
        self.chunks: list = []  # per decode call: (first step, steps run, saturated, slots held by waiting parents)
        self.spans: list = []  # per finished call: (start step, decode steps it ran = tokens - 1)
        # join="keep_slot": slot -> id of the waiting parent that holds it, in suspension order
        self.held: dict[int, int] = {}
        self.extends: list = []  # (thread id, call, slot, start position): joins ready to extend their slot
        self.extend_calls = 0
        self.reused_tokens = 0  # prompt tokens of extended calls that were not prefilled again
        self.evictions = 0
        self.to_release: set = set()  # slots to free once the finished calls are processed
        self.reads_before = dict(getattr(engine, "decode_reads", {}))  # the engine's counts before this batch

    # -- threads -------------------------------------------------------------------------
    def start(self, problem: int, prompt: str, path=()) -> None:
        thread = Thread(len(self.threads), problem, path, 0, None)
        self.threads.append(thread)
        self._queue_call(thread, prompt)

    def _queue_call(self, thread: Thread, prompt: str) -> None:
        tokens = np.concatenate([[_TOK.bos_id], _TOK.encode(prompt)]).astype(np.int32)
        call = Call(prompt, tokens)
        thread.calls.append(call)
        slot = next((s for s, t in self.held.items() if t == thread.id), None)
        if slot is not None:
            del self.held[slot]
        if len(tokens) >= self.max_context or self._budget_left(thread.problem) <= 0:
            if slot is not None:
                self.to_release.add(slot)
            self._finish_thread(thread)  # cannot run: the context or the token budget is full
            return
        if slot is None:
            self.queue.append((thread.id, call))
            return
        prev = thread.calls[-2]
        start = reusable_prefix(np.concatenate([prev.prompt_tokens, prev.output_tokens]), tokens)
        self.extends.append((thread.id, call, slot, start))

    def _budget_left(self, problem: int) -> int:
        if self.max_total_tokens is None:
            return 1 << 30
        return self.max_total_tokens - self.generated[problem]

    def _call_key(self, thread: Thread) -> Any:
        key = jax.random.fold_in(self.key, thread.problem if self.key_ids is None else self.key_ids[thread.problem])
        for spawn, child in thread.path:
            key = jax.random.fold_in(jax.random.fold_in(key, 1 + spawn), child)
        return jax.random.fold_in(key, 1_000_003 + len(thread.calls))

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """The loop. Time accounting (``schedule``): dispatch is asynchronous, so the host
        blocks on the device only in ``wait`` after an insert (the prefill) and in ``int()``
        of a decode's step count (the chunk); ``prefill_s`` and ``decode_s`` sum exactly those
        blocked times, everything else (building prompts, dispatching, reading outputs,
        spawn/join text work) is host time. Blocked time is device time the host could not
        hide, so ``1 - device_s / wall_s`` bounds from above the share of time the device is
        idle waiting for the host."""
        eng = self.engine
        wait = getattr(eng, "wait", None) or (lambda: None)
        while self.queue or self.in_slot or self.extends:
            if self.extends:
                self._extend(wait)
            free = eng.free_slots()
            short = len(self.queue) - len(free)  # queued calls that would find no slot
            if short > 0 and self.held:
                self._evict(min(short, len(self.held)))
                free = eng.free_slots()
            if self.queue and free:
                batch = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
                prompts = [call.prompt_tokens for _, call in batch]
                limits = [
                    max(1, min(self.max_context - len(call.prompt_tokens), self._budget_left(self.threads[t].problem)))
                    for t, call in batch
                ]
                keys = [self._call_key(self.threads[t]) for t, _ in batch] if self.temperature > 0 else None
                slots = eng.insert(
                    prompts,
                    free[: len(batch)],
                    max_new_tokens=limits,
                    stop_ids=(_TOK.eos_id,),
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    key=None if keys is None else jax.numpy.stack(keys),
                )
                t0 = time.perf_counter()
                wait()
                self.prefill_s += time.perf_counter() - t0
                self.prefill_tokens += sum(len(p) for p in prompts)
                for slot, (tid, call) in zip(slots, batch):
                    self.in_slot[slot] = (tid, call, self.step)
            saturated = bool(self.queue)  # calls wait while every slot is busy
            pending = eng.decode(self.decode_chunk)
            t0 = time.perf_counter()
            steps = int(pending)
            self.decode_s += time.perf_counter() - t0
            self.chunks.append((self.step, steps, saturated, len(self.held)))
            self.step += steps
            finished = [s for s in eng.finished() if s in self.in_slot]  # held slots are finished too
            if not finished and steps == 0 and self.in_slot:
                raise RuntimeError("engine made no progress: no slot finished and no step ran")
            if not finished:
                continue
            outputs = eng.read(finished)
            for slot, out in zip(finished, outputs):
                tid, call, start = self.in_slot.pop(slot)
                self.spans.append((start, max(0, len(out.tokens) - 1)))
                self._complete(self.threads[tid], call, out, slot)
            kept = set(self.held) | {slot for _, _, slot, _ in self.extends}  # keep_slot parents
            eng.release(sorted((set(finished) - kept) | self.to_release))
            self.to_release.clear()
        if self.held:  # cannot happen: a held parent's join always follows its children
            raise RuntimeError(f"slots {sorted(self.held)} still held by waiting parents at the end")

    def _extend(self, wait) -> None:
        """Run the joins of parents that kept their slots: one ``extend`` for all of them."""
        batch, self.extends = self.extends, []
        calls = [(self.threads[t], call) for t, call, _, _ in batch]
        slots = [slot for _, _, slot, _ in batch]
        starts = [start for *_, start in batch]
        suffixes = [call.prompt_tokens[start:] for (_, call), start in zip(calls, starts)]
        limits = [
            max(1, min(self.max_context - len(call.prompt_tokens), self._budget_left(th.problem))) for th, call in calls
        ]
        keys = [self._call_key(th) for th, _ in calls] if self.temperature > 0 else None
        self.engine.extend(
            slots,
            suffixes,
            starts,
            max_new_tokens=limits,
            stop_ids=(_TOK.eos_id,),
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            key=None if keys is None else jax.numpy.stack(keys),
        )
        t0 = time.perf_counter()
        wait()
        self.prefill_s += time.perf_counter() - t0
        self.prefill_tokens += sum(len(x) for x in suffixes)
        self.reused_tokens += sum(starts)
        self.extend_calls += len(batch)
        for slot, (tid, call, _, _) in zip(slots, batch):
            self.in_slot[slot] = (tid, call, self.step)

    def _evict(self, count: int) -> None:
        """keep_slot's eviction rule (it is also the deadlock guard): more calls are queued than
        slots are free, so the ``count`` most recently suspended waiting parents give up their
        slots (their joins will be re-prefilled). A held slot never keeps a queued call out."""
        victims = list(self.held)[-count:]
        for slot in victims:
            del self.held[slot]
        self.engine.release(victims)
        self.evictions += len(victims)

    def stats(self, wall_s: float) -> dict:
        """The batch's schedule: steps, slot utilization, prefill tokens, blocked times.

        ``useful_slot_steps``: decode steps that produced a token, summed over calls: a call
        with n generated tokens ran n - 1 decode steps (its first token comes from its
        prefill). Utilization = useful / (num_slots x steps); ``*_saturated`` counts only the
        chunks that started with calls waiting in the queue (demand exceeding the slots).
        ``attention_window_entries`` / ``attention_prefix_entries`` (engines that count them):
        cache entries decode attention read over the call windows of every row, and the entries
        the prefixes of the slots still running hold; their ratio is what per-slot windows would
        save."""
        sat = np.zeros(self.step + 1, bool)
        for first, steps, saturated, _ in self.chunks:
            sat[first : first + steps] = saturated
        cum = np.concatenate([[0], np.cumsum(sat)])
        spans = np.asarray(self.spans, np.int64).reshape(-1, 2)
        start, length = spans[:, 0], spans[:, 1]
        useful_sat = int((cum[np.minimum(start + length, self.step)] - cum[np.minimum(start, self.step)]).sum())
        return {
            "num_slots": self.engine.num_slots,
            "steps": self.step,
            "saturated_steps": int(sat.sum()),
            "useful_slot_steps": int(length.sum()),
            "useful_slot_steps_saturated": useful_sat,
            "decode_calls": len(self.chunks),
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": int(sum(self.generated.values())),
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "device_s": self.prefill_s + self.decode_s,
            "wall_s": wall_s,
            "join": self.join,
            "extend_calls": self.extend_calls,
            "reused_prefix_tokens": self.reused_tokens,
            "evictions": self.evictions,
            "held_slot_steps": int(sum(s * h for _, s, _, h in self.chunks)),
            # decode attention's cache reads and the running slots' prefixes (Engine.decode_reads)
            **{
                f"attention_{k}_entries": int(v - self.reads_before.get(k, 0))
                for k, v in getattr(self.engine, "decode_reads", {}).items()
            },
        }

    def _complete(self, thread: Thread, call: Call, out, slot: int) -> None:
        tokens = np.asarray(out.tokens, np.int32)
        call.stopped = "eos" if len(tokens) and tokens[-1] == _TOK.eos_id else "length"
        call.output_tokens, call.logprobs = tokens, np.asarray(out.logprobs, np.float32)
        call.output = _TOK.decode(tokens)
        self.generated[thread.problem] += len(tokens)
        if self.mode == "apr" and call.stopped == "eos" and thread.level < self.max_depth:
            try:
                prompts = traces.child_prompts(call.text)
            except ValueError:
                prompts = None  # no or malformed spawn block: the thread ends here
            if prompts:
                if self.join == "keep_slot":
                    self.held[slot] = thread.id  # before its children run: one may finish at once
                self._spawn(thread, prompts)
                return
        self._finish_thread(thread)

    def _spawn(self, thread: Thread, prompts: list[str]) -> None:
        spawn_index = len(thread.spawns)
        children = []
        for c, _prompt in enumerate(prompts):
            if c >= self.max_children:
                children.append(None)
                continue
            child = Thread(
                len(self.threads), thread.problem, thread.path + ((spawn_index, c),), thread.level + 1, thread.id
            )
            self.threads.append(child)
            children.append(child.id)
        thread.spawns.append(children)
        thread.waiting = sum(c is not None for c in children)
        for cid in children:
            if cid is not None:
                self._queue_call(self.threads[cid], prompts[children.index(cid)])

    def _finish_thread(self, thread: Thread) -> None:
        thread.done = True
        if thread.parent is None:
            return
        parent = self.threads[thread.parent]
        parent.waiting -= 1
        if parent.waiting == 0:
            texts = [None if c is None else self.threads[c].calls[-1].text for c in parent.spawns[-1]]
            self._queue_call(parent, traces.join(parent.calls[-1].text, texts))

    # -- results -------------------------------------------------------------------------
    def tree(self, thread: Thread) -> dict:
        return {
            "main_calls": [c.text for c in thread.calls],
            "sub_calls": [[self.tree(self.threads[c]) for c in spawn if c is not None] for spawn in thread.spawns],
        }

    def all_calls(self, thread: Thread) -> list:
        out = []
        for k, call in enumerate(thread.calls):
            out.append(call)
            if k < len(thread.spawns):
                for c in thread.spawns[k]:
                    if c is not None:
                        out.extend(self.all_calls(self.threads[c]))
        return out

    def critical_path(self, thread: Thread) -> tuple[int, int]:
        """(sequential tokens, latency steps) of ``thread`` with children in parallel: its own
        calls in order and, per spawn, its longest child (by tokens), recursively. A call of n
        generated tokens runs n - 1 decode steps (its first token comes with its prefill).
        Both depend only on the tree of calls, never on the slot count or the queue."""
        tokens = sum(len(c.output_tokens) for c in thread.calls)
        steps = sum(max(len(c.output_tokens) - 1, 0) for c in thread.calls)
        for spawn in thread.spawns:
            kids = [self.critical_path(self.threads[c]) for c in spawn if c is not None]
            if kids:
                tokens += max(t for t, _ in kids)
                steps += max(s for _, s in kids)
        return tokens, steps

    def counts(self, thread: Thread) -> tuple[int, int]:
        children = spawns = 0
        for spawn in thread.spawns:
            spawns += 1
            for c in spawn:
                if c is not None:
                    children += 1
                    cc, cs = self.counts(self.threads[c])
                    children, spawns = children + cc, spawns + cs
        return children, spawns


def rollout(
    policy,
    problems,
    mode: str = "apr",
    *,
    max_context: int | None = None,
    temperature: float = 0.0,
    key=None,
    num_slots: int = 64,
    engine=None,
    decode_chunk: int = 16,
    max_depth: int = 1,
    max_children: int = 16,
    max_total_tokens: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    prefix: str = "",
    join: str = "reprefill",
    problem_ids=None,
) -> list[RolloutResult]:
    """Runs ``problems`` = (numbers int[P, N], targets int[P]) and returns one result each.

    ``policy``: a ``model.Transformer`` (an ``engine.Engine`` with ``num_slots`` slots is made
    for it) or None when ``engine`` is given (anything with the engine interface).
    ``max_context``: the per-call context window (default: the engine's). ``prefix``: a
    conditioning prefix on root prompts (``"Sub Call Budget: 4 "``, ``"Token Budget: 1024 "``).
    ``join``: ``"reprefill"`` (a waiting parent gives up its slot; its join context is
    prefilled whole into a free slot) or ``"keep_slot"`` (it keeps its slot and KV cache and
    the join extends them; needs an engine with ``extend``); see the module docstring. The
    results are the same either way; the schedule differs. ``problem_ids``: each problem's index
    in a larger batch that is rolled out in parts (one per process), default ``0..P-1``; keys
    are drawn from these indices, so the parts sample what the whole batch would.
    """
    kind, n = parse_mode(mode)
    numbers, targets = np.asarray(problems[0]), np.asarray(problems[1])
    if numbers.ndim != 2 or targets.shape != (numbers.shape[0],):
        raise ValueError(
            f"problems shapes {numbers.shape}, {targets.shape}: expected (numbers int[P, N], targets int[P])"
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0")
    if temperature > 0 and key is None:
        raise ValueError("temperature > 0 needs key=jax.random.key(seed)")
    if kind in ("pass", "cons", "best") and n > 1 and temperature == 0:
        raise ValueError(f"mode={mode!r} draws {n} samples: expected temperature > 0")
    if join not in ("reprefill", "keep_slot"):
        raise ValueError(f"join={join!r}: expected 'reprefill' or 'keep_slot'")
    if join == "keep_slot" and engine is not None and not callable(getattr(engine, "extend", None)):
        raise ValueError(f"join='keep_slot' needs an engine with an extend() method; {type(engine).__name__} has none")
    if problem_ids is not None:
        problem_ids = np.asarray(problem_ids)
        if (
            problem_ids.shape != targets.shape
            or not np.issubdtype(problem_ids.dtype, np.integer)
            or (len(problem_ids) and problem_ids.min() < 0)
        ):
            raise ValueError(
                f"problem_ids of shape {problem_ids.shape}: expected {len(targets)} non-negative ints, one per problem"
            )
    for name, value in (("decode_chunk", decode_chunk), ("max_depth", max_depth), ("max_children", max_children)):
        if not isinstance(value, int) or value < (0 if name == "max_depth" else 1):
            raise ValueError(f"{name}={value!r}: expected a positive int")
    if engine is None:
        if policy is None:
            raise ValueError("rollout needs a policy or an engine")
        from jaxapr import engine as engine_lib

        engine = engine_lib.Engine(policy, num_slots=num_slots, max_len=max_context)
    key = jax.random.key(0) if key is None else key
    t0 = time.perf_counter()
    sched = _Scheduler(
        engine,
        mode="apr" if kind == "apr" else "sosp",
        temperature=temperature,
        key=key,
        max_context=max_context,
        decode_chunk=decode_chunk,
        max_depth=max_depth if kind == "apr" else 0,
        max_children=max_children,
        max_total_tokens=max_total_tokens,
        top_k=top_k,
        top_p=top_p,
        join=join,
        key_ids=None if problem_ids is None else [int(i) * n + s for i in problem_ids for s in range(n)],
    )
    prompt_mode = "apr" if kind == "apr" else "sosp"
    starts = []
    for p, (nums, target) in enumerate(zip(numbers.tolist(), targets.tolist())):
        for s in range(n):
            starts.append(len(sched.threads))
            sched.start(p * n + s, traces.root_prompt(nums, target, prompt_mode, prefix))
    sched.run()
    wall = time.perf_counter() - t0
    results = []
    for p, (nums, target) in enumerate(zip(numbers.tolist(), targets.tolist())):
        samples = [_result(sched, sched.threads[starts[p * n + s]], nums, target, wall) for s in range(n)]
        results.append(samples[0] if kind in ("apr", "sosp") else _aggregate(kind, samples))
    sched_stats = sched.stats(wall)
    for r in results:
        r.schedule = sched_stats
    return results


def _result(sched: _Scheduler, root: Thread, nums, target, wall) -> RolloutResult:
    text = root.calls[-1].text
    verdict = traces.verify(text, nums, target)
    calls = sched.all_calls(root)
    children, spawns = sched.counts(root)
    sequential, latency = sched.critical_path(root)
    return RolloutResult(
        nums=list(nums),
        target=int(target),
        success=verdict.success,
        reason=verdict.reason,
        text=text,
        tree=sched.tree(root),
        calls=calls,
        total_tokens=sum(len(c.output_tokens) for c in calls),
        prompt_tokens=sum(len(c.prompt_tokens) for c in calls),
        sequential_tokens=sequential,
        num_children=children,
        num_spawns=spawns,
        latency_steps=latency,
        wall_s=wall,
    )


_CHILD_STATE_RE = re.compile(r"Current State: ([0-9]+):\[([0-9, ]*)\]")
JOIN_FIELDS = (
    "distinct_children",
    "solved_children",
    "child_solved",
    "join_overflow",
    "lost_at_join",
    "join_prompt_tokens",
    "join_output_tokens",
    "root_spawns",
)


def join_diagnostics(result: RolloutResult) -> dict:
    """Where an APR rollout's root thread won or lost its problem (all 0 without children):

    - ``distinct_children``: the root's child threads with distinct states (their prompts'
      ``Current State`` lines; a root that generates the same node twice spawns the same
      search twice);
    - ``solved_children``: root children whose result (``traces.child_result``) replays to
      their own target from their own state (``traces.verify(text, state, target)``);
    - ``child_solved``: 1 if any root child solved its sub-problem;
    - ``join_overflow``: 1 if a root call after a join ended without EOS: the per-call
      context (its prompt is the join context, which grows with every child's result) or the
      token budget ran out, or it never ran;
    - ``lost_at_join``: 1 if a child solved its sub-problem and the rollout still failed;
    - ``join_prompt_tokens`` / ``join_output_tokens``: the root's last call after a join (0 if
      it never joined or that call never ran): its prompt's tokens (BOS, the parent's text and
      the joined results) and the tokens it generated. They tell an overflow apart: a join
      context near the window is cut by its size, a short one followed by a long output is
      a parent that searched on instead of restating a child's path;
    - ``root_spawns``: the root's ``spawn()`` calls; more than one is a root that spawned
      another round of children after a join.
    """
    tree, calls = result.tree, list(result.calls)
    subs = tree.get("sub_calls", [])
    distinct, solved = set(), 0
    for child in (c for block in subs for c in block):
        first, final = child["main_calls"][0], child["main_calls"][-1]
        state_line = (first.split("\n") + [""])[1]  # the prompt's "Current State: T:[...], Operations: [...]"
        distinct.add(state_line)
        m = _CHILD_STATE_RE.match(state_line)
        if m and m.group(2):
            state = [int(x) for x in m.group(2).split(", ")]
            solved += traces.verify(final, state, int(m.group(1))).success
    overflow, at = 0, 0  # root call k sits at ``at`` in ``calls`` (parents before their children)
    join_prompt = join_output = 0
    for k in range(len(tree["main_calls"])):
        if k:  # a call after a join
            call = calls[at] if at < len(calls) else None
            if call is None or call.stopped != "eos":
                overflow = 1
            ran = call is not None and call.stopped != ""
            join_prompt, join_output = (len(call.prompt_tokens), len(call.output_tokens)) if ran else (0, 0)
        at += 1 + (sum(_num_calls(c) for c in subs[k]) if k < len(subs) else 0)
    return {
        "distinct_children": len(distinct),
        "solved_children": solved,
        "child_solved": int(solved > 0),
        "join_overflow": overflow,
        "lost_at_join": int(solved > 0 and not result.success),
        "join_prompt_tokens": join_prompt,
        "join_output_tokens": join_output,
        "root_spawns": len(subs),
    }


def _num_calls(tree: dict) -> int:
    return len(tree["main_calls"]) + sum(_num_calls(c) for block in tree.get("sub_calls", []) for c in block)


def claimed_answer(text: str) -> tuple | None:
    """The operations of a trace's restated path if it claims success (its last line, ignoring
    blank and ``Exit`` lines, is a goal line), else None: what cons@n votes on."""
    lines = [l for l in text.split("\n") if l and not l.startswith("Exit Sub Search")]
    if not lines or not lines[-1].endswith("equal: Goal Reached") or lines[-1].find("unequal") >= 0:
        return None
    spans = traces.goal_line_spans(text)
    path = text[text.find("\n", spans[0]) + 1 :] if spans else text
    return tuple(l.split(",")[0].split(": ", 1)[1] for l in path.split("\n") if l.startswith("Exploring Operation: "))


def first_samples(result: RolloutResult, mode: str) -> RolloutResult:
    """The verdict ``mode`` (``pass@k``, ``cons@k`` or ``best-of-k``) gives on the first k samples
    of ``result`` (a ``pass@n`` / ``cons@n`` / ``best-of-n`` result with n >= k): one sampled
    rollout answers every k <= n, so curves over k share their samples (pass@k never falls
    as k grows) and cost one rollout of n instead of one per k."""
    kind, k = parse_mode(mode)
    if kind not in ("pass", "cons", "best"):
        raise ValueError(f"mode={mode!r}: expected 'pass@k', 'cons@k' or 'best-of-k'")
    if k > len(result.samples):
        raise ValueError(
            f"mode={mode!r} needs {k} samples; the result has {len(result.samples)}: roll out with n >= {k}"
        )
    return _aggregate(kind, result.samples[:k])


def _aggregate(kind: str, samples: list) -> RolloutResult:
    claims = [(s, claimed_answer(s.text)) for s in samples]
    claims = [(s, a) for s, a in claims if a is not None]
    if kind == "pass":
        chosen = next((s for s in samples if s.success), samples[0])
    elif kind == "cons":
        votes = collections.Counter(a for _, a in claims)
        chosen = next((s for s, a in claims if a == votes.most_common(1)[0][0]), samples[0]) if claims else samples[0]
    else:

        def mean_logprob(s):
            lp = np.concatenate([c.logprobs for c in s.calls]) if s.calls else np.zeros(1)
            return float(lp.mean()) if lp.size else -np.inf

        chosen = max((s for s, _ in claims), key=mean_logprob, default=samples[0])
    return dataclasses.replace(
        chosen,
        total_tokens=sum(s.total_tokens for s in samples),
        prompt_tokens=sum(s.prompt_tokens for s in samples),
        sequential_tokens=max(s.sequential_tokens for s in samples),
        latency_steps=max(s.latency_steps for s in samples),
        samples=samples,
    )
