r"""See one parallel search: run an APR rollout and draw its tree of threads.

    python -m experiments.show_trace --policy=experiments/checkpoints/mini_apr_sft.npz \
        --numbers=3,7,2,9 --target=17 --out=/tmp/trace

prints the tree in the terminal (the root's calls, each spawn, every child's search and
verdict, each join) and writes ``<out>/trace.html``: the same tree as nested boxes, each call's
full text inside (its prompt greyed, what the policy wrote in black), children side by side.
``--budget=b`` prefixes the root with ``Sub Call Budget: b`` (policies trained with budgets);
``--temperature`` > 0 samples (``--seed``).

``render_text(result)`` and ``write_html(result, path)`` draw a ``runtime.rollout`` result
(the quickstart shows a solved example with them).
"""
from __future__ import annotations

import html
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("policy", None, "An exported policy .npz or a training workdir.")
flags.DEFINE_list("numbers", None, "The problem's numbers, e.g. 3,7,2,9.")
flags.DEFINE_integer("target", None, "The problem's target.")
flags.DEFINE_string("out", None, "Directory for trace.html (optional: without it only the terminal tree).")
flags.DEFINE_integer("budget", None, "Sub Call Budget prefix (policies trained with budgets).")
flags.DEFINE_integer("context", None, "Per-call context window (default: the policy's).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


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
    return line[len("Current State: "):].split(", Operations")[0]


def _explored(text: str) -> list[str]:
    return [l.split("Exploring Operation: ")[1].split(",")[0] for l in text.split("\n")
            if l.startswith("Exploring Operation: ")]


def _outcome(text: str) -> str:
    from jaxapr import traces

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
    lines = [f"problem {result.nums} -> {result.target}: {'SOLVED' if result.success else 'not solved'} "
             f"({result.reason}); {result.num_children} children, {result.total_tokens} tokens decoded, "
             f"{result.sequential_tokens} on the critical path"]

    def walk(tree, depth, label):
        pad = "  " * depth
        for k, text in enumerate(tree["main_calls"]):
            call = calls.get((id(tree), k))
            n = len(call.output_tokens) if call is not None else 0
            where = "after the join" if k else _state(text)
            moves = _explored(call.output if call is not None else text)
            lines.append(f"{pad}{label} call {k + 1} [{where}] {_outcome(text)}: {n} tokens"
                         + (f", explored {', '.join(moves[:6])}{' ...' if len(moves) > 6 else ''}" if moves else ""))
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
            parts.append(f'<div class="call {cls}"><details><summary><b>{html.escape(label)}</b>, call {k + 1}: '
                         f'{html.escape(_state(text) if k == 0 else "after the join")}: {outcome} ({n} tokens)</summary>'
                         f'<pre><span class="prompt">{html.escape(prompt)}</span>{html.escape(output)}</pre></details>')
            if k < len(tree["sub_calls"]) and tree["sub_calls"][k]:
                parts.append('<div class="kids">' + "".join(box(c, f"child {i}") for i, c in
                                                          enumerate(tree["sub_calls"][k])) + "</div>")
            parts.append("</div>")
        return "".join(parts)

    title = (f"{result.nums} -> {result.target}: {'solved' if result.success else 'not solved'}; "
             f"{result.num_children} children, {result.total_tokens} tokens, {result.sequential_tokens} sequential")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>APR trace</title><style>{_CSS}</style></head>"
            f"<body><h3>{html.escape(title)}</h3><p>Click a call to read its text (grey: the prompt the runtime "
            f"wrote; black: what the policy wrote).</p>{box(result.tree, 'root')}</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def show(policy_path: str, numbers, target: int, *, out: str | None = None, budget: int | None = None,
         context: int | None = None, temperature: float = 0.0, seed: int = 0, log=print):
    import jax
    import numpy as np

    from envs.countdown import rules
    from jaxapr import runtime
    from jaxapr import policy_io

    try:
        nums = [int(x) for x in numbers]
    except (TypeError, ValueError):
        raise ValueError(f"--numbers={numbers}: expected comma-separated integers") from None
    rules.check_num_numbers(len(nums))
    if not isinstance(target, int) or target < 0:
        raise ValueError(f"--target={target!r}: expected a non-negative int")
    if budget is not None and budget < 0:
        raise ValueError(f"--budget={budget}: expected >= 0")
    policy = policy_io.load_policy(policy_path)
    ctx = context or policy.cfg.max_len
    if not 32 <= ctx <= policy.cfg.max_len:
        raise ValueError(f"--context={ctx}: expected 32..{policy.cfg.max_len} (the policy's context)")
    prefix = "" if budget is None else f"Sub Call Budget: {budget} "
    (result,) = runtime.rollout(policy, (np.array([nums]), np.array([target])), mode="apr", max_context=ctx,
                                num_slots=16, prefix=prefix, temperature=temperature, key=jax.random.key(seed))
    log(render_text(result))
    if out:
        log(f"wrote {write_html(result, os.path.join(out, 'trace.html'))}")
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for name in ("policy", "numbers", "target"):
        if getattr(FLAGS, name) is None:
            raise app.UsageError(f"--{name} is required")
    try:
        show(FLAGS.policy, FLAGS.numbers, FLAGS.target, out=FLAGS.out, budget=FLAGS.budget, context=FLAGS.context,
             temperature=FLAGS.temperature, seed=FLAGS.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"show_trace: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
