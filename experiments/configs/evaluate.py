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
"""

from ml_collections import ConfigDict

PRESETS = ("tiny", "mini", "paper")


def get_config(preset: str = "tiny") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown evaluation preset {preset!r}: expected one of {PRESETS}")
    c = ConfigDict()
    c.preset = preset
    c.split = "test"
    #        problems contexts            n_max budgets              sweep slots
    row = {
        "tiny": (200, (256, 384, 512), 4, (), 0, 64),
        # mini: the test split's 1,000 problems at the main window, for each method's policy chosen on
        # validation; the 768 window, pass@n / cons@n and the budget sweep (experiments.evaluate
        # --config.contexts=768,1024 ...) do not fit reproduce's 2.5 hours on 2 CPU cores.
        "mini": (1_000, (1024,), 0, (), 0, 64),
        "paper": (1_000, (4096,), 8, tuple(range(1, 11)), 0, 256),
    }[preset]
    c.problems, c.contexts, c.n_max, c.budgets, c.sweep_problems, c.num_slots = row
    c.temperature = 1.0
    c.seed = 0
    c.policies = "best" if preset == "mini" else "all"
    c.spawn_problems = {"tiny": 100, "mini": 500, "paper": 500}[preset]
    return c
