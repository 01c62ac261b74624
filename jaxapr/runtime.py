"""The APR runtime: spawn/join rollouts with threads as rows of one slot engine.

``rollout(policy, problems, mode=...)`` runs every problem's threads through one engine
(``jaxapr.engine.Engine`` or anything with its small interface: ``num_slots``, ``max_len``,
``free_slots``, ``insert``, ``decode``, ``finished``, ``read``, ``release``; optionally ``wait``):

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

**A waiting parent gives up its slot** and is re-prefilled with its join context. Keeping the
slot (and its cache) would save re-reading the prefix, but a parent holding a slot while its
children wait in the queue can deadlock the pool (every slot held by a waiting parent), and
caps the parallelism children get; the join context also rewrites the parent's tail (its
spawn block is replaced). Prefill is parallel over the prompt, so the re-read costs little
next to decoding (``bench --suite=runtime`` reports the prefill share).

Metrics per problem: generated tokens (``total_tokens``), prompt tokens (all prefills),
``sequential_tokens`` (the longest causal chain: a thread's own generated tokens plus, per
spawn, its longest child's sequential tokens, recursively), children, spawns, latency in
engine decode steps from the problem's first insert to its last call's end, and wall time.
Every call keeps its prompt tokens, output tokens and per-token log-probabilities (GRPO
trains on them). Randomness: a call's key is derived from (key, problem, its thread's path,
call index), so results do not depend on the number of slots or the schedule.
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

    def __init__(self, engine, *, mode, temperature, key, max_context, decode_chunk, max_depth,
                 max_children, max_total_tokens, top_k, top_p):
        self.engine, self.mode, self.temperature, self.key = engine, mode, temperature, key
        self.max_context = min(max_context or engine.max_len, engine.max_len)
        self.decode_chunk, self.max_depth, self.max_children = decode_chunk, max_depth, max_children
        self.max_total_tokens, self.top_k, self.top_p = max_total_tokens, top_k, top_p
        self.threads: list[Thread] = []
        self.queue: collections.deque = collections.deque()
        self.in_slot: dict[int, tuple[int, Call]] = {}
        self.step = 0
        self.generated = collections.Counter()  # per problem
        self.first_step: dict[int, int] = {}
        self.last_step = collections.Counter()
        self.prefill_tokens = 0
        self.prefill_s = 0.0  # time blocked waiting for prefills (see ``run``)
        self.decode_s = 0.0   # time blocked waiting for decode chunks
        self.chunks: list = []  # per decode call: (first step, steps run, saturated)
        self.spans: list = []   # per finished call: (start step, decode steps it ran = tokens - 1)

    # -- threads -------------------------------------------------------------------------
    def start(self, problem: int, prompt: str, path=()) -> None:
        thread = Thread(len(self.threads), problem, path, 0, None)
        self.threads.append(thread)
        self._queue_call(thread, prompt)

    def _queue_call(self, thread: Thread, prompt: str) -> None:
        tokens = np.concatenate([[_TOK.bos_id], _TOK.encode(prompt)]).astype(np.int32)
        call = Call(prompt, tokens)
        thread.calls.append(call)
        if len(tokens) >= self.max_context or self._budget_left(thread.problem) <= 0:
            self._finish_thread(thread)  # cannot run: the context or the token budget is full
            return
        self.queue.append((thread.id, call))

    def _budget_left(self, problem: int) -> int:
        if self.max_total_tokens is None:
            return 1 << 30
        return self.max_total_tokens - self.generated[problem]

    def _call_key(self, thread: Thread) -> Any:
        key = jax.random.fold_in(self.key, thread.problem)
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
        while self.queue or self.in_slot:
            free = eng.free_slots()
            if self.queue and free:
                batch = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
                prompts = [call.prompt_tokens for _, call in batch]
                limits = [max(1, min(self.max_context - len(call.prompt_tokens),
                                     self._budget_left(self.threads[t].problem))) for t, call in batch]
                keys = [self._call_key(self.threads[t]) for t, _ in batch] if self.temperature > 0 else None
                slots = eng.insert(prompts, free[:len(batch)], max_new_tokens=limits, stop_ids=(_TOK.eos_id,),
                                   temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                   key=None if keys is None else jax.numpy.stack(keys))
                t0 = time.perf_counter()
                wait()
                self.prefill_s += time.perf_counter() - t0
                self.prefill_tokens += sum(len(p) for p in prompts)
                for slot, (tid, call) in zip(slots, batch):
                    self.in_slot[slot] = (tid, call, self.step)
                    self.first_step.setdefault(self.threads[tid].problem, self.step)
            saturated = bool(self.queue)  # calls wait while every slot is busy
            pending = eng.decode(self.decode_chunk)
            t0 = time.perf_counter()
            steps = int(pending)
            self.decode_s += time.perf_counter() - t0
            self.chunks.append((self.step, steps, saturated))
            self.step += steps
            finished = eng.finished()
            if not finished and steps == 0 and self.in_slot:
                raise RuntimeError("engine made no progress: no slot finished and no step ran")
            if not finished:
                continue
            outputs = eng.read(finished)
            eng.release(finished)
            for slot, out in zip(finished, outputs):
                tid, call, start = self.in_slot.pop(slot)
                self.spans.append((start, max(0, len(out.tokens) - 1)))
                self._complete(self.threads[tid], call, out)

    def stats(self, wall_s: float) -> dict:
        """The batch's schedule: steps, slot utilization, prefill tokens, blocked times.

        ``useful_slot_steps``: decode steps that produced a token, summed over calls: a call
        with n generated tokens ran n - 1 decode steps (its first token comes from its
        prefill). Utilization = useful / (num_slots x steps); ``*_saturated`` counts only the
        chunks that started with calls waiting in the queue (demand exceeding the slots)."""
        sat = np.zeros(self.step + 1, bool)
        for first, steps, saturated in self.chunks:
            sat[first:first + steps] = saturated
        cum = np.concatenate([[0], np.cumsum(sat)])
        spans = np.asarray(self.spans, np.int64).reshape(-1, 2)
        start, length = spans[:, 0], spans[:, 1]
        useful_sat = int((cum[np.minimum(start + length, self.step)] - cum[np.minimum(start, self.step)]).sum())
        return {"num_slots": self.engine.num_slots, "steps": self.step, "saturated_steps": int(sat.sum()),
                "useful_slot_steps": int(length.sum()), "useful_slot_steps_saturated": useful_sat,
                "decode_calls": len(self.chunks), "prefill_tokens": self.prefill_tokens,
                "generated_tokens": int(sum(self.generated.values())), "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "device_s": self.prefill_s + self.decode_s, "wall_s": wall_s}

    def _complete(self, thread: Thread, call: Call, out) -> None:
        tokens = np.asarray(out.tokens, np.int32)
        call.stopped = "eos" if len(tokens) and tokens[-1] == _TOK.eos_id else "length"
        call.output_tokens, call.logprobs = tokens, np.asarray(out.logprobs, np.float32)
        call.output = _TOK.decode(tokens)
        self.generated[thread.problem] += len(tokens)
        self.last_step[thread.problem] = self.step
        if self.mode == "apr" and call.stopped == "eos" and thread.level < self.max_depth:
            try:
                prompts = traces.child_prompts(call.text)
            except ValueError:
                prompts = None  # no or malformed spawn block: the thread ends here
            if prompts:
                self._spawn(thread, prompts)
                return
        self._finish_thread(thread)

    def _spawn(self, thread: Thread, prompts: list[str]) -> None:
        spawn_index = len(thread.spawns)
        children = []
        for c, prompt in enumerate(prompts):
            if c >= self.max_children:
                children.append(None)
                continue
            child = Thread(len(self.threads), thread.problem, thread.path + ((spawn_index, c),), thread.level + 1,
                           thread.id)
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
        return {"main_calls": [c.text for c in thread.calls],
                "sub_calls": [[self.tree(self.threads[c]) for c in spawn if c is not None] for spawn in thread.spawns]}

    def all_calls(self, thread: Thread) -> list:
        out = []
        for k, call in enumerate(thread.calls):
            out.append(call)
            if k < len(thread.spawns):
                for c in thread.spawns[k]:
                    if c is not None:
                        out.extend(self.all_calls(self.threads[c]))
        return out

    def sequential_tokens(self, thread: Thread) -> int:
        own = sum(len(c.output_tokens) for c in thread.calls)
        return own + sum(max([self.sequential_tokens(self.threads[c]) for c in spawn if c is not None], default=0)
                         for spawn in thread.spawns)

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
) -> list[RolloutResult]:
    """Runs ``problems`` = (numbers int[P, N], targets int[P]) and returns one result each.

    ``policy``: a ``model.Transformer`` (an ``engine.Engine`` with ``num_slots`` slots is made
    for it) or None when ``engine`` is given (anything with the engine interface).
    ``max_context``: the per-call context window (default: the engine's). ``prefix``: a
    conditioning prefix on root prompts (``"Sub Call Budget: 4 "``, ``"Token Budget: 1024 "``).
    """
    kind, n = parse_mode(mode)
    numbers, targets = np.asarray(problems[0]), np.asarray(problems[1])
    if numbers.ndim != 2 or targets.shape != (numbers.shape[0],):
        raise ValueError(f"problems shapes {numbers.shape}, {targets.shape}: expected (numbers int[P, N], targets int[P])")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0")
    if temperature > 0 and key is None:
        raise ValueError("temperature > 0 needs key=jax.random.key(seed)")
    if kind in ("pass", "cons", "best") and n > 1 and temperature == 0:
        raise ValueError(f"mode={mode!r} draws {n} samples: expected temperature > 0")
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
    sched = _Scheduler(engine, mode="apr" if kind == "apr" else "sosp", temperature=temperature, key=key,
                       max_context=max_context, decode_chunk=decode_chunk, max_depth=max_depth if kind == "apr" else 0,
                       max_children=max_children, max_total_tokens=max_total_tokens, top_k=top_k, top_p=top_p)
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
    problem = root.problem
    latency = sched.last_step[problem] - sched.first_step.get(problem, 0)
    return RolloutResult(
        nums=list(nums), target=int(target), success=verdict.success, reason=verdict.reason, text=text,
        tree=sched.tree(root), calls=calls,
        total_tokens=sum(len(c.output_tokens) for c in calls), prompt_tokens=sum(len(c.prompt_tokens) for c in calls),
        sequential_tokens=sched.sequential_tokens(root), num_children=children, num_spawns=spawns,
        latency_steps=int(latency), wall_s=wall)


def claimed_answer(text: str) -> tuple | None:
    """The operations of a trace's restated path if it claims success (its last line, ignoring
    blank and ``Exit`` lines, is a goal line), else None: what cons@n votes on."""
    lines = [l for l in text.split("\n") if l and not l.startswith("Exit Sub Search")]
    if not lines or not lines[-1].endswith("equal: Goal Reached") or lines[-1].find("unequal") >= 0:
        return None
    spans = traces.goal_line_spans(text)
    path = text[text.find("\n", spans[0]) + 1:] if spans else text
    return tuple(l.split(",")[0].split(": ", 1)[1] for l in path.split("\n") if l.startswith("Exploring Operation: "))


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
        total_tokens=sum(s.total_tokens for s in samples), prompt_tokens=sum(s.prompt_tokens for s in samples),
        sequential_tokens=max(s.sequential_tokens for s in samples), latency_steps=max(s.latency_steps for s in samples),
        samples=samples)
