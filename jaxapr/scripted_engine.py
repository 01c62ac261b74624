"""A scripted stand-in for ``engine.Engine``: it answers each prompt with known text.

It has the engine's runtime interface (``num_slots``, ``max_len``, ``free_slots``, ``insert``,
``decode``, ``finished``, ``read``, ``release``) and emits ``tokens_per_step`` tokens of its
answer per decode step, so the runtime's scheduling, queueing, latency and token accounting
can be tested (and benchmarked) without a model: e.g. with the reference solver's text for
every prompt, a rollout must rebuild the reference call tree exactly.

``ForcedEngine`` gives the same scripted answers through a real ``engine.Engine`` with forced
decoding: every token costs a real model step (and gets the policy's log-prob), while the
spawn/join structure is the script's -- what ``bench --suite=runtime`` measures, since a
random-weight model never writes spawn blocks.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from jaxapr.engine import SlotOutput
from jaxapr.tokenizer import CountdownTokenizer

_TOK = CountdownTokenizer()


class ScriptedEngine:
    """``responses``: a mapping or a function from prompt text (without BOS) to output text
    (without EOS); EOS is appended. An unknown prompt is answered with EOS alone."""

    def __init__(self, responses: Mapping[str, str] | Callable[[str], str], num_slots: int, max_len: int = 4096,
                 tokens_per_step: int = 1):
        if num_slots < 1 or tokens_per_step < 1:
            raise ValueError(f"num_slots={num_slots}, tokens_per_step={tokens_per_step}: expected positive ints")
        self.respond = responses if callable(responses) else (lambda p: responses.get(p, ""))
        self.num_slots, self.max_len, self.tokens_per_step = num_slots, max_len, tokens_per_step
        self._out: list = [None] * num_slots
        self._pos = np.zeros(num_slots, np.int64)
        self.inserted: list[str] = []  # every prompt text, in insertion order

    def free_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if self._out[s] is None]

    def insert(self, prompts: Sequence, slots: Sequence[int] | None = None, *, max_new_tokens, stop_ids=(),
               temperature=0.0, top_k=None, top_p=None, key=None) -> list[int]:
        free = self.free_slots()
        slots = list(free[:len(prompts)] if slots is None else slots)
        limits = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
        for slot, prompt, limit in zip(slots, prompts, limits):
            if self._out[slot] is not None:
                raise ValueError(f"slot {slot} is busy")
            prompt = np.asarray(prompt)
            if len(prompt) >= self.max_len:
                raise ValueError(f"prompt of length {len(prompt)}: expected < max_len={self.max_len}")
            text = _TOK.decode(prompt)
            self.inserted.append(text)
            out = np.concatenate([_TOK.encode(self.respond(text)), [_TOK.eos_id]]).astype(np.int32)
            self._out[slot] = out[: min(int(limit), self.max_len - len(prompt))]
            self._pos[slot] = 1  # the first token comes with the prefill, as in the engine
        return slots

    def _running(self) -> list[int]:
        return [s for s in range(self.num_slots) if self._out[s] is not None and self._pos[s] < len(self._out[s])]

    def decode(self, num_steps: int) -> int:
        running = self._running()
        if not running:
            return 0
        need = max(-(-(len(self._out[s]) - self._pos[s]) // self.tokens_per_step) for s in running)
        steps = min(num_steps, need)
        for s in running:
            self._pos[s] = min(len(self._out[s]), self._pos[s] + steps * self.tokens_per_step)
        return steps

    def finished(self) -> list[int]:
        return [s for s in range(self.num_slots) if self._out[s] is not None and self._pos[s] >= len(self._out[s])]

    def read(self, slots: Sequence[int]) -> list[SlotOutput]:
        return [SlotOutput(self._out[s][: self._pos[s]].copy(), np.zeros(self._pos[s], np.float32)) for s in slots]

    def release(self, slots: Sequence[int]) -> None:
        for s in slots:
            self._out[s] = None
            self._pos[s] = 0


class ForcedEngine:
    """A real ``engine.Engine`` that answers each prompt with known text by forced decoding.

    ``responses``: as ``ScriptedEngine`` (prompt text without BOS -> output text without
    EOS; unknown prompts get EOS alone). Each prompt is inserted with ``forced =
    encode(response) + [EOS]``; the slot still stops at its ``max_new_tokens``, its stop ids
    or the context end. Everything else is the wrapped engine's (``engine`` attribute), so
    ``runtime.rollout(None, problems, mode, engine=ForcedEngine(eng, responses))`` runs the
    model on every token with the script's spawn/join structure.
    """

    def __init__(self, engine, responses: Mapping[str, str] | Callable[[str], str]):
        self.engine = engine
        self.respond = responses if callable(responses) else (lambda p: responses.get(p, ""))
        self.inserted: list[str] = []

    @property
    def num_slots(self) -> int:
        return self.engine.num_slots

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def insert(self, prompts: Sequence, slots: Sequence[int] | None = None, **kw) -> list[int]:
        forced = []
        for prompt in prompts:
            text = _TOK.decode(np.asarray(prompt))
            self.inserted.append(text)
            forced.append(np.concatenate([_TOK.encode(self.respond(text)), [_TOK.eos_id]]).astype(np.int32))
        return self.engine.insert(prompts, slots, forced=forced, **kw)

    def __getattr__(self, name):  # free_slots, decode, finished, read, release, running, ...
        return getattr(self.engine, name)
