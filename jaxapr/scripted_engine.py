"""A scripted stand-in for ``engine.Engine``: it answers each prompt with known text.

It has the engine's runtime interface (``num_slots``, ``max_len``, ``free_slots``, ``insert``,
``extend``, ``decode``, ``finished``, ``read``, ``release``) and emits ``tokens_per_step`` tokens of its
answer per decode step, so the runtime's scheduling, queueing, latency and token accounting
can be tested (and benchmarked) without a model: e.g. with the reference solver's text for
every prompt, a rollout must rebuild the reference call tree exactly.

``ForcedEngine`` gives the same scripted answers through a real ``engine.Engine`` with forced
decoding: every token costs a real model step (and gets the policy's log-prob), while the
spawn/join structure is the script's -- what ``bench --suite=runtime`` measures, since a
random-weight model never writes spawn blocks.

Both answer ``extend`` (a finished slot continued with a new prompt that shares a prefix with
what it holds) as if the whole new prompt -- the slot's prompt and output up to the start
position, then the suffix -- had been inserted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxapr.engine import SlotOutput
from jaxapr.tokenizer import CountdownTokenizer

_TOK = CountdownTokenizer()


class ScriptedEngine:
    """``responses``: a mapping or a function from prompt text (without BOS) to output text
    (without EOS); EOS is appended. An unknown prompt is answered with EOS alone."""

    def __init__(
        self,
        responses: Mapping[str, str] | Callable[[str], str],
        num_slots: int,
        max_len: int = 4096,
        tokens_per_step: int = 1,
    ):
        if num_slots < 1 or tokens_per_step < 1:
            raise ValueError(f"num_slots={num_slots}, tokens_per_step={tokens_per_step}: expected positive ints")
        self.respond = responses if callable(responses) else (lambda p: responses.get(p, ""))
        self.num_slots, self.max_len, self.tokens_per_step = num_slots, max_len, tokens_per_step
        self._out: list = [None] * num_slots
        self._prompt: list = [None] * num_slots
        self._pos = np.zeros(num_slots, np.int64)
        self.inserted: list[str] = []  # every prompt text (inserted or extended), in order
        self.extended: list[str] = []  # the whole prompt text of every extend

    def free_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if self._out[s] is None]

    def insert(
        self,
        prompts: Sequence,
        slots: Sequence[int] | None = None,
        *,
        max_new_tokens,
        stop_ids=(),
        temperature=0.0,
        top_k=None,
        top_p=None,
        key=None,
    ) -> list[int]:
        free = self.free_slots()
        slots = list(free[: len(prompts)] if slots is None else slots)
        limits = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
        for slot, prompt, limit in zip(slots, prompts, limits):
            if self._out[slot] is not None:
                raise ValueError(f"slot {slot} is busy")
            self._start(slot, np.asarray(prompt), limit)
        return slots

    def extend(
        self,
        slots: Sequence[int],
        suffixes: Sequence,
        start_positions: Sequence[int],
        *,
        max_new_tokens,
        stop_ids=(),
        temperature=0.0,
        top_k=None,
        top_p=None,
        key=None,
    ) -> list[int]:
        slots = list(slots)
        limits = np.broadcast_to(np.asarray(max_new_tokens), (len(slots),))
        for slot, suffix, start, limit in zip(slots, suffixes, start_positions, limits):
            out = self._out[slot]
            if out is None or self._pos[slot] < len(out):
                raise ValueError(
                    f"slot {slot} is {'free' if out is None else 'still running'}: extend needs a finished slot"
                )
            held = np.concatenate([self._prompt[slot], out[: self._pos[slot]]])
            if not 0 <= start <= len(held) - 1:
                raise ValueError(f"start position {start} for slot {slot}: expected 0..{len(held) - 1}")
            prompt = np.concatenate([held[:start], np.asarray(suffix)]).astype(np.int32)
            self.extended.append(_TOK.decode(prompt))
            self._start(slot, prompt, limit)
        return slots

    def _start(self, slot: int, prompt: np.ndarray, limit) -> None:
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of length {len(prompt)}: expected < max_len={self.max_len}")
        text = _TOK.decode(prompt)
        self.inserted.append(text)
        out = np.concatenate([_TOK.encode(self.respond(text)), [_TOK.eos_id]]).astype(np.int32)
        self._out[slot] = out[: min(int(limit), self.max_len - len(prompt))]
        self._prompt[slot] = prompt
        self._pos[slot] = 1  # the first token comes with the prefill, as in the engine

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
            self._prompt[s] = None
            self._pos[s] = 0


class ForcedEngine:
    """A real ``engine.Engine`` that answers each prompt with known text by forced decoding.

    ``responses``: as ``ScriptedEngine`` (prompt text without BOS -> output text without
    EOS; unknown prompts get EOS alone); a callable may also return None: that prompt is
    decoded freely by the model (no forcing). Each scripted prompt is inserted with ``forced =
    encode(response) + [EOS]``; the slot still stops at its ``max_new_tokens``, its stop ids
    or the context end. Everything else is the wrapped engine's (``engine`` attribute), so
    ``runtime.rollout(None, problems, mode, engine=ForcedEngine(eng, responses))`` runs the
    model on every token with the script's spawn/join structure.
    """

    def __init__(self, engine, responses: Mapping[str, str] | Callable[[str], str]):
        self.engine = engine
        self.respond = responses if callable(responses) else (lambda p: responses.get(p, ""))
        self.inserted: list[str] = []  # every prompt text (inserted or extended), in order
        self._prompts: dict[int, np.ndarray] = {}  # slot -> its call's whole prompt (for extend)

    @property
    def num_slots(self) -> int:
        return self.engine.num_slots

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def _forced(self, prompt: np.ndarray):
        text = _TOK.decode(prompt)
        self.inserted.append(text)
        response = self.respond(text)
        return None if response is None else np.concatenate([_TOK.encode(response), [_TOK.eos_id]]).astype(np.int32)

    def insert(self, prompts: Sequence, slots: Sequence[int] | None = None, **kw) -> list[int]:
        prompts = [np.asarray(p) for p in prompts]
        forced = [self._forced(p) for p in prompts]
        slots = self.engine.insert(prompts, slots, forced=forced, **kw)
        self._prompts.update(zip(slots, prompts))
        return slots

    def extend(self, slots: Sequence[int], suffixes: Sequence, start_positions: Sequence[int], **kw) -> list[int]:
        slots = list(slots)
        outs = self.engine.read(slots)  # raises for a free slot
        prompts = [
            np.concatenate([np.concatenate([self._prompts[s], o.tokens])[:start], np.asarray(x)])
            for s, o, start, x in zip(slots, outs, start_positions, suffixes)
        ]
        forced = [self._forced(p) for p in prompts]
        slots = self.engine.extend(slots, suffixes, start_positions, forced=forced, **kw)
        self._prompts.update(zip(slots, prompts))
        return slots

    def __getattr__(self, name):  # free_slots, decode, finished, read, release, running, ...
        return getattr(self.engine, name)
