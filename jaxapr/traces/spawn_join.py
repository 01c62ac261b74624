"""APR's spawn() and join() at the text level, and the call tree (docs/trace_format.md, "APR").

Spawn. A call asks for children by ending its text with a block, then EOS::

    <Calling Sub Searches>
    <Start Sub Search 0 at level 1> Moving to Node #0,0
    <Start Sub Search 1 at level 1> Moving to Node #0,1
    <End Calling Sub Searches>

Indices count 0, 1, 2, ... in order; one level for the whole block (the root thread spawns
level 1, a level-L child spawns level L+1); only empty lines may follow the block.

Child prompt. Child i's call starts with two lines rebuilt from the parent's text::

    Moving to Node #<id>
    Current State: <T>:<list>, Operations: [<ops>]

``<T>:<list>`` is copied from the parent's last ``Generated Node #<id>: <T>:<list>
Operation: <op>`` line; ``<ops>`` is the operation list of the parent's ``Current State``
line in effect at that point, plus ``<op>``. Both lines end with ``\\n`` (the fixtures'
children start with exactly this text).

Child result. The text after the second-to-last line containing ``Goal Reached`` of the
child's output, i.e. its restated path up to and including its final goal line, always
ending with ``\\n``. None when the output has fewer than two such lines, or when anything but
empty lines and ``Exit Sub Search at level L`` lines follows the last one (the child did not
end on its goal, e.g. a child that printed a joined success of its own children and then
``No solution found.``); trailing empty/Exit lines are not part of the result.

Join. The parent's next prompt is its text without the spawn block, then ``<Sub Searches>``,
per child ``<No Solution in Sub Search i at level L at Node #id>`` or ``<Goal Reached in Sub
Search i at level L at Node #id>`` followed by the child's result, then
``<End Sub Searches>\\n``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

from jaxapr.traces.verifier import goal_line_spans

CALL_OPEN = "<Calling Sub Searches>"
CALL_CLOSE = "<End Calling Sub Searches>"
JOIN_OPEN = "<Sub Searches>"
JOIN_CLOSE = "<End Sub Searches>"

_NODE = r"0(?:,(?:0|[1-9][0-9]*))*"
_START_RE = re.compile(rf"<Start Sub Search (0|[1-9][0-9]*) at level ([1-9][0-9]*)> Moving to Node #({_NODE})")
_GENERATED_RE = re.compile(rf"Generated Node #({_NODE}): ([0-9]+:\[[^\]]*\]) Operation: (\S+)")
_STATE_OPS_RE = re.compile(r"Current State: [0-9]+:\[[^\]]*\], Operations: \[((?:'[^']*'(?:, '[^']*')*)?)\]")
_EXIT_RE = re.compile(r"Exit Sub Search at level [1-9][0-9]*")


class SubSearch(NamedTuple):
    """One line of a spawn block: child ``index`` at ``level``, started at ``node_id`` ("0,3,2")."""

    index: int
    level: int
    node_id: str


def _spawn_block(text: str) -> tuple[int, list[SubSearch]]:
    """(offset where the block starts, its sub searches); ValueError if absent or malformed."""
    if not isinstance(text, str):
        raise TypeError(f"parent text is {type(text).__name__}, expected str")
    lines = text.split("\n")
    opens = [k for k, line in enumerate(lines) if line == CALL_OPEN]
    if not opens:
        raise ValueError(f"no spawn block: expected a line {CALL_OPEN!r} near the end of the text")
    first = opens[-1]
    subs: list[SubSearch] = []
    close = None
    end = len(lines)
    while end > first + 1 and not lines[end - 1]:  # trailing newlines end the text, not the block
        end -= 1
    for k in range(first + 1, end):
        line = lines[k]
        if line == CALL_CLOSE:
            close = k
            break
        m = _START_RE.fullmatch(line)
        if m is None:
            raise ValueError(
                f"spawn block line {k + 1}: {line[:60]!r} is not '<Start Sub Search i at level L> Moving to Node #id'"
            )
        sub = SubSearch(int(m.group(1)), int(m.group(2)), m.group(3))
        if sub.index != len(subs):
            raise ValueError(f"spawn block line {k + 1}: sub search index {sub.index}, expected {len(subs)}")
        if subs and sub.level != subs[0].level:
            raise ValueError(
                f"spawn block line {k + 1}: level {sub.level}, expected {subs[0].level} like the first sub search"
            )
        if any(s.node_id == sub.node_id for s in subs):
            raise ValueError(f"spawn block line {k + 1}: node #{sub.node_id} is spawned twice")
        subs.append(sub)
    if close is None:
        raise ValueError(f"unclosed spawn block: no {CALL_CLOSE!r} line after line {first + 1}")
    if not subs:
        raise ValueError(f"empty spawn block at line {first + 1}: expected at least one sub search")
    trailing = [line for line in lines[close + 1 :] if line]
    if trailing:
        raise ValueError(f"text after {CALL_CLOSE!r}: {trailing[0][:60]!r}; expected the block to end the call")
    offset = sum(len(line) + 1 for line in lines[:first])
    return offset, subs


def parse_spawn_block(text: str) -> list[SubSearch]:
    """The trailing spawn block's sub searches, as (index, level, node_id) tuples.

    Raises ValueError (one line) when there is no block or it is malformed: unclosed, no
    entries, indices not 0, 1, 2, ..., mixed levels, a node spawned twice, unknown lines, or
    text after ``<End Calling Sub Searches>``.
    """
    return _spawn_block(text)[1]


def _format_ops(ops: list[str]) -> str:
    return "[" + ", ".join(f"'{op}'" for op in ops) + "]"


def child_prompts(parent_text: str) -> list[str]:
    """Each child's two-line prompt (``Moving to Node ...\\nCurrent State: ...\\n``), in order.

    Raises ValueError when the spawn block is bad or a spawned node has no ``Generated Node``
    line (with a ``Current State`` line before it) ahead of the block.
    """
    offset, subs = _spawn_block(parent_text)
    wanted = {s.node_id for s in subs}
    found: dict[str, tuple[str, list[str]]] = {}
    ops: list[str] | None = None
    for line in parent_text[:offset].split("\n"):
        m = _STATE_OPS_RE.search(line)
        if m is not None:
            ops = re.findall(r"'([^']*)'", m.group(1))
            continue
        m = _GENERATED_RE.fullmatch(line)
        if m is not None and m.group(1) in wanted and ops is not None:
            found[m.group(1)] = (m.group(2), ops + [m.group(3)])
    prompts = []
    for s in subs:
        if s.node_id not in found:
            raise ValueError(
                f"sub search {s.index}: no 'Generated Node #{s.node_id}: ...' line after a 'Current State' line before the spawn block"
            )
        state, node_ops = found[s.node_id]
        prompts.append(f"Moving to Node #{s.node_id}\nCurrent State: {state}, Operations: {_format_ops(node_ops)}\n")
    return prompts


def child_result(child_text: str | None) -> str | None:
    """What a child hands back: its restated path (see the module docstring), or None."""
    if not isinstance(child_text, str):
        return None
    spans = goal_line_spans(child_text)
    if spans is None:
        return None
    start = child_text.find("\n", spans[0]) + 1
    end = child_text.find("\n", spans[1])
    if end < 0:
        end = len(child_text)
    for line in child_text[end:].split("\n"):
        if line and not _EXIT_RE.fullmatch(line):
            return None
    return child_text[start:end] + "\n"


def join(parent_text: str, child_texts: list[str | None]) -> str:
    """The parent's next prompt after its children ran (see the module docstring).

    ``child_texts[i]`` is child i's final call text, or None when it found no solution (a
    text whose ``child_result`` is None counts as no solution too). Raises ValueError when
    the parent has no valid spawn block or the number of children differs from it.
    """
    offset, subs = _spawn_block(parent_text)
    child_texts = list(child_texts)
    if len(child_texts) != len(subs):
        raise ValueError(f"join got {len(child_texts)} child texts, expected {len(subs)} (one per sub search spawned)")
    parts = [parent_text[:offset], JOIN_OPEN, "\n"]
    for s, text in zip(subs, child_texts):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"child text {s.index} is {type(text).__name__}, expected str or None")
        result = child_result(text)
        where = f"in Sub Search {s.index} at level {s.level} at Node #{s.node_id}>\n"
        if result is None:
            parts.append("<No Solution " + where)
        else:
            parts += ["<Goal Reached " + where, result]
    parts += [JOIN_CLOSE, "\n"]
    return "".join(parts)


@dataclasses.dataclass
class CallTree:
    """One thread's calls: ``main_calls[k]`` is its k-th call (prompt + output);
    ``sub_calls[k]`` are the children spawned at the end of ``main_calls[k]``, each a CallTree.
    A finished thread has ``len(sub_calls) == len(main_calls) - 1`` (the fixtures' shape)."""

    main_calls: list[str]
    sub_calls: list[list[CallTree]] = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> CallTree:
        """From ``{"main_calls": [str, ...], "sub_calls": [[dict, ...], ...]}``."""
        if not isinstance(d, dict) or not isinstance(d.get("main_calls"), list):
            raise ValueError(f"call tree {str(d)[:60]!r}: expected a dict with a 'main_calls' list")
        subs = d.get("sub_calls", [])
        if not isinstance(subs, list) or not all(isinstance(s, list) for s in subs):
            raise ValueError("call tree 'sub_calls': expected a list of lists of call trees")
        return cls(list(d["main_calls"]), [[cls.from_dict(c) for c in s] for s in subs])

    def to_dict(self) -> dict:
        return {"main_calls": list(self.main_calls), "sub_calls": [[c.to_dict() for c in s] for s in self.sub_calls]}

    @property
    def final_text(self) -> str:
        """The thread's last call: what verify() checks and what a child hands back."""
        return self.main_calls[-1]

    def validate(self, level: int = 0, where: str = "root") -> None:
        """Checks structural consistency, recursively; raises a one-line ValueError naming the call.

        Per thread at ``level`` (root 0): at least one call, all str; ``len(sub_calls) ==
        len(main_calls) - 1``; each non-final call ends with a spawn block of level + 1 with
        one child per entry; each child's first call starts with its prompt; and
        ``main_calls[k+1]`` starts with ``join(main_calls[k], [child.final_text, ...])``.
        The final call is not checked for a spawn block: a thread may stop at an unanswered one.
        """
        if not self.main_calls or not all(isinstance(t, str) for t in self.main_calls):
            raise ValueError(f"{where}: main_calls must be a non-empty list of str")
        if len(self.sub_calls) != len(self.main_calls) - 1:
            raise ValueError(
                f"{where}: {len(self.sub_calls)} sub_calls entries for {len(self.main_calls)} main calls, expected {len(self.main_calls) - 1}"
            )
        for k, children in enumerate(self.sub_calls):
            call = f"{where} main_calls[{k}]"
            try:
                subs = parse_spawn_block(self.main_calls[k])
                prompts = child_prompts(self.main_calls[k])
            except ValueError as e:
                raise ValueError(f"{call}: {e}") from None
            if subs[0].level != level + 1:
                raise ValueError(f"{call}: spawns at level {subs[0].level}, expected {level + 1}")
            if len(children) != len(subs):
                raise ValueError(f"{call}: {len(children)} children recorded, the spawn block asks for {len(subs)}")
            for c, (child, prompt) in enumerate(zip(children, prompts)):
                child_where = f"{where} sub_calls[{k}][{c}]"
                if not isinstance(child, CallTree):
                    raise ValueError(f"{child_where}: {type(child).__name__}, expected CallTree")
                child.validate(level + 1, child_where)
                if not child.main_calls[0].startswith(prompt):
                    raise ValueError(
                        f"{child_where}: first call does not start with its prompt {prompt.splitlines()[0]!r}"
                    )
            joined = join(self.main_calls[k], [child.final_text for child in children])
            if not self.main_calls[k + 1].startswith(joined):
                raise ValueError(
                    f"{where} main_calls[{k + 1}]: does not start with the join of main_calls[{k}] and its children"
                )


SUB_CALL_BUDGET = "Sub Call Budget: "


def budget_prefix(budget: int) -> str:
    """The conditioning prefix of a root prompt that asks for ``budget`` child calls in the
    whole tree (the paper's format): ``"Sub Call Budget: 4 "``."""
    return f"{SUB_CALL_BUDGET}{int(budget)} "


def prompt_budget(prompt: str) -> int | None:
    """The budget a root prompt's ``budget_prefix`` asks for; None without one."""
    if not prompt.startswith(SUB_CALL_BUDGET):
        return None
    return int(prompt[len(SUB_CALL_BUDGET) :].split(" ", 1)[0])


def root_prompt(nums, target, mode: str = "apr", prefix: str = "") -> str:
    """The prompt that starts a problem: for ``apr`` the root thread's two lines
    (``Moving to Node #0`` / ``Current State: T:[...], Operations: []``), for ``sosp`` the
    ``Current State`` line alone, after an optional conditioning ``prefix`` such as
    ``"Sub Call Budget: 4 "`` or ``"Token Budget: 1024 "``."""
    if mode not in ("apr", "sosp"):
        raise ValueError(f"mode={mode!r}: expected 'apr' or 'sosp'")
    state = f"Current State: {int(target)}:{[int(x) for x in nums]}, Operations: []\n"
    return prefix + ("Moving to Node #0\n" + state if mode == "apr" else state)
