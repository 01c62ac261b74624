"""Draw a ``runtime.rollout`` result as a tree of threads: ``render_text`` (one line per call,
children indented under the call that spawned them) and ``write_html`` (nested boxes, children
side by side, each call's full text with its prompt greyed). ``experiments.show_trace`` is the
command line around them.
"""

from __future__ import annotations

import html
import os

from jaxapr import traces


def _calls_in_order(tree: dict):
    """(tree, k) for every call, parents before children (``runtime``'s call order)."""
    for k in range(len(tree["main_calls"])):
        yield tree, k
        if k < len(tree["sub_calls"]):
            for child in tree["sub_calls"][k]:
                yield from _calls_in_order(child)


def _split_calls(result) -> dict:
    """{(id(tree), k): Call} pairing each call of the tree with the runtime's Call record."""
    return {(id(tree), k): call for (tree, k), call in zip(_calls_in_order(result.tree), result.calls)}


def _state(prompt: str) -> str:
    line = next((l for l in prompt.split("\n") if l.startswith("Current State: ")), "")
    return line[len("Current State: ") :].split(", Operations")[0]


def _explored(text: str) -> list[str]:
    return [
        l.split("Exploring Operation: ")[1].split(",")[0]
        for l in text.split("\n")
        if l.startswith("Exploring Operation: ")
    ]


def _outcome(text: str) -> str:
    if traces.child_result(text) is not None:
        return "goal reached"
    if "No solution found" in text:
        return "no solution"
    if "<Calling Sub Searches>" in text:
        return "spawned"
    return "stopped"


def render_text(result, width: int = 100) -> str:
    """The rollout as an indented tree: one line per call, its children below it."""
    calls = _split_calls(result)
    lines = [
        f"problem {result.nums} -> {result.target}: {'SOLVED' if result.success else 'not solved'} "
        f"({result.reason}); {result.num_children} children, {result.total_tokens} tokens decoded, "
        f"{result.sequential_tokens} on the critical path"
    ]

    def walk(tree, depth, label):
        pad = "  " * depth
        for k, text in enumerate(tree["main_calls"]):
            call = calls.get((id(tree), k))
            n = len(call.output_tokens) if call is not None else 0
            where = "after the join" if k else _state(text)
            moves = _explored(call.output if call is not None else text)
            lines.append(
                f"{pad}{label} call {k + 1} [{where}] {_outcome(text)}: {n} tokens"
                + (f", explored {', '.join(moves[:6])}{' ...' if len(moves) > 6 else ''}" if moves else "")
            )
            if k < len(tree["sub_calls"]):
                for i, child in enumerate(tree["sub_calls"][k]):
                    walk(child, depth + 1, f"child {i}")

    walk(result.tree, 0, "root")
    return "\n".join(l if len(l) <= width else l[: width - 3] + "..." for l in lines)


_CSS = """body{font-family:sans-serif;margin:1em}.call{border:1px solid #999;border-radius:6px;margin:4px;padding:4px;
background:#fff}.ok{border-color:#2a2;background:#f3fff3}.no{border-color:#c44;background:#fff5f5}.kids{display:flex;
gap:6px;align-items:flex-start;overflow-x:auto;padding-left:12px;border-left:3px solid #88a}pre{font-size:11px;margin:2px;
white-space:pre-wrap}.prompt{color:#888}summary{cursor:pointer;font-size:13px}"""


def write_html(result, path: str) -> str:
    """The rollout as a self-contained HTML page (nested boxes; children side by side)."""
    calls = _split_calls(result)

    def box(tree, label):
        parts = []
        for k, text in enumerate(tree["main_calls"]):
            call = calls.get((id(tree), k))
            prompt, output = (call.prompt, call.output) if call is not None else ("", text)
            outcome = _outcome(text)
            cls = "ok" if outcome == "goal reached" else ("no" if outcome in ("no solution", "stopped") else "")
            n = len(call.output_tokens) if call is not None else 0
            parts.append(
                f'<div class="call {cls}"><details><summary><b>{html.escape(label)}</b>, call {k + 1}: '
                f"{html.escape(_state(text) if k == 0 else 'after the join')}: {outcome} ({n} tokens)</summary>"
                f'<pre><span class="prompt">{html.escape(prompt)}</span>{html.escape(output)}</pre></details>'
            )
            if k < len(tree["sub_calls"]) and tree["sub_calls"][k]:
                parts.append(
                    '<div class="kids">'
                    + "".join(box(c, f"child {i}") for i, c in enumerate(tree["sub_calls"][k]))
                    + "</div>"
                )
            parts.append("</div>")
        return "".join(parts)

    title = (
        f"{result.nums} -> {result.target}: {'solved' if result.success else 'not solved'}; "
        f"{result.num_children} children, {result.total_tokens} tokens, {result.sequential_tokens} sequential"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>APR trace</title><style>{_CSS}</style></head>"
        f"<body><h3>{html.escape(title)}</h3><p>Click a call to read its text (grey: the prompt the runtime "
        f"wrote; black: what the policy wrote).</p>{box(result.tree, 'root')}</body></html>"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
