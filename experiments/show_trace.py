r"""See one parallel search: run an APR rollout and draw its tree of threads.

    python -m experiments.show_trace --policy=experiments/checkpoints/mini_apr_sft.npz \
        --numbers=3,7,2,9 --target=17 --out=/tmp/trace

prints the tree in the terminal (the root's calls, each spawn, every child's search and
verdict, each join) and writes ``<out>/trace.html``: the same tree as nested boxes, each call's
full text inside (its prompt greyed, what the policy wrote in black), children side by side.
``--budget=b`` prefixes the root with ``Sub Call Budget: b`` (policies trained with budgets);
``--temperature`` > 0 samples (``--seed``).

The drawing itself is ``jaxapr.trace_view`` (``render_text``, ``write_html``).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import cli
from jaxapr.trace_view import render_text, write_html

FLAGS = flags.FLAGS
flags.DEFINE_string("policy", None, "An exported policy .npz or a training workdir.")
flags.DEFINE_list("numbers", None, "The problem's numbers, e.g. 3,7,2,9.")
flags.DEFINE_integer("target", None, "The problem's target.")
flags.DEFINE_string("out", None, "Directory for trace.html (optional: without it only the terminal tree).")
flags.DEFINE_integer("budget", None, "Sub Call Budget prefix (policies trained with budgets).")
flags.DEFINE_integer("context", None, "Per-call context window (default: the policy's).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def show(
    policy_path: str,
    numbers,
    target: int,
    *,
    out: str | None = None,
    budget: int | None = None,
    context: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    log=print,
):
    import jax
    import numpy as np

    from envs.countdown import rules
    from jaxapr import policy_io, runtime
    from jaxapr.traces import spawn_join

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
    prefix = "" if budget is None else spawn_join.budget_prefix(budget)
    (result,) = runtime.rollout(
        policy,
        (np.array([nums]), np.array([target])),
        mode="apr",
        max_context=ctx,
        num_slots=16,
        prefix=prefix,
        temperature=temperature,
        key=jax.random.key(seed),
    )
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
    cli.quiet_logs()  # a training workdir's checkpoint restore logs several INFO lines
    try:
        show(
            FLAGS.policy,
            FLAGS.numbers,
            FLAGS.target,
            out=FLAGS.out,
            budget=FLAGS.budget,
            context=FLAGS.context,
            temperature=FLAGS.temperature,
            seed=FLAGS.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"show_trace: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
