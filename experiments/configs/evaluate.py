"""Evaluation configs: what ``experiments.reproduce`` (and ``experiments.evaluate --config``)
measures on the test split once the policies are trained.

Fields: ``problems`` (test problems of the context analysis), ``contexts`` (per-call windows;
the largest is the main one), ``n_max`` (SoS+ pass@n / cons@n, n = 1..n_max, sampled at
``temperature``), ``budgets`` (APR "Sub Call Budget: b" conditions, greedy), ``sweep_problems``
(the first problems of the split used by the pass@n / cons@n and budget sweeps; 0 = all),
``num_slots`` (engine rows), ``seed`` (sampling), ``policies`` ("all": every exported policy;
"best": each method's policy chosen on validation, SFT or GRPO), ``spawn_problems`` (validation
problems of the APR policies' spawn decisions, teacher-forced on their demonstrations:
``experiments/analysis.py: spawn_decisions``; 0 = off).

``mini_sweep`` is the mini pipeline's second stage: the same test problems for all four
exported policies (SFT and GRPO of each method), with SoS+ pass@n / cons@n for n = 1..8 and
APR's "Sub Call Budget: b" for b = 2, 4, 6 on the first 200 of them (the paper's Fig. 4a,
GRPO against SFT with the children's change, and the budgets before and after RL). Run after
the pipeline, the same command with this config evaluates only what the first stage did not
(finished conditions are read from ``eval/cache``)::

    python -m experiments.reproduce --preset=mini --workdir=W \
      --eval_config=experiments/configs/evaluate.py:mini_sweep
"""

from ml_collections import ConfigDict

PRESETS = ("tiny", "mini", "paper")
SECOND_STAGES = ("mini_sweep",)


def get_config(preset: str = "tiny") -> ConfigDict:
    if preset == "mini_sweep":
        c = get_config("mini")
        c.preset = preset  # its time is its own row in the pipeline's stages.json
        c.policies, c.n_max, c.budgets, c.sweep_problems = "all", 8, (2, 4, 6), 200
        return c
    if preset not in PRESETS:
        raise ValueError(f"unknown evaluation preset {preset!r}: expected one of {PRESETS + SECOND_STAGES}")
    c = ConfigDict()
    c.preset = preset
    c.split = "test"
    #        problems contexts            n_max budgets              sweep slots
    row = {
        "tiny": (200, (256, 384, 512), 4, (), 0, 64),
        # mini: the test split's 1,000 problems at the main window, for each method's policy chosen on
        # validation; pass@n / cons@n and the budget sweep do not fit reproduce's 2.5 hours on 2
        # CPU cores: they are the second stage, mini_sweep.
        "mini": (1_000, (1024,), 0, (), 0, 64),
        "paper": (1_000, (4096,), 8, tuple(range(1, 11)), 0, 256),
    }[preset]
    c.problems, c.contexts, c.n_max, c.budgets, c.sweep_problems, c.num_slots = row
    c.temperature = 1.0
    c.seed = 0
    c.policies = "best" if preset == "mini" else "all"
    c.spawn_problems = {"tiny": 100, "mini": 500, "paper": 500}[preset]
    return c
